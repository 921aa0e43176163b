"""The ``local`` provider: this machine as one host per instance, each with its own CPU slots and base dir."""

from __future__ import annotations

from typing import Any

from cloudsend_prefect.config import BatchConfig, InstanceType
from cloudsend_prefect.naming import host_name, host_names
from cloudsend_prefect.paths import cloudsend_home
from cloudsend_prefect.providers.connections import Connections
from cloudsend_prefect.providers.models import HostHealth, HostInfo, PlannedHost
from cloudsend_prefect.providers.own import (
    CREATES_HOSTS,
    down,
    kept_hint,
    places,
    quote,
    replace,
    set_running,
    shape,
    teardown,
    upkeep,
)

__all__ = [
    "CREATES_HOSTS",
    "down",
    "kept_hint",
    "machines",
    "places",
    "plan",
    "provision",
    "quote",
    "replace",
    "set_running",
    "shape",
    "status",
    "teardown",
    "upkeep",
    "validate",
]


def validate(config: BatchConfig, index: int, inst: InstanceType) -> None:
    """Nothing to check beyond the config's own checks."""
    return None


def plan(config: BatchConfig, index: int, inst: InstanceType) -> list[PlannedHost]:
    """One host per copy, with the instance type's CPUs (else this machine's) and GPUs."""
    cpus, gpus = shape(config, inst)
    return [
        PlannedHost(name=name, provider="local", index=index, cpus=cpus, gpus=gpus)
        for name in host_names(inst.name, "local", index, inst.number)
    ]


def provision(
    config: BatchConfig, instances: list[tuple[int, InstanceType]], connections: Connections, *, create: bool = True
) -> list[HostInfo]:
    """This machine as one host per copy, each with its own base dir under ``$CLOUDSEND_HOME/hosts``."""
    home = cloudsend_home() / "hosts"
    return [
        HostInfo(
            name=planned.name,
            provider="local",
            cpus=planned.cpus,
            gpus=planned.gpus,
            base_dir=str(home / planned.name),
            pass_env=config.pass_env,
        )
        for index, inst in instances
        for planned in plan(config, index, inst)
    ]


def status(hosts: list[HostInfo], connections: Connections) -> dict[str, HostHealth]:
    """This machine runs while the client does."""
    return {host.name: "running" for host in hosts}


def machines(config: BatchConfig, asked: list[str] | None) -> list[dict[str, Any]]:
    """This machine, once per local instance type."""
    return [
        {"provider": "local", "name": host_name(inst.name, "local", i), "state": "this machine"}
        for i, inst in enumerate(config.instances)
        if config.provider_of(inst) == "local"
    ]
