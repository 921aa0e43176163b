"""Providers: ``local`` (this machine), ``ssh`` (existing hosts), ``aws`` (EC2). See ``base`` for the interface."""

from __future__ import annotations

import importlib
import threading
from collections import defaultdict

from cloudsend_prefect.config import BatchConfig, InstanceType
from cloudsend_prefect.providers.base import HostHealth, HostInfo, Provider
from cloudsend_prefect.transport import Transport

__all__ = ["HostHealth", "HostInfo", "Provider", "connect", "disconnect", "get_provider", "provision_all", "release"]


def get_provider(name: str) -> Provider:
    """The provider module (imported only when used, so its SDK is too)."""
    module: Provider = importlib.import_module(f"cloudsend_prefect.providers.{name}")
    return module


def provision_all(config: BatchConfig, *, create: bool = True) -> list[HostInfo]:
    """Hosts of every instance type; if one provider fails, what the others provided is released first."""
    by_provider: dict[str, list[tuple[int, InstanceType]]] = defaultdict(list)
    for index, inst in enumerate(config.instances):
        by_provider[inst.provider or config.provider].append((index, inst))
    hosts: list[HostInfo] = []
    try:
        for name, insts in by_provider.items():
            hosts += get_provider(name).provision(config, insts, create=create)
    except BaseException:
        if create and hosts:
            release(config, hosts)
        raise
    return hosts


def release(config: BatchConfig, hosts: list[HostInfo]) -> list[HostInfo]:
    """Apply ``auto_stop`` to the hosts and drop their connections; returns the billed hosts kept running."""
    try:
        if not config.auto_stop:
            return [h for h in hosts if h.instance_id]
        for name in sorted({h.provider for h in hosts}):
            mine = [h for h in hosts if h.provider == name]
            get_provider(name).teardown(mine, terminate=config.auto_stop == "terminate")
        return []
    finally:
        disconnect(hosts)


_transports: dict[tuple[str, str | None, int, str | None, str | None], Transport] = {}
_lock = threading.Lock()


def connect(host: HostInfo) -> Transport:
    """The process-wide transport of a host: one connection per host, shared by every task thread."""
    key = _key(host)
    with _lock:
        transport = _transports.get(key)
        if transport is None:
            if host.provider == "local":
                from cloudsend_prefect.transport.local import LocalTransport

                transport = LocalTransport(host.name, host.pass_env)
            else:
                from cloudsend_prefect.transport.ssh import SSHTransport

                transport = SSHTransport(
                    host.address or "127.0.0.1",
                    port=host.port,
                    user=host.user,
                    key_file=host.key_file,
                    name=host.name,
                    known_hosts=host.known_hosts,
                    host_key=host.host_key,
                    accept_new_host_key=host.accept_new_host_key,
                )
            _transports[key] = transport
        return transport


def _key(host: HostInfo) -> tuple[str, str | None, int, str | None, str | None]:
    """A host's connection is reused only for the same name, address, port, user and key."""
    return (host.name, host.address, host.port, host.user, host.key_file)


def disconnect(hosts: list[HostInfo]) -> None:
    with _lock:
        for host in hosts:
            transport = _transports.pop(_key(host), None)
            if transport is not None:
                transport.close()
