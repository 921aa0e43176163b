"""The ``ssh`` provider: the user's own machines, reached over SSH. Nothing is created or removed."""

from __future__ import annotations

from typing import Any

from cloudsend_prefect.config import BatchConfig, InstanceType
from cloudsend_prefect.naming import host_name
from cloudsend_prefect.providers.connections import Connections
from cloudsend_prefect.providers.models import REMOTE_BASE_DIR, HostHealth, HostInfo, PlannedHost
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
from cloudsend_prefect.transport import TransportError

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
    """Nothing to check beyond the config's own checks (a host, one machine per entry)."""
    return None


def plan(config: BatchConfig, index: int, inst: InstanceType) -> list[PlannedHost]:
    """The one host of the entry, with its CPUs as the config gives them."""
    cpus, gpus = shape(config, inst)
    return [PlannedHost(name=host_name(inst.name, "ssh", index), provider="ssh", index=index, cpus=cpus, gpus=gpus)]


def provision(
    config: BatchConfig, instances: list[tuple[int, InstanceType]], connections: Connections, *, create: bool = True
) -> list[HostInfo]:
    """The entries' machines; a machine without ``cpus`` is asked for its CPU count (an early, clear error if
    it is unreachable)."""
    hosts = []
    for index, inst in instances:
        host = HostInfo(
            name=host_name(inst.name, "ssh", index),
            provider="ssh",
            cpus=inst.cpus or 1,
            gpus=inst.gpus or 0,
            base_dir=inst.remote_dir or REMOTE_BASE_DIR,
            address=inst.host,
            port=inst.port,
            user=inst.user,
            key_file=inst.key_file,
            host_key=inst.host_key,
            accept_new_host_key=inst.accept_new_host_key,
        )
        if inst.cpus is None:  # ask the host: one round trip, and an early, clear error if it is unreachable
            host.cpus = _online_cpus(host, connections)
        hosts.append(host)
    return hosts


def _online_cpus(host: HostInfo, connections: Connections) -> int:
    """The machine's online CPU count, asked over its connection."""
    result = connections.get(host).run("getconf _NPROCESSORS_ONLN 2>/dev/null || nproc")
    try:
        return max(1, int(result.stdout.split()[0]))
    except (IndexError, ValueError):
        raise TransportError(host.name, f"cannot read its CPU count ({result.stderr.strip()}); set `cpus`") from None


def status(hosts: list[HostInfo], connections: Connections) -> dict[str, HostHealth]:
    """Each machine's reachability: running when it answers, unreachable when it cannot be reached."""
    health: dict[str, HostHealth] = {}
    for host in hosts:
        try:
            health[host.name] = "running" if connections.get(host).run("true", timeout=30).ok else "unknown"
        except (TransportError, TimeoutError, OSError):
            health[host.name] = "unreachable"
    return health


def machines(config: BatchConfig, asked: list[str] | None) -> list[dict[str, Any]]:
    """The project's ssh machines, with where they are reached."""
    return [
        {
            "provider": "ssh",
            "name": host_name(inst.name, "ssh", i),
            "state": "own server",
            "address": f"{inst.user + '@' if inst.user else ''}{inst.host}:{inst.port}",
        }
        for i, inst in enumerate(config.instances)
        if config.provider_of(inst) == "ssh"
    ]
