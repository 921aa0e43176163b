"""The ``ssh`` provider: the user's own machines, reached over SSH. Nothing is created or removed."""

from __future__ import annotations

from cloudsend_prefect.config import BatchConfig, InstanceType
from cloudsend_prefect.providers.base import HostHealth, HostInfo, host_names
from cloudsend_prefect.transport import TransportError

DEFAULT_REMOTE_DIR = ".cloudsend"  # relative to the login user's home


def provision(config: BatchConfig, instances: list[tuple[int, InstanceType]], *, create: bool = True) -> list[HostInfo]:
    hosts = []
    for index, inst in instances:
        (name,) = host_names(inst, index, "ssh")
        host = HostInfo(
            name=name,
            provider="ssh",
            cpus=inst.cpus or 1,
            gpus=inst.gpus or 0,
            base_dir=inst.remote_dir or DEFAULT_REMOTE_DIR,
            address=inst.host,
            port=inst.port,
            user=inst.user,
            key_file=inst.key_file,
            host_key=inst.host_key,
            accept_new_host_key=inst.accept_new_host_key,
        )
        if inst.cpus is None:  # ask the host: one round trip, and an early, clear error if it is unreachable
            host.cpus = _online_cpus(host)
        hosts.append(host)
    return hosts


def _online_cpus(host: HostInfo) -> int:
    from cloudsend_prefect.providers import connect

    result = connect(host).run("getconf _NPROCESSORS_ONLN 2>/dev/null || nproc")
    try:
        return max(1, int(result.stdout.split()[0]))
    except (IndexError, ValueError):
        raise TransportError(host.name, f"cannot read its CPU count ({result.stderr.strip()}); set `cpus`") from None


def status(hosts: list[HostInfo]) -> dict[str, HostHealth]:
    from cloudsend_prefect.providers import connect

    health: dict[str, HostHealth] = {}
    for host in hosts:
        try:
            health[host.name] = "running" if connect(host).run("true", timeout=30).ok else "unknown"
        except (TransportError, TimeoutError, OSError):
            health[host.name] = "unreachable"
    return health


def teardown(hosts: list[HostInfo], *, terminate: bool = False) -> None:
    return None  # the user's own machines: never stopped
