"""The ``CloudSend Cluster`` block: instance types and environments saved in Prefect, edited in its UI.

Jobs are not part of it: they are flow parameters, so one saved cluster serves many batches. A saved block is
loaded wherever a run starts (another directory, a worker on another machine), so it holds what its
environments are built from, not the names of files beside the config it was made from: ``from_config`` reads
requirements files and setup scripts into it. It holds no secret: an SSH key is named by its path, AWS
credentials by the name of their own block.
Register the type with ``prefect block register -m cloudsend_prefect``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect.blocks.core import Block
from pydantic import (
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode, JsonSchemaValue
from pydantic_core import core_schema

from cloudsend_prefect.config import (
    SLUG_MAX,
    SLUG_PATTERN,
    BatchConfig,
    ClusterSettings,
    Environment,
    InstanceType,
    Job,
)
from cloudsend_prefect.errors import ConfigError
from cloudsend_prefect.loading import settings_config
from cloudsend_prefect.specs import resolve_env

DEFAULT_ENV_NAME = "default"  # what a config's only, unnamed environment is called in a block (and in its spec)


def _names_a_script(command: str) -> bool:
    """Whether ``command`` reads as a setup script's file name: the rule ``specs.resolve_env`` applies."""
    return "\n" not in command and command.strip().endswith(".sh")


class ClusterEnvironment(Environment):
    """An environment as a block keeps it: the packages and setup commands themselves, never file names."""

    model_config = ConfigDict(title="Environment")

    name: str = Field(  # required here: jobs given to the flow pick it by name
        title="Name",
        description="Jobs choose it with `env_name`; a job without one uses the only environment.",
        json_schema_extra={"pattern": SLUG_PATTERN, "maxLength": SLUG_MAX},
    )
    env_pypi: list[str] = Field(
        default_factory=list,
        title="pip packages",
        description="Requirements installed into a venv, one per item (the lines of a requirements file).",
    )
    env_conda: list[str] = Field(
        default_factory=list,
        title="conda packages",
        description="Match specs solved and installed with rattler on the host, one per item.",
    )
    env_julia: list[str] = Field(
        default_factory=list,
        title="Julia packages",
        description="Packages added with Pkg.add into the environment's Julia project (`Name` or `Name@version`).",
    )
    command: str | None = Field(
        None,
        title="Setup script",
        description="Bash commands run first when the environment is built (a setup script's text).",
    )

    @field_validator("env_pypi", "env_conda", "env_julia", mode="before")
    @classmethod
    def _packages(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError(
                f"{value!r} names a file, which a block cannot reach from another machine; list the packages, or "
                "save the block with CloudSendCluster.from_config(load_config(...)), which reads the file into it"
            )
        return value

    @field_validator("command")
    @classmethod
    def _commands(cls, value: str | None) -> str | None:
        if value is not None and _names_a_script(value):
            raise ValueError(
                f"{value!r} reads as a script file, which a block cannot reach from another machine; give the "
                "script's commands, or save the block with CloudSendCluster.from_config(load_config(...))"
            )
        return value


class _FormSchema(GenerateJsonSchema):
    """The block's JSON Schema without the ``null`` branch of optional fields, for Prefect's UI forms.

    pydantic writes a field that may be ``None`` as ``anyOf: [X, null]`` with ``default: null``, which the UI
    renders as a type switch per field ("str | None", "Property is type None"). A saved block never holds a
    ``None`` (``CloudSendCluster.ser_model`` leaves it out) and a field left out takes its default, so such a
    field is just ``X``, not required.
    """

    def nullable_schema(self, schema: core_schema.NullableSchema) -> JsonSchemaValue:
        """``X | None`` as ``X``."""
        return self.generate_inner(schema["schema"])

    def default_schema(self, schema: core_schema.WithDefaultSchema) -> JsonSchemaValue:
        """A field defaulting to ``None`` as its type alone, without the ``default: null``."""
        if self.get_default_value(schema) is None:
            return self.generate_inner(schema["schema"])
        return super().default_schema(schema)


class CloudSendCluster(Block, ClusterSettings):
    """Where cloudsend runs jobs (instance types) and what they run in (environments)."""

    _block_type_name = "CloudSend Cluster"
    _block_type_slug = "cloudsend-cluster"
    _description = "Instance types and environments that the cloudsend flow runs batches of jobs on."
    _documentation_url = "https://github.com/cloudsend/cloudsend-prefect#the-cluster-block"  # type: ignore[assignment]

    instances: list[InstanceType] = Field(
        min_length=1,
        title="Instance types",
        description="Hosts to run on, at least one type; each type can stand for several instances (`number`).",
    )
    environments: list[ClusterEnvironment] = Field(  # type: ignore[assignment]  # each is an Environment
        default_factory=list,
        title="Environments",
        description="Software the jobs run in, built once per host and reused while unchanged.",
    )

    @classmethod
    def model_json_schema(
        cls,
        by_alias: bool | None = True,
        ref_template: str = "#/definitions/{model}",
        schema_generator: type[GenerateJsonSchema] = _FormSchema,
        mode: JsonSchemaMode = "validation",
        *,
        union_format: Literal["any_of", "primitive_type_array"] = "any_of",  # (Prefect's Block has no such option)
    ) -> dict[str, Any]:
        """Prefect's block schema (what it registers and its UI draws the forms from), optional fields plain."""
        return super().model_json_schema(by_alias is not False, ref_template, schema_generator, mode)

    @model_serializer(mode="wrap")
    def ser_model(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> Any:
        """Prefect's serialization, less what the defaults already say: the UI's edit form shows every saved key.

        No ``None`` is kept (every field that can be ``None`` defaults to it), and an instance type or environment
        keeps only the keys given to it, as in a config file.
        """
        data = super().ser_model(handler, info)
        if not isinstance(data, dict):
            return data
        for key, items in (("instances", self.instances), ("environments", self.environments)):
            if key in data:
                data[key] = [item.model_dump(mode=info.mode, exclude_unset=True, exclude_none=True) for item in items]
        return {key: value for key, value in data.items() if value is not None}

    def to_config(self, jobs: list[Job], base_dir: Path, *, source: str = "") -> BatchConfig:
        """A validated batch: this cluster plus the jobs (their relative paths resolved against ``base_dir``)."""
        source = source or f"block cloudsend-cluster/{self._block_document_name}"
        return settings_config(self, jobs, source=source, base_dir=base_dir)

    @classmethod
    def from_config(cls, config: BatchConfig) -> CloudSendCluster:
        """``config`` without its jobs, the files its environments name read into the block.

        Raises:
            ConfigError: An environment's requirements file or setup script cannot be read (the message names
                the environment, the field and the file), or it names a conda environment file or a Julia
                project, which a block cannot hold yet.
        """
        settings = {name: getattr(config, name) for name in ClusterSettings.model_fields if name != "environments"}
        environments = [_stored_environment(config, env, i) for i, env in enumerate(config.environments)]
        return cls(**settings, environments=environments)


def _stored_environment(config: BatchConfig, env: Environment, index: int) -> ClusterEnvironment:
    """``env`` with the files it names replaced by their text, read now, where the config's paths mean something.

    The text is stored so that the environment's files, and so its hash, are the config's: hosts that built it
    from the config reuse it.
    """
    name = env.name or DEFAULT_ENV_NAME
    for key, kind in (("env_conda", "a conda environment file"), ("env_julia", "a Julia project file")):
        if isinstance(getattr(env, key), str):
            raise ConfigError(
                f"{config.source}: environments[{index}].{key}: environment {name!r}: {kind} cannot be kept in a "
                "block yet; list its packages instead"
            )
    try:
        files = resolve_env(config, env, index).files
    except ConfigError as exc:
        raise ConfigError(
            f"{exc}; environment {name!r} is saved with the contents of its files, so they must be readable when "
            "the block is made"
        ) from None
    data = env.model_dump(exclude_unset=True) | {"name": name}
    if isinstance(env.env_pypi, str):
        data["env_pypi"] = files["requirements.txt"].splitlines()
    if env.command:
        commands = files["setup.sh"].removesuffix("\n")  # inline commands get it back in `setup.sh`
        data["command"] = commands + "\n" if _names_a_script(commands) else commands
    return ClusterEnvironment.model_validate(data)
