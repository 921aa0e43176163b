"""The provider interface: turn instance types into reachable hosts, report on them, remove them.

A provider module (``local``, ``ssh``, ``aws``) exposes three functions and nothing else; cloud SDKs are
imported inside them so that using one provider never imports another's dependencies.
"""

from __future__ import annotations

from typing import Literal, Protocol

from pydantic import BaseModel, Field

from cloudsend_prefect.config import BatchConfig, InstanceType

HostHealth = Literal["running", "stopped", "terminated", "unreachable", "unknown"]


class HostInfo(BaseModel):
    """Everything needed to reach one host and run jobs on it (serialisable: it is a task result)."""

    name: str
    provider: str
    cpus: int = Field(ge=1)
    gpus: int = Field(0, ge=0, description="GPUs jobs are packed into; a job sees its own in CUDA_VISIBLE_DEVICES.")
    base_dir: str = Field(description="Where the host runtime keeps files on the host (absolute or ~-relative).")
    address: str | None = None
    port: int = 22
    user: str | None = None
    key_file: str | None = None
    host_key: str | None = None
    known_hosts: str | None = None
    accept_new_host_key: bool = False
    instance_id: str | None = None
    region: str | None = None
    aws_credentials: str | None = Field(None, description="AwsCredentials block name the instance was made with.")
    aws_profile: str | None = None
    instance_type: str | None = None
    spot: bool = False
    idle_seconds: int | None = Field(
        None, description="aws: the instance's dead-man switch limit, re-armed by the batch's client as it connects."
    )
    imds: str | None = Field(
        None, description="aws spot: the instance's metadata service, where EC2 announces an interruption."
    )
    created: bool = Field(False, description="This run created the host, so teardown may remove it.")
    pass_env: list[str] = Field(
        default_factory=list, description="local: the client's variables (names, patterns) its jobs also get."
    )


def host_names(inst: InstanceType, index: int, provider: str) -> list[str]:
    """Stable names of the ``number`` hosts of the instance type at ``index`` in the config."""
    stem = inst.name or f"{provider}-{index}"
    return [stem] if inst.number == 1 else [f"{stem}.{copy}" for copy in range(inst.number)]


class Provider(Protocol):
    def provision(
        self, config: BatchConfig, instances: list[tuple[int, InstanceType]], *, create: bool = True
    ) -> list[HostInfo]:
        """Hosts for these instance types (with their index in the config, which names them), reusing existing
        ones; with ``create=False`` only the existing ones, creating nothing."""
        ...

    def status(self, hosts: list[HostInfo]) -> dict[str, HostHealth]:
        """Each host's state by name, from the provider's own evidence (cloud API, reachability)."""
        ...

    def teardown(self, hosts: list[HostInfo], *, terminate: bool = False) -> None:
        """Stop (or terminate) the hosts this provider created; leave users' own machines alone."""
        ...
