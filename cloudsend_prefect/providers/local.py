"""The ``local`` provider: this machine as one host per instance, each with its own CPU slots and base dir."""

from __future__ import annotations

from cloudsend_prefect.config import BatchConfig, InstanceType
from cloudsend_prefect.paths import cloudsend_home
from cloudsend_prefect.providers.base import HostHealth, HostInfo


def provision(config: BatchConfig, instances: list[InstanceType], *, create: bool = True) -> list[HostInfo]:
    hosts = []
    for i, inst in enumerate(instances):
        for copy in range(inst.number):
            name = f"{inst.name or 'local'}-{i}" + (f".{copy}" if inst.number > 1 else "")
            base = str(cloudsend_home() / "hosts" / name)
            hosts.append(HostInfo(name=name, provider="local", cpus=config.instance_cpus(inst), base_dir=base))
    return hosts


def status(hosts: list[HostInfo]) -> dict[str, HostHealth]:
    return {host.name: "running" for host in hosts}


def teardown(hosts: list[HostInfo], *, terminate: bool = False) -> None:
    return None  # this machine is the user's own: nothing to stop
