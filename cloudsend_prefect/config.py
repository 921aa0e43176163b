"""The user's batch description: pydantic models for globals, instance types, environments and jobs.

The key names are the predecessor's (katapult/cloudsend), so its users' files load unchanged. Keys it
documented that have no meaning here are accepted and reported through ``BatchConfig.notes``; keys it never
had are errors. Everything here is pure data and checks: no Prefect, SSH or boto3.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import math
import os
import posixpath
import re
import unicodedata
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from cloudsend_prefect.naming import host_names

Provider = Literal["local", "ssh", "aws"]
MatrixValue = str | int | float | bool
# A grid (each parameter's values) or an explicit list of points (each a value per parameter).
Matrix = dict[str, list[MatrixValue]] | list[dict[str, MatrixValue]]
MATRIX_PARAM = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Keys the predecessor documented that this tool accepts but does not use, with the reason told to the user.
IGNORED_GLOBAL_KEYS = {
    "debug": "verbosity is set with Prefect's logging settings (PREFECT_LOGGING_LEVEL)",
    "dev": "environments and instances are always reused by content hash",
    "print_deploy": "bootstrap logs are always kept on the host and shown when a bootstrap fails",
    "mutualize_uploads": "uploads are always stored once per host by content hash",
    "job_assign": "jobs are always placed online on whichever instance has free CPUs",
    "_maestro_name_proj": "there is no maestro instance: the Prefect flow is the controller",
}
# The predecessor's Elastic GPU kind of an instance type: accepted from a config file and ignored with a note.
RETIRED_INSTANCE_KEY = "gpu"
RETIRED_INSTANCE_WHY = "AWS retired Elastic GPUs; choose a GPU instance type (g5.xlarge, ...) and give jobs `gpus_req`"
AWS_ONLY_KEYS = (
    "region",
    "type",
    "img_id",
    "img_username",
    "disk_size",
    "disk_type",
    "eco",
    "max_bid",
    "eco_life",
    "cloud_id",
    "address",
    "fallback_types",
    "zones",
)
SSH_ONLY_KEYS = ("host", "port", "user", "key_file", "host_key", "accept_new_host_key", "remote_dir")

# Names that become one path component, an AWS tag, a key file name or a host name.
SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
SLUG_PATTERN = f"^{SLUG.pattern}$"  # the same rule, for the JSON Schema
SLUG_MAX = 63  # a DNS label's length: the strictest place such a name goes
JOB_NAME_MAX = 128
# Bounds that keep a typo (an extra zero or ten) from becoming hours of work or a stuck batch.
MAX_SECONDS = 30 * 24 * 3600  # 30 days
MAX_JOB_RUNS = 1_000_000  # all jobs' `repeat`s together
MAX_GPUS = 64  # GPUs of one instance (EC2's largest have 16)
DEFAULT_MAX_OUTPUT_MB = 10240  # a job run's outputs together, and each of its logs, fetched at most (10 GiB)
# Unicode categories that are never part of a readable name: controls, format marks (bidi overrides,
# zero-width joiners), surrogates (not encodable) and line/paragraph separators.
_UNPRINTABLE = {"Cc", "Cf", "Cs", "Zl", "Zp"}
# OpenSSH public key types paramiko can check a host against.
HOST_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)


def split_ignored(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Drop the predecessor's global keys that mean nothing here, saying why for each.

    Args:
        data: A config's mapping, as read from its file.

    Returns:
        The mapping without those keys, and a note for each of them, and for each instance type given the
        retired ``gpu`` (which ``InstanceType`` drops).
    """
    notes = [f"'{key}' is ignored: {why}" for key, why in IGNORED_GLOBAL_KEYS.items() if key in data]
    instances = data.get("instances")
    listed = [instances] if isinstance(instances, dict) else instances if isinstance(instances, list) else []
    for i, inst in enumerate(listed):
        if isinstance(inst, dict) and inst.get(RETIRED_INSTANCE_KEY) is not None:
            notes.append(f"instances[{i}]: '{RETIRED_INSTANCE_KEY}' is ignored: {RETIRED_INSTANCE_WHY}")
    return {k: v for k, v in data.items() if k not in IGNORED_GLOBAL_KEYS}, notes


def _as_list(value: Any) -> Any:
    """The predecessor accepted a comma-separated string wherever a list of names was expected."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def unprintable_char(value: str) -> str | None:
    """The first character of ``value`` that has no business in a name or a path, as ``U+000A``."""
    bad = next((ch for ch in value if unicodedata.category(ch) in _UNPRINTABLE), None)
    return None if bad is None else f"U+{ord(bad):04X}"


def check_printable(value: str, what: str = "") -> str:
    """A control character in a file name or host setting ends up in a shell line, a log or a path; refuse it."""
    bad = unprintable_char(value)
    if bad:
        raise ValueError(f"{what}contains a control character ({bad})")
    return value


def check_slug(value: str) -> str:
    """Project, instance and environment names go into paths, AWS tags, key file and host names."""
    if not SLUG.fullmatch(value):
        raise ValueError("use letters, digits, '.', '_' and '-' only, starting with a letter or digit")
    if len(value) > SLUG_MAX:
        raise ValueError(f"at most {SLUG_MAX} characters (it has {len(value)})")
    return value


def check_job_name(value: str) -> str:
    """A job name is the results folder's name and the task run's: one safe, printable path component.

    Anything printable is allowed otherwise (``[bold]`` is a fine name: the CLI escapes markup); a ``/``
    is not, as the results folder ``<results>/<name>`` would become nested folders.
    """
    bad = unprintable_char(value)
    if bad:
        raise ValueError(f"contains a control character ({bad})")
    if not value.strip():
        raise ValueError("empty")
    if value != value.strip():
        raise ValueError("leading or trailing whitespace")
    if len(value) > JOB_NAME_MAX:
        raise ValueError(f"at most {JOB_NAME_MAX} characters (it has {len(value)})")
    if "/" in value or "\\" in value:
        raise ValueError("must be one path component: no '/' or '\\'")
    if value in (".", ".."):
        raise ValueError("'.' and '..' are not names")
    if value.startswith("-"):
        raise ValueError("must not start with '-' (it would read as an option)")
    return value


def check_matrix(value: Matrix) -> Matrix:
    """Parameters named like identifiers (``{name}`` placeholders), values given, and at most
    ``MAX_JOB_RUNS`` points, counted before anything is expanded."""
    if isinstance(value, dict):
        names, count = list(value), 1
        for name, values in value.items():
            if not values:
                raise ValueError(f"{name}: no values (a grid parameter needs at least one)")
            count *= len(values)
            if count > MAX_JOB_RUNS:
                raise ValueError(f"the grid has more than {MAX_JOB_RUNS} points")
    else:
        if not value:
            raise ValueError("an empty list of points")
        names = list(value[0])
        for i, point in enumerate(value):
            if list(point) != names and set(point) != set(names):
                raise ValueError(
                    f"[{i}]: parameters {sorted(point)} differ from the first point's {sorted(names)}; "
                    "every point gives the same parameters"
                )
    if not names:
        raise ValueError("no parameters")
    for name in names:
        if not MATRIX_PARAM.fullmatch(name):
            raise ValueError(f"{name!r}: a parameter name is letters, digits and '_', not starting with a digit")
    return value


def matrix_size(matrix: Matrix | None) -> int:
    """How many points a matrix has (1 for no matrix), counted without expanding it."""
    if matrix is None:
        return 1
    if isinstance(matrix, list):
        return len(matrix)
    return math.prod(len(values) for values in matrix.values())


def check_no_nul(value: str) -> str:
    """A NUL byte cannot be passed to a shell or a process: it would cut the line short."""
    if "\0" in value:
        raise ValueError("contains a NUL byte")
    return value


def check_host_key(value: str) -> str:
    """``<type> <base64> [comment]`` whose base64 really is a key of that type, as paramiko will need it."""
    parts = value.split()
    if len(parts) < 2:
        raise ValueError("expected an OpenSSH public key line, '<type> <base64> [comment]' (as in ssh-keyscan output)")
    kind, blob = parts[0], parts[1]
    if kind not in HOST_KEY_TYPES:
        raise ValueError(f"unknown key type {kind!r} (known: {', '.join(HOST_KEY_TYPES)})")
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the key after {kind!r} is not valid base64") from None
    size = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else -1
    if raw[4 : 4 + size] != kind.encode():
        raise ValueError(f"the base64 part is not a {kind} key (its embedded type does not match)")
    return value


def check_remote_dir(value: str) -> str:
    """cloudsend owns what is under ``remote_dir`` (and cleans it): never a home, the root, or a path that climbs."""
    check_printable(value)
    hint = "must be a dedicated directory, e.g. ~/.cloudsend"
    stripped = value.strip()
    if not stripped.strip("/") or posixpath.normpath(stripped) in (".", "~"):
        raise ValueError(hint)
    if ".." in PurePosixPath(stripped).parts:
        raise ValueError(f"{hint}, without '..'")
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _none_is_default(cls, data: Any) -> Any:
        """The predecessor wrote ``key: None`` for "the default" (``cpus_req: None`` is 1 CPU): drop those."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (v is None and k in cls.model_fields)}
        return data


class InstanceType(_Strict):
    """A kind of host; ``number`` copies of it are used (``explode`` splits a large CPU need)."""

    provider: Provider | None = Field(
        None, title="Provider", description="Overrides the global provider for this instance type."
    )
    name: str | None = Field(
        None,
        title="Name",
        description="A label for these instances in logs and tables; names their hosts.",
        json_schema_extra={"pattern": SLUG_PATTERN, "maxLength": SLUG_MAX},
    )
    cpus: int | None = Field(
        None,
        ge=1,
        le=100_000,
        title="CPUs",
        description="CPU slots jobs are packed into. local: defaults to this machine's CPU count; "
        "aws: defaults to the type's vCPUs.",
    )
    number: int = Field(1, ge=1, le=1000, title="Number", description="How many instances of this type.")
    explode: bool = Field(
        False,
        title="Explode",
        description="aws: split `cpus` over several instances of at most the type's vCPUs each.",
    )
    # aws
    region: str | None = Field(None, title="Region", description="aws: the EC2 region.")
    type: str | None = Field(None, title="Instance type", description="aws: the EC2 instance type.")
    gpus: int | None = Field(
        None,
        ge=0,
        le=MAX_GPUS,
        title="GPUs",
        description="GPUs jobs are packed into (see a job's `gpus_req`). aws: defaults to the type's GPU count; "
        "local and ssh: 0 unless given.",
    )
    img_id: str | None = Field(None, title="Image id", description="aws: AMI id (default: latest Ubuntu LTS).")
    img_username: str | None = Field(
        None,
        title="Image user",
        description="aws: the login user of the image (default: the image's own, from its name: ubuntu for Ubuntu, "
        "admin for Debian, ec2-user for Amazon Linux, RHEL and SUSE).",
    )
    disk_size: int | None = Field(None, ge=1, le=65536, title="Disk size (GiB)", description="aws: root volume size.")
    disk_type: str | None = Field(None, title="Disk type", description="aws: EBS volume type (gp3, io2...).")
    eco: bool = Field(False, title="Spot", description="aws: use spot capacity.")
    max_bid: float | None = Field(
        None, gt=0, le=1000, allow_inf_nan=False, title="Max spot price", description="aws: USD per hour."
    )
    eco_life: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        title="Spot request life (hours)",
        description="aws: how long a spot request stays valid.",
    )
    cloud_id: str | None = Field(None, title="VPC id", description="aws: VPC to use (default VPC otherwise).")
    zones: list[str] = Field(
        default_factory=list,
        title="Availability zones",
        description="aws: zones to try in order when one lacks capacity (default: the VPC's default subnet).",
    )
    fallback_types: list[str] = Field(
        default_factory=list,
        title="Fallback instance types",
        description="aws: types tried in order when `type` has no capacity or quota left.",
    )
    address: str = Field(
        "public",
        title="Reach instances by",
        description="aws: 'public' address (default), 'private' (when running inside the VPC), or the name "
        "of an address resolver registered in cloudsend_prefect.providers.aws.ADDRESS_RESOLVERS.",
    )
    # ssh
    host: str | None = Field(None, title="Host", description="ssh: host name or address.")
    port: int = Field(22, ge=1, le=65535, title="SSH port", description="ssh: port of the host's sshd.")
    user: str | None = Field(None, title="User", description="ssh: login user (default: your user name).")
    key_file: str | None = Field(None, title="Key file", description="ssh: private key file.")
    host_key: str | None = Field(
        None, title="Pinned host key", description="ssh: the host's public key line, checked on connect."
    )
    accept_new_host_key: bool = Field(
        False,
        title="Accept new host key",
        description="ssh: record an unknown host key on first contact (like StrictHostKeyChecking=accept-new).",
    )
    remote_dir: str | None = Field(
        None, title="Remote base dir", description="Where cloudsend keeps its files on the host."
    )

    @model_validator(mode="before")
    @classmethod
    def _retired_key(cls, data: Any) -> Any:
        """The predecessor's ``gpu`` (an Elastic GPU kind) never did anything: dropped, so that its configs and
        blocks saved with it still load; a config file's gets a note (``split_ignored``)."""
        if isinstance(data, dict) and RETIRED_INSTANCE_KEY in data:
            return {k: v for k, v in data.items() if k != RETIRED_INSTANCE_KEY}
        return data

    @field_validator("eco_life", mode="before")
    @classmethod
    def _hours(cls, value: Any) -> Any:
        if hasattr(value, "total_seconds"):  # the predecessor's timedelta
            return value.total_seconds() / 3600
        return value

    @field_validator("max_bid", mode="before")
    @classmethod
    def _bid(cls, value: Any) -> Any:
        if isinstance(value, str):  # the predecessor's max_bid was a string, e.g. '0.01'
            try:
                return float(value)
            except ValueError:
                raise ValueError("expected a price in USD per hour, like 0.05") from None
        return value

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str | None) -> str | None:
        return None if value is None else check_slug(value)

    @field_validator("host", "user", "key_file")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        return None if value is None else check_printable(value)

    @field_validator("host_key")
    @classmethod
    def _host_key(cls, value: str | None) -> str | None:
        return None if value is None else check_host_key(value)

    @field_validator("remote_dir")
    @classmethod
    def _remote_dir(cls, value: str | None) -> str | None:
        return None if value is None else check_remote_dir(value)


class Environment(_Strict):
    """Software a job runs in, bootstrapped once per host and reused by content hash."""

    name: str | None = Field(
        None,
        title="Name",
        description="Needed when there is more than one environment.",
        json_schema_extra={"pattern": SLUG_PATTERN, "maxLength": SLUG_MAX},
    )
    env_pypi: list[str] | str | None = Field(
        None,
        title="pip packages",
        description="A list of requirements, or a requirements.txt file (or a folder holding one). With env_conda "
        "they go into the conda environment's python, else into a venv.",
    )
    env_conda: list[str] | str | None = Field(
        None,
        title="conda packages",
        description="A list of match specs, or an environment.yml file (or a folder holding one; its pip section "
        "is installed too). Solved and installed with rattler on the host.",
    )
    env_conda_channels: list[str] | None = Field(
        None,
        title="conda channels",
        description="Channel names or URLs (file:// too), searched in order; default conda-forge.",
    )
    env_aptget: list[str] | None = Field(None, title="apt packages", description="Installed with apt-get.")
    env_julia: list[str] | str | None = Field(
        None,
        title="Julia packages",
        description="Packages added with Pkg.add (`Name` or `Name@version`), or a Project.toml file (with the "
        "Manifest.toml beside it, if any) or a folder holding one, written with a '/'. Jobs' julia runs in it.",
    )
    command: str | None = Field(
        None,
        title="Setup command",
        description="A bash script file (or inline commands) run first when the environment is built.",
    )

    _norm = field_validator("env_conda_channels", "env_aptget", mode="before")(lambda value: _as_list(value))

    @field_validator("env_julia", mode="before")
    @classmethod
    def _julia(cls, value: Any) -> Any:
        """A path (``.toml``, or with a ``/``) names a project; other text is the predecessor's "A, B" list."""
        if isinstance(value, str) and (value.strip().endswith(".toml") or "/" in value):
            return value.strip()
        return _as_list(value)

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str | None) -> str | None:
        return None if value is None else check_slug(value)

    @field_validator("command")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        return None if value is None else check_no_nul(value)


class Job(_Strict):
    """One script or command; ``repeat`` runs it several times."""

    name: str | None = Field(
        None,
        title="Name",
        description="Names the job's task run and results folder: one path component, unique in the batch.",
        json_schema_extra={"maxLength": JOB_NAME_MAX, "pattern": r"^[^-/\\\s]([^/\\]*\S)?$"},
    )
    run_script: str | None = Field(
        None,
        title="Script",
        description="`path args...`: .py runs with python, .jl with julia, .sh with bash.",
    )
    run_command: str | None = Field(None, title="Command", description="Any shell command (bash).")
    args: list[str] = Field(
        default_factory=list, title="Arguments", description="Extra arguments passed literally, one per item."
    )
    upload_files: list[str] = Field(
        default_factory=list,
        title="Files to upload",
        description="Placed in the run directory at their path relative to the config's folder (else by name).",
    )
    input_files: list[str] = Field(
        default_factory=list,
        title="Input files (uploaded)",
        description="The predecessor's name for files to upload: placed in the run directory as upload_files are.",
    )
    output_files: list[str] = Field(
        default_factory=list, title="Output files", description="Must exist when the job ends; fetched back."
    )
    cpus_req: int = Field(
        1, ge=1, le=100_000, title="CPUs needed", description="CPU slots the job occupies on its host while it runs."
    )
    gpus_req: int = Field(
        0,
        ge=0,
        le=MAX_GPUS,
        title="GPUs needed",
        description="GPUs the job has to itself: it runs on an instance with that many, and CUDA_VISIBLE_DEVICES "
        "lists the ones it was given.",
    )
    env_name: str | None = Field(
        None,
        title="Environment",
        description="The environment the job runs in (by its name); default: the only one, if there is one.",
    )
    repeat: int = Field(1, ge=1, le=100_000, title="Repeat", description="Run this many copies.")
    matrix: Matrix | None = Field(
        None,
        title="Matrix (parameter sweep)",
        description="Run the job once per point: a grid ({lr: [0.1, 0.01], depth: [3, 5]}: every combination) "
        "or a list of points ([{lr: 0.1, depth: 3}, ...]). {lr} in run_script, run_command, args, name and file "
        "lists is replaced by the point's value; each point is a job of its own, named by its parameters.",
        json_schema_extra={
            "examples": [{"lr": [0.1, 0.01], "depth": [3, 5]}, [{"lr": 0.1, "depth": 3}, {"lr": 0.01, "depth": 8}]]
        },
    )
    max_retries: int = Field(
        0,
        ge=0,
        le=100,
        title="Retries on failure",
        description="How many more times the job runs when it does not end done (as Prefect task retries).",
    )
    timeout: float | None = Field(
        None,
        gt=0,
        le=MAX_SECONDS,
        allow_inf_nan=False,
        title="Timeout (s)",
        description="Kill the job after this long (at most 30 days).",
    )
    expected_duration: float | None = Field(
        None,
        gt=0,
        le=MAX_SECONDS,
        allow_inf_nan=False,
        title="Expected duration (s)",
        description="How long the job is expected to take: `cloudsend plan` schedules it by this (default 1 s).",
    )
    max_output_mb: float = Field(
        DEFAULT_MAX_OUTPUT_MB,
        gt=0,
        le=10_000_000,
        allow_inf_nan=False,
        title="Output limit (MiB)",
        description="The most a run's output files may hold together (and each of its logs) to be fetched; a "
        "run over it ends aborted, and a longer log keeps its end.",
    )

    _lists = field_validator("upload_files", "input_files", "output_files", mode="before")(
        lambda value: _as_list(value) if value is not None else []
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else check_job_name(value)

    @field_validator("upload_files", "input_files", "output_files")
    @classmethod
    def _file_names(cls, value: list[str]) -> list[str]:
        for name in value:
            check_printable(name, f"{name!r}: a file name ")
        return value

    @field_validator("run_command")
    @classmethod
    def _command(cls, value: str | None) -> str | None:
        return None if value is None else check_no_nul(value)

    @field_validator("run_script")
    @classmethod
    def _script(cls, value: str | None) -> str | None:
        if value is None:
            return None
        check_no_nul(value)
        # whitespace between a script's arguments may be a tab or a folded line's end; any other control is not
        check_printable(re.sub(r"[\t\n\r]", " ", value))
        return value

    @field_validator("args")
    @classmethod
    def _args(cls, value: list[str]) -> list[str]:
        for arg in value:
            check_no_nul(arg)
        return value

    @field_validator("matrix")
    @classmethod
    def _matrix(cls, value: Matrix | None) -> Matrix | None:
        return None if value is None else check_matrix(value)

    @property
    def runs(self) -> int:
        """How many job runs this job stands for: its matrix's points times its `repeat`."""
        return matrix_size(self.matrix) * self.repeat

    @model_validator(mode="after")
    def _one_of(self) -> Job:
        given = [key for key in ("run_script", "run_command") if (getattr(self, key) or "").strip()]
        if len(given) != 1:
            which = "both are" if given else "neither is"
            raise ValueError(f"give exactly one of run_script or run_command ({which} set)")
        return self


class ClusterSettings(BaseModel):
    """Where and how a batch runs: everything but the jobs. The config file and the Prefect block share it."""

    project: str = Field(
        "cloudsend",
        title="Project",
        description="Names and tags what this batch creates.",
        json_schema_extra={"pattern": SLUG_PATTERN, "maxLength": SLUG_MAX},
    )
    provider: Provider = Field("local", title="Provider", description="Default provider of instance types.")
    profile: str | None = Field(None, title="AWS profile", description="aws: profile used without a block.")
    auto_stop: bool | Literal["terminate"] = Field(
        True,
        title="Auto stop",
        description="Stop instances cloudsend created when the batch is over ('terminate' removes them; "
        "false keeps them running, and says how to remove them).",
    )
    idle_minutes: float = Field(
        30,
        gt=0,
        le=10080,
        allow_inf_nan=False,
        title="Idle shutdown (minutes)",
        description="aws: each instance shuts itself down after this long with no job running and no client in "
        "contact, even if the client died, also after a restart (its dead-man switch).",
    )
    aws_credentials: str | None = Field(
        None,
        title="AWS credentials block",
        description="aws: name of a prefect-aws AwsCredentials block (else `profile`, else the default chain).",
    )
    key_secret: str | None = Field(
        None,
        title="Key secret block",
        description="aws: also keep the SSH private key in Prefect Secret blocks named `<this>-<region>`, and "
        "take it from there on machines that lack the key file (a worker elsewhere).",
    )
    ssh_from: list[str] | None = Field(
        None,
        title="SSH allowed from",
        description="aws: CIDRs allowed to reach instances' SSH port (default: your public address as /32, "
        "looked up once). 0.0.0.0/0 only if you write it here.",
    )

    pass_env: list[str] = Field(
        default_factory=list,
        title="Environment variables passed",
        description="local: the client's environment variables (names, or patterns like MYAPP_*) that jobs "
        "and environment builds get, besides login, locale, TLS, proxy and pip/uv/conda settings.",
    )

    @field_validator("project")
    @classmethod
    def _project(cls, value: str) -> str:
        return check_slug(value)

    @field_validator("pass_env")
    @classmethod
    def _variables(cls, value: list[str]) -> list[str]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z_*?][A-Za-z0-9_*?]*", name):
                raise ValueError(f"{name!r} is not a variable name or pattern (letters, digits, '_', '*', '?')")
        return value

    @field_validator("ssh_from")
    @classmethod
    def _cidrs(cls, value: list[str] | None) -> list[str] | None:
        for cidr in value or []:
            try:
                ipaddress.ip_network(cidr.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not an address or CIDR block (like 203.0.113.5/32)") from None
        return value

    poll_interval: float = Field(
        1.0,
        ge=0.05,
        le=3600,
        allow_inf_nan=False,
        title="Poll interval (s)",
        description="How often hosts are watched.",
    )
    lost_after: float = Field(
        120,
        ge=1,
        le=86400,
        allow_inf_nan=False,
        title="Lost after (s)",
        description="A host that answers no round trip for this long is declared lost (its unfinished jobs run "
        "again elsewhere); a stopped or terminated instance is declared lost at once, from the cloud API.",
    )
    replace_lost: int | None = Field(
        None,
        ge=0,
        le=10000,
        title="Replace lost instances",
        description="aws: how many lost instances (terminated, preempted, unreachable) a batch may replace with "
        "new ones while it runs; default: twice as many as it starts with; 0 replaces none.",
    )
    instances: list[InstanceType] = Field(
        default_factory=lambda: [InstanceType()],
        min_length=1,
        title="Instance types",
        description="Hosts to run on; each type can stand for several instances (`number`).",
    )
    environments: list[Environment] = Field(
        default_factory=list,
        title="Environments",
        description="Software the jobs run in, built once per host and reused while unchanged.",
    )

    @model_validator(mode="after")
    def _periods(self) -> ClusterSettings:
        """A host is only declared lost after at least one poll could have heard from it."""
        if self.lost_after <= self.poll_interval:
            raise ValueError(
                f"lost_after: {self.lost_after:g} s must be longer than poll_interval ({self.poll_interval:g} s)"
            )
        return self


class BatchConfig(ClusterSettings, _Strict):
    """A whole batch: the cluster settings, the predecessor's globals, and the jobs."""

    recover: bool = Field(
        True,
        title="Recover",
        description="Skip jobs that already finished in an earlier run of the same batch.",
    )
    maestro: Literal["local", "remote", "lambda"] = Field(
        "local",
        title="Maestro",
        description="'local': this machine's flow run is the controller; 'remote': `cloudsend run` submits the batch "
        "to the controller instance (`cloudsend controller up`) and returns; 'lambda' is not built.",
    )
    jobs: list[Job] = Field(
        default_factory=list,
        title="Jobs",
        description="Scripts or commands to run, each in a directory of its own on a host with room for it.",
    )

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _source: str = PrivateAttr(default="<config>")
    _notes: list[str] = PrivateAttr(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _single_items(cls, data: Any) -> Any:
        """The predecessor allowed one dict where a list was expected."""
        if isinstance(data, dict):
            data = {
                k: [v] if k in ("instances", "environments", "jobs") and isinstance(v, dict) else v
                for k, v in data.items()
            }
        return data

    @model_validator(mode="after")
    def _links(self) -> BatchConfig:
        names = [env.name for env in self.environments]
        if len(self.environments) > 1 and None in names:
            raise ValueError(f"environments[{names.index(None)}].name: required when there are several")
        dupes = {n for n in names if n is not None and names.count(n) > 1}
        if dupes:
            raise ValueError(f"environments: duplicate name {sorted(dupes)[0]!r}")
        for i, job in enumerate(self.jobs):
            if job.env_name is not None and job.env_name not in names:
                known = ", ".join(repr(n) for n in names if n) or "none defined"
                raise ValueError(f"jobs[{i}].env_name: no environment named {job.env_name!r} (known: {known})")
        self._check_jobs()
        labels = [inst.name for inst in self.instances if inst.name]
        if len(labels) != len(set(labels)):
            raise ValueError(f"instances: duplicate name {next(n for n in labels if labels.count(n) > 1)!r}")
        self._check_host_names()
        for i, inst in enumerate(self.instances):
            provider = self.provider_of(inst)
            if provider == "ssh" and not inst.host:
                raise ValueError(f"instances[{i}].host: required for the ssh provider")
            if provider == "ssh" and inst.host_key is not None and inst.accept_new_host_key:
                raise ValueError(
                    f"instances[{i}].accept_new_host_key: contradicts host_key (a pinned key is never replaced by "
                    "a new one); remove one of them"
                )
            if provider == "ssh" and inst.number != 1:
                raise ValueError(f"instances[{i}].number: an ssh host is one machine; list each host once")
        self.check_fit([(self.instance_cpus(inst), self.instance_gpus(inst)) for inst in self.instances])
        return self

    def check_fit(self, shapes: list[tuple[int, int]]) -> None:
        """Every job fits one instance of some type, given each type's (CPUs, GPUs): as the config knows them
        here, and again as their providers know them offline (``providers.validate``: the aws catalog).

        Raises:
            ValueError: ``jobs[<i>].cpus_req`` (or ``gpus_req``): ... fit no instance.
        """
        biggest = max(cpus for cpus, _ in shapes)
        most_gpus = max(gpus for _, gpus in shapes)
        for i, job in enumerate(self.jobs):
            if job.cpus_req > biggest:
                raise ValueError(f"jobs[{i}].cpus_req: {job.cpus_req} CPUs fit no instance (the largest has {biggest})")
            if job.gpus_req > most_gpus:
                raise ValueError(
                    f"jobs[{i}].gpus_req: {job.gpus_req} GPUs fit no instance (the most any has is {most_gpus}): "
                    "use a GPU instance type (aws, e.g. g5.12xlarge has 4) or give a local or ssh instance `gpus`"
                )

    def _check_jobs(self) -> None:
        """Explicit names are distinct, and the runs are counted before `repeat` expands anything. (A sweep's
        name is a template its points fill in: their names are checked once made, in ``specs``.)"""
        runs = sum(job.runs for job in self.jobs)
        if runs > MAX_JOB_RUNS:
            raise ValueError(
                f"jobs: {runs} runs in all (matrix points times `repeat`), more than the limit of {MAX_JOB_RUNS}"
            )
        first: dict[str, int] = {}
        for i, job in enumerate(self.jobs):
            if job.name is None or job.matrix is not None:
                continue
            if job.name in first:
                raise ValueError(
                    f"jobs[{i}].name: duplicate job name {job.name!r} (also the name of jobs[{first[job.name]}])"
                )
            first[job.name] = i

    def _check_host_names(self) -> None:
        """Two instance types must not name a host alike: the second would be taken for the first.

        Names are those of ``naming.host_names``, which every provider uses (the parts of `explode` are left out,
        as their number needs the type's vCPUs).
        """
        owner: dict[str, int] = {}
        for i, inst in enumerate(self.instances):
            for name in host_names(inst.name, self.provider_of(inst), i, inst.number):
                if name in owner and owner[name] != i:
                    raise ValueError(f"instances[{i}]: host name {name!r} is also used by instances[{owner[name]}]")
                owner[name] = i

    def provider_of(self, inst: InstanceType) -> Provider:
        """The provider of an instance type: its own ``provider``, else the config's."""
        return inst.provider or self.provider

    def instance_cpus(self, inst: InstanceType) -> int:
        """CPUs of one instance of this type, before any cloud lookup."""
        if inst.cpus is not None:
            return inst.cpus
        if self.provider_of(inst) == "local":
            return os.cpu_count() or 1
        return 1 << 30  # unknown until the provider asks the cloud; checked again at provisioning

    def instance_gpus(self, inst: InstanceType) -> int:
        """GPUs of one instance of this type, before any provider lookup (aws: unknown here, taken to be what a
        job asks; its provider knows the type's count, see ``providers.validate``)."""
        if inst.gpus is not None:
            return inst.gpus
        return MAX_GPUS if self.provider_of(inst) == "aws" else 0

    def env_for(self, job: Job) -> Environment | None:
        """The job's environment: the named one, or the only one when there is exactly one."""
        if job.env_name is not None:
            return next(env for env in self.environments if env.name == job.env_name)
        return self.environments[0] if len(self.environments) == 1 else None

    @property
    def base_dir(self) -> Path:
        """Relative paths in the config (scripts, uploads, env files) are relative to this directory."""
        return self._base_dir

    @property
    def source(self) -> str:
        """Where the config came from (its file, or the block), as messages name it."""
        return self._source

    @property
    def notes(self) -> list[str]:
        """Warnings about accepted-but-unused keys, for the CLI and the flow log."""
        return list(self._notes)

    def located(self, base_dir: Path, source: str, notes: list[str] = []) -> BatchConfig:  # noqa: B006
        """Attach where the config came from (for relative paths and messages) and the load-time notes."""
        self._base_dir = base_dir
        self._source = source
        self._notes = [*notes, *self._provider_notes()]
        if self.profile is not None and all(self.provider_of(inst) != "aws" for inst in self.instances):
            self._notes.append("'profile' is ignored: it selects AWS credentials and no instance uses the aws provider")
        if self.maestro == "lambda":
            self._notes.append(
                "maestro 'lambda' is not built: the Prefect flow runs the batch (see docs/controller.md)"
            )
        return self

    def _provider_notes(self) -> list[str]:
        notes = []
        for i, inst in enumerate(self.instances):
            provider = self.provider_of(inst)
            # only keys given a value other than their default: `eco: False` or `region: None` asks for nothing
            given = [k for k in inst.model_fields_set if getattr(inst, k) != InstanceType.model_fields[k].default]
            unused = [k for k in given if k in AWS_ONLY_KEYS] if provider != "aws" else []
            unused += [k for k in given if k in SSH_ONLY_KEYS] if provider != "ssh" else []
            if provider != "aws" and inst.explode:
                unused.append("explode")
            if unused:
                notes.append(
                    f"instances[{i}]: {', '.join(sorted(unused))} ignored: not used by the {provider} provider"
                )
        return notes
