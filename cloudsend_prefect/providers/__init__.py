"""Providers: ``local`` (this machine), ``ssh`` (existing hosts), ``aws`` (EC2). See ``base`` for the interface.

Each function here routes one request to the provider of each instance type (or host) and gathers the answers,
so that nothing above this layer names a provider or reads what a provider keeps of its hosts.
"""

from __future__ import annotations

import importlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, get_args

from cloudsend_prefect.config import BatchConfig, InstanceType
from cloudsend_prefect.config import Provider as ProviderName
from cloudsend_prefect.errors import ConfigError
from cloudsend_prefect.providers.base import Provider
from cloudsend_prefect.providers.connections import Connections
from cloudsend_prefect.providers.costs import Estimate, Quote, estimate
from cloudsend_prefect.providers.models import HostHealth, HostInfo, PlannedHost, Upkeep

__all__ = [
    "Connections",
    "HostHealth",
    "HostInfo",
    "PlannedHost",
    "Provider",
    "Upkeep",
    "cost_report",
    "creates_hosts",
    "down",
    "get_provider",
    "kept_hint",
    "machines",
    "places",
    "plan",
    "project_providers",
    "provision_all",
    "quote",
    "release",
    "replace",
    "set_running",
    "status",
    "upkeep",
    "validate",
]


def get_provider(name: str) -> Provider:
    """The provider module (imported only when used, so its SDK is too)."""
    module: Provider = importlib.import_module(f"cloudsend_prefect.providers.{name}")
    return module


def validate(config: BatchConfig) -> None:
    """The checks only providers can make of a loaded config, run where the batch is loaded, before anything is
    created: each instance type's own (aws: a type, a known address kind), then that every job fits an instance
    as its provider knows it offline (aws: the catalog's GPU count).

    Raises:
        ConfigError: ``<source>: instances[<i>].<field>: ...`` or ``<source>: jobs[<i>]...: fit no instance``.
    """
    try:
        for index, inst in enumerate(config.instances):
            get_provider(config.provider_of(inst)).validate(config, index, inst)
        config.check_fit([get_provider(config.provider_of(inst)).shape(config, inst) for inst in config.instances])
    except ValueError as exc:
        raise ConfigError(f"{config.source}: {exc}") from None


def plan(config: BatchConfig) -> list[PlannedHost]:
    """The hosts the config asks for, named as their provider will name them, without creating or contacting
    any (aws: ``number`` copies, split by ``explode``, with the catalog's vCPUs instead of EC2's)."""
    return [
        host
        for index, inst in enumerate(config.instances)
        for host in get_provider(config.provider_of(inst)).plan(config, index, inst)
    ]


def provision_all(config: BatchConfig, connections: Connections, *, create: bool = True) -> list[HostInfo]:
    """Hosts of every instance type; if one provider fails, what the others provided is released first."""
    by_provider: dict[str, list[tuple[int, InstanceType]]] = defaultdict(list)
    for index, inst in enumerate(config.instances):
        by_provider[config.provider_of(inst)].append((index, inst))
    hosts: list[HostInfo] = []
    try:
        for name, insts in by_provider.items():
            hosts += get_provider(name).provision(config, insts, connections, create=create)
    except BaseException:
        if create and hosts:
            release(config, hosts, connections)
        raise
    return hosts


def release(config: BatchConfig, hosts: list[HostInfo], connections: Connections) -> list[HostInfo]:
    """Apply ``auto_stop`` to the hosts and close their connections; returns the billed hosts kept running."""
    try:
        if not config.auto_stop:
            return [h for h in hosts if h.billed]
        for name in sorted({h.provider for h in hosts}):
            mine = [h for h in hosts if h.provider == name]
            get_provider(name).teardown(mine, terminate=config.auto_stop == "terminate")
        return []
    finally:
        connections.close(hosts)


def status(host: HostInfo, connections: Connections) -> HostHealth:
    """The host's state from its provider's own evidence (the cloud API, reachability)."""
    return get_provider(host.provider).status([host], connections).get(host.name, "unknown")


def creates_hosts(provider: str) -> bool:
    """Whether the provider makes (and bills) machines, so it can replace, stop, start and remove them."""
    return get_provider(provider).CREATES_HOSTS


def replace(config: BatchConfig, lost: HostInfo, name: str, connections: Connections) -> HostInfo:
    """A new host ``name`` in place of a lost one, by the provider that made it (see ``creates_hosts``)."""
    return get_provider(lost.provider).replace(config, lost, name, connections)


def upkeep(host: HostInfo) -> Upkeep:
    """What the host runtime does for the host beside running jobs (dead-man switch, interruption notices)."""
    return get_provider(host.provider).upkeep(host)


def kept_hint(config: BatchConfig, hosts: list[HostInfo]) -> str:
    """How the user removes hosts kept running after the batch (``auto_stop: false``), provider by provider."""
    hints = [
        get_provider(name).kept_hint(config, [h for h in hosts if h.provider == name])
        for name in sorted({h.provider for h in hosts})
    ]
    return "; ".join(hint for hint in hints if hint)


def quote(hosts: Sequence[HostInfo | PlannedHost], *, live: bool = False) -> tuple[dict[str, Quote], list[str]]:
    """Each host's price by name (its provider's), and the providers' notes on them; the cloud is asked for
    current prices only when ``live``."""
    quotes: dict[str, Quote] = {}
    notes: list[str] = []
    for name in dict.fromkeys(h.provider for h in hosts):
        found, said = get_provider(name).quote([h for h in hosts if h.provider == name], live=live)
        quotes |= found
        notes += said
    return quotes, notes


def cost_report(hosts: Sequence[HostInfo], seconds: float | Mapping[str, float]) -> Estimate | None:
    """The flow's end-of-batch report: what the batch's billed hosts cost while the batch had them up.

    ``seconds``: how long each host was up for the batch, by name (or one figure for all): from provisioning
    (a replacement: from its launch) to its stop, early or at teardown; an upper bound, as a cloud starts
    billing once a machine runs. Spot hosts are priced at the cloud's current price when it answers, else at
    the on-demand price. None when no host is billed.
    """
    billed = [h for h in hosts if h.billed]
    if not billed:
        return None
    quotes, _ = quote(billed, live=True)
    return estimate([quotes[h.name] for h in billed], seconds)


def project_providers(config: BatchConfig, *, from_file: bool, creating: bool = False) -> list[str]:
    """The providers a project's fleet commands ask: a config file's own; a bare project name (no file) may
    have machines with every provider that creates them. ``creating``: only providers that create hosts (what
    can be stopped, started or removed)."""
    if from_file:
        names: list[str] = list(dict.fromkeys(config.provider_of(inst) for inst in config.instances))
        return [name for name in names if creates_hosts(name)] if creating else names
    return [name for name in get_args(ProviderName) if creates_hosts(name)]


def places(config: BatchConfig, providers: list[str], asked: list[str] | None) -> list[str | None]:
    """Where the providers look for the project's machines (aws: regions), ``asked`` else the config's."""
    return list(dict.fromkeys(p for name in providers for p in get_provider(name).places(config, asked)))


def machines(config: BatchConfig, providers: list[str], asked: list[str] | None) -> list[dict[str, Any]]:
    """The project's machines on these providers, as ``cloudsend instances`` lists them."""
    return [row for name in providers for row in get_provider(name).machines(config, asked)]


def set_running(
    config: BatchConfig, providers: list[str], asked: list[str] | None, *, running: bool, ids: list[str] | None
) -> list[str]:
    """Start (``running``) or stop the project's machines on these providers; the ids asked to change."""
    return [
        changed
        for name in providers
        for changed in get_provider(name).set_running(config, asked, running=running, ids=ids)
    ]


def down(config: BatchConfig, providers: list[str], asked: list[str] | None) -> list[str]:
    """Remove everything the project created with these providers; what was removed."""
    return [removed for name in providers for removed in get_provider(name).down(config, asked)]
