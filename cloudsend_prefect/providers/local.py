"""The ``local`` provider: this machine as one host per instance, each with its own CPU slots and base dir."""

from __future__ import annotations

from cloudsend_prefect.config import BatchConfig, InstanceType
from cloudsend_prefect.paths import cloudsend_home
from cloudsend_prefect.providers.base import HostHealth, HostInfo, host_names


def provision(config: BatchConfig, instances: list[tuple[int, InstanceType]], *, create: bool = True) -> list[HostInfo]:
    home = cloudsend_home() / "hosts"
    return [
        HostInfo(
            name=name,
            provider="local",
            cpus=config.instance_cpus(inst),
            gpus=inst.gpus or 0,
            base_dir=str(home / name),
            pass_env=config.pass_env,
        )
        for index, inst in instances
        for name in host_names(inst, index, "local")
    ]


def status(hosts: list[HostInfo]) -> dict[str, HostHealth]:
    return {host.name: "running" for host in hosts}


def teardown(hosts: list[HostInfo], *, terminate: bool = False) -> None:
    return None  # this machine is the user's own: nothing to stop
