"""The provider interface: what every provider module (``local``, ``ssh``, ``aws``) exposes. ``providers/__init__.py``
routes each call to the provider of each instance type or host; the models crossing the interface are in
``providers.models``.

A provider module exposes the functions of ``Provider`` and nothing else; cloud SDKs are imported inside them,
so that using one provider never imports another's dependencies. What only a provider reads of a host (aws:
region, credentials, market) is kept in the host's ``provider_data``, opaque to the rest of the package.
"""

from __future__ import annotations

from typing import Any, Protocol

from cloudsend_prefect.config import BatchConfig, InstanceType
from cloudsend_prefect.providers.connections import Connections
from cloudsend_prefect.providers.costs import Quote
from cloudsend_prefect.providers.models import HostHealth, HostInfo, PlannedHost, Upkeep

__all__ = ["HostHealth", "HostInfo", "PlannedHost", "Provider", "Upkeep"]


class Provider(Protocol):
    """A provider module. ``connections`` is the run's pool of host connections (``Connections``)."""

    CREATES_HOSTS: bool  # it makes (and bills) machines: it can replace, stop, start and remove them

    def validate(self, config: BatchConfig, index: int, inst: InstanceType) -> None:
        """Raise ``ValueError`` (``instances[<index>].<field>: ...``) for what the provider would only find out
        after creating something."""
        ...

    def shape(self, config: BatchConfig, inst: InstanceType) -> tuple[int, int]:
        """CPUs and GPUs of one instance of this type as known offline, which jobs are checked against when the
        batch is loaded (unknown: more than any job asks; checked again at provisioning)."""
        ...

    def plan(self, config: BatchConfig, index: int, inst: InstanceType) -> list[PlannedHost]:
        """The hosts an instance type will give, named as ``provision`` names them, without creating or
        contacting anything."""
        ...

    def provision(
        self,
        config: BatchConfig,
        instances: list[tuple[int, InstanceType]],
        connections: Connections,
        *,
        create: bool = True,
    ) -> list[HostInfo]:
        """Hosts for these instance types (with their index in the config, which names them), reusing existing
        ones; with ``create=False`` only the existing ones, creating nothing."""
        ...

    def status(self, hosts: list[HostInfo], connections: Connections) -> dict[str, HostHealth]:
        """Each host's state by name, from the provider's own evidence (cloud API, reachability)."""
        ...

    def teardown(self, hosts: list[HostInfo], *, terminate: bool = False) -> None:
        """Stop (or terminate) the hosts this provider created; leave users' own machines alone."""
        ...

    def replace(self, config: BatchConfig, lost: HostInfo, name: str, connections: Connections) -> HostInfo:
        """A new host ``name`` in place of a lost one (only when ``CREATES_HOSTS``)."""
        ...

    def quote(self, hosts: list[Any], *, live: bool) -> tuple[dict[str, Quote], list[str]]:
        """Each host's (``HostInfo`` or ``PlannedHost``) price by name, and notes on them for the user; asking
        the cloud for current prices only when ``live``."""
        ...

    def upkeep(self, host: HostInfo) -> Upkeep:
        """What the host runtime must do for the host beside running jobs."""
        ...

    def places(self, config: BatchConfig, asked: list[str] | None) -> list[str | None]:
        """Where a project's machines are looked for (aws: regions): ``asked``, else the config's."""
        ...

    def machines(self, config: BatchConfig, asked: list[str] | None) -> list[dict[str, Any]]:
        """The project's machines as ``cloudsend instances`` lists them (JSON-ready rows)."""
        ...

    def set_running(
        self, config: BatchConfig, asked: list[str] | None, *, running: bool, ids: list[str] | None
    ) -> list[str]:
        """Start (``running``) or stop the project's machines (all, or only ``ids``); the ids asked to change."""
        ...

    def down(self, config: BatchConfig, asked: list[str] | None) -> list[str]:
        """Remove everything the project created with this provider; what was removed."""
        ...

    def kept_hint(self, config: BatchConfig, hosts: list[HostInfo]) -> str:
        """How the user removes hosts kept running (``auto_stop: false``)."""
        ...
