"""What the providers of users' own machines (``local``, ``ssh``) share: nothing is created, billed, stopped or
removed, so these parts of the provider interface have nothing to do."""

from __future__ import annotations

from typing import Any

from cloudsend_prefect.config import BatchConfig, InstanceType
from cloudsend_prefect.providers.connections import Connections
from cloudsend_prefect.providers.costs import Quote, own_machine
from cloudsend_prefect.providers.models import HostInfo, Upkeep

CREATES_HOSTS = False


def shape(config: BatchConfig, inst: InstanceType) -> tuple[int, int]:
    """The instance type's CPUs and GPUs as the config knows them (no catalog to ask)."""
    return config.instance_cpus(inst), config.instance_gpus(inst)


def teardown(hosts: list[HostInfo], *, terminate: bool = False) -> None:
    """Nothing: the user's own machines are never stopped."""
    return None


def replace(config: BatchConfig, lost: HostInfo, name: str, connections: Connections) -> HostInfo:
    """Never called (``CREATES_HOSTS`` is False): an own machine cannot be replaced by a new one."""
    raise ValueError(f"{lost.name}: the {lost.provider} provider cannot create hosts")


def quote(hosts: list[Any], *, live: bool) -> tuple[dict[str, Quote], list[str]]:
    """Own machines cost nothing here."""
    return {host.name: own_machine(host.name, host.provider) for host in hosts}, []


def upkeep(host: HostInfo) -> Upkeep:
    """No dead-man switch and no interruption notices on an own machine."""
    return Upkeep()


def places(config: BatchConfig, asked: list[str] | None) -> list[str | None]:
    """No cloud regions to look in."""
    return []


def set_running(config: BatchConfig, asked: list[str] | None, *, running: bool, ids: list[str] | None) -> list[str]:
    """Nothing to start or stop: own machines are the user's to run."""
    return []


def down(config: BatchConfig, asked: list[str] | None) -> list[str]:
    """Nothing to remove: the provider created nothing."""
    return []


def kept_hint(config: BatchConfig, hosts: list[HostInfo]) -> str:
    """Own machines keep running anyway: nothing to remove."""
    return ""
