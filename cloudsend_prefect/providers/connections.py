"""The connections of one flow run (or one CLI command): one transport per host, shared by every task thread,
all closed when their owner ends."""

from __future__ import annotations

import threading
from types import TracebackType

from cloudsend_prefect.providers.models import HostInfo
from cloudsend_prefect.transport import Transport

Key = tuple[str, str | None, int, str | None, str | None]


class Connections:
    """A pool of host connections, created by whoever runs a batch (the flow run, a CLI command) and passed down
    to what talks to hosts; closed with it (a context manager), so none outlives its run or is handed to the
    next run's host of the same name.
    """

    def __init__(self) -> None:
        self._open: dict[Key, Transport] = {}
        self._lock = threading.Lock()

    def get(self, host: HostInfo) -> Transport:
        """The host's transport, opened on first use (lazily: connecting happens on its first command)."""
        key = _key(host)
        with self._lock:
            transport = self._open.get(key)
            if transport is None:
                transport = self._open[key] = _transport(host)
            return transport

    def close(self, hosts: list[HostInfo]) -> None:
        """Close the hosts' connections (a host released or given up): a later ``get`` opens a new one."""
        with self._lock:
            doomed = [self._open.pop(_key(host), None) for host in hosts]
        for transport in doomed:
            if transport is not None:
                transport.close()

    def close_all(self) -> None:
        """Close every connection of the pool."""
        with self._lock:
            doomed, self._open = list(self._open.values()), {}
        for transport in doomed:
            transport.close()

    def names(self) -> set[str]:
        """The names of the hosts the pool has a connection to."""
        with self._lock:
            return {key[0] for key in self._open}

    def __enter__(self) -> Connections:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close_all()


def _key(host: HostInfo) -> Key:
    """A host's connection is reused only for the same name, address, port, user and key."""
    return (host.name, host.address, host.port, host.user, host.key_file)


def _transport(host: HostInfo) -> Transport:
    """A new transport to the host: this machine's processes for ``local``, SSH otherwise."""
    if host.provider == "local":
        from cloudsend_prefect.transport.local import LocalTransport

        return LocalTransport(host.name, host.pass_env)
    from cloudsend_prefect.transport.ssh import SSHTransport

    return SSHTransport(
        host.address or "127.0.0.1",
        port=host.port,
        user=host.user,
        key_file=host.key_file,
        name=host.name,
        known_hosts=host.known_hosts,
        host_key=host.host_key,
        accept_new_host_key=host.accept_new_host_key,
    )
