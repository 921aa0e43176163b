"""Providers: ``local`` (this machine), ``ssh`` (existing hosts), ``aws`` (EC2). See ``base`` for the interface."""

from __future__ import annotations

import importlib
import threading
from collections import defaultdict

from cloudsend_prefect.config import BatchConfig, InstanceType
from cloudsend_prefect.providers.base import HostHealth, HostInfo, Provider
from cloudsend_prefect.transport import Transport

__all__ = ["HostHealth", "HostInfo", "Provider", "connect", "disconnect", "get_provider", "provision_all"]


def get_provider(name: str) -> Provider:
    """The provider module (imported only when used, so its SDK is too)."""
    module: Provider = importlib.import_module(f"cloudsend_prefect.providers.{name}")
    return module


def provision_all(config: BatchConfig, *, create: bool = True) -> list[HostInfo]:
    by_provider: dict[str, list[tuple[int, InstanceType]]] = defaultdict(list)
    for index, inst in enumerate(config.instances):
        by_provider[inst.provider or config.provider].append((index, inst))
    return [
        h for name, insts in by_provider.items() for h in get_provider(name).provision(config, insts, create=create)
    ]


_transports: dict[str, Transport] = {}
_lock = threading.Lock()


def connect(host: HostInfo) -> Transport:
    """The process-wide transport of a host: one connection per host, shared by every task thread."""
    with _lock:
        transport = _transports.get(host.name)
        if transport is None:
            if host.provider == "local":
                from cloudsend_prefect.transport.local import LocalTransport

                transport = LocalTransport(host.name)
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
            _transports[host.name] = transport
        return transport


def disconnect(hosts: list[HostInfo]) -> None:
    with _lock:
        for host in hosts:
            transport = _transports.pop(host.name, None)
            if transport is not None:
                transport.close()
