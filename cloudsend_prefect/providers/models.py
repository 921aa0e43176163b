"""The hosts that cross the provider interface: a provisioned host, a planned one, and what its runtime must
do for it. What only a provider reads of a host is kept in its ``provider_data``, opaque to the rest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

HostHealth = Literal["running", "stopped", "terminated", "unreachable", "unknown"]
REMOTE_BASE_DIR = ".cloudsend"  # a remote host's runtime folder unless the config names one: in the login's home


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
    machine_id: str | None = Field(
        None,
        description="The cloud's id of the machine (an EC2 instance id), for logs and cost rows; None for the "
        "user's own machines, which no cloud bills or can be asked about.",
    )
    created: bool = Field(False, description="This run created the host, so teardown may remove it.")
    pass_env: list[str] = Field(
        default_factory=list, description="local: the client's variables (names, patterns) its jobs also get."
    )
    provider_data: dict[str, Any] = Field(
        default_factory=dict, description="What only the host's provider reads (aws: region, credentials, market)."
    )

    @property
    def billed(self) -> bool:
        """Whether a cloud bills the host, and so can be asked whether it still runs."""
        return self.machine_id is not None


class PlannedHost(BaseModel):
    """A host the config asks for, as known before it exists (``cloudsend plan``, its cost estimate)."""

    name: str
    provider: str
    index: int = Field(description="Of its instance type in the config.")
    cpus: int
    gpus: int = 0
    cpus_known: bool = Field(True, description="False: its provider cannot tell offline; counted as 1.")
    kind: str | None = Field(None, description="The machine type (an EC2 instance type), for the user.")
    machine_id: str | None = Field(None, description="Never known before provisioning (a cost row shows it).")
    provider_data: dict[str, Any] = Field(default_factory=dict, description="What only its provider reads.")


@dataclass(frozen=True)
class Upkeep:
    """What the host runtime does for a host beside running jobs: re-arm its dead-man switch (``idle_seconds``)
    and read its cloud's interruption notices (``notices``: the metadata service's address)."""

    idle_seconds: int | None = None
    notices: str | None = None
