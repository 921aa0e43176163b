"""A host reached over SSH: one persistent, thread-safe connection, host keys always verified.

Every round trip runs through the login user's shell start-up, and a new connection costs 2-3x a
reused one, so the transport keeps a single connection (and a single SFTP client) per host and
multiplexes commands over it as channels. sshd allows only ``MaxSessions`` (10 by default) channels
per connection, so a semaphore bounds them. A dropped connection is reopened with backoff, but only
before a command starts: a command that may have run is never re-sent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import shlex
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import paramiko
from fabric import Connection
from paramiko.channel import Channel
from paramiko.common import cMSG_CHANNEL_REQUEST
from paramiko.hostkeys import HostKeyEntry
from paramiko.message import Message
from paramiko.ssh_exception import BadHostKeyException, ChannelException, SSHException

from cloudsend_prefect.transport.base import CommandResult, FileRefused, TransportError, check_regular, copy_bounded

log = logging.getLogger(__name__)

DEFAULT_RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0)
_NETWORK_ERRORS = (SSHException, OSError, EOFError)
_KNOWN_HOSTS_WRITE_LOCK = threading.Lock()
_CHUNK = 32768
_T = TypeVar("_T")
TRANSFER_TIMEOUT = 120.0  # seconds an SFTP request may go unanswered before the transfer is given up
_REFUSED_CHANNEL_DELAYS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class _UnknownHostKey(SSHException):
    def __init__(self, hostname: str, key: paramiko.PKey) -> None:
        super().__init__(f"{hostname}: unknown host key {key.get_name()} {key.fingerprint}")
        self.key = key


class _RejectUnknown(paramiko.MissingHostKeyPolicy):
    """Like ``StrictHostKeyChecking=yes``: never trust a key nobody vouched for."""

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise _UnknownHostKey(hostname, key)


class _AcceptNew(paramiko.MissingHostKeyPolicy):
    """Like ``StrictHostKeyChecking=accept-new``: record an unknown key, still reject a changed one."""

    def __init__(self, known_hosts: Path) -> None:
        self.known_hosts = known_hosts

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        client.get_host_keys().add(hostname, key.get_name(), key)
        with _KNOWN_HOSTS_WRITE_LOCK:
            self.known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with self.known_hosts.open("a") as f:
                f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        log.warning(
            "%s: trusted new host key %s %s (recorded in %s)",
            hostname,
            key.get_name(),
            key.fingerprint,
            self.known_hosts,
        )


class _Retryable(Exception):
    """The connection could not be made or was lost before a command started; trying again is safe."""


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


class SSHTransport:
    """Runs commands and moves files on one SSH host; safe to share between threads.

    Host keys are checked against ``known_hosts`` (default ``~/.ssh/known_hosts`` plus
    ``/etc/ssh/ssh_known_hosts``) or against a pinned ``host_key`` ("ssh-ed25519 AAAA..."); with
    ``accept_new_host_key`` an unknown key is recorded on first contact. A changed key is always an
    error. ``host``, ``port`` and ``user`` may also come from ``~/.ssh/config`` (fabric resolves it).
    ``max_channels`` should stay below the server's ``MaxSessions``: the SFTP client uses one more.
    """

    def __init__(
        self,
        host: str,
        *,
        port: int | None = None,
        user: str | None = None,
        key_file: str | None = None,
        name: str | None = None,
        known_hosts: str | None = None,
        host_key: str | None = None,
        accept_new_host_key: bool = False,
        connect_timeout: float = 10,
        max_channels: int = 8,
        retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
        keepalive: int = 30,
    ) -> None:
        if max_channels < 1:
            raise ValueError("max_channels must be at least 1")
        if host_key is not None and accept_new_host_key:
            raise ValueError("host_key pins the key; accept_new_host_key would contradict it")
        self._pinned: paramiko.PKey | None = None
        if host_key is not None:
            try:
                entry = HostKeyEntry.from_line(f"pinned {host_key.strip()}")
            except Exception:  # paramiko raises InvalidHostKey, or lets the decoder's errors through
                entry = None
            if entry is None or entry.key is None:
                raise ValueError(f"host_key is not an OpenSSH public key line: {host_key[:40]!r}...")
            self._pinned = entry.key
        self._key_file = os.path.expanduser(key_file) if key_file else None
        self._known_hosts = Path(os.path.expanduser(known_hosts or "~/.ssh/known_hosts"))
        self._extra_known_hosts = [] if known_hosts else [Path("/etc/ssh/ssh_known_hosts")]
        self._accept_new = accept_new_host_key
        self._connect_timeout = connect_timeout
        self._retry_delays = tuple(retry_delays)
        self._keepalive = keepalive

        probe = self._new_connection(host, port, user)  # resolves ~/.ssh/config; does not connect
        self.host: str = probe.host
        self.port: int = int(probe.port)
        self.user: str = probe.user
        self._host_arg, self._port_arg, self._user_arg = host, port, user
        self.name = name or host
        self.address = f"{self.host}:{self.port}"
        # paramiko's name for this host in known_hosts files
        self._known_name = self.host if self.port == 22 else f"[{self.host}]:{self.port}"

        self._lock = threading.Lock()  # guards _conn: fabric's Connection.open() is not thread-safe
        self._sftp_lock = threading.Lock()  # one SFTP client, one transfer at a time
        self._count_lock = threading.Lock()
        self._channels = threading.BoundedSemaphore(max_channels)
        self._conn: Connection | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._sftp_transport: paramiko.Transport | None = None
        #: Commands and transfers sent to the host (each costs at least one network round trip).
        self.round_trips = 0
        #: SSH connections opened so far (1 unless the connection dropped or close() was called).
        self.connections_opened = 0

    def __repr__(self) -> str:
        return f"SSHTransport({self.name!r}, {self.user}@{self.address})"

    # -- connection -------------------------------------------------------------------------------

    def _new_connection(self, host: str, port: int | None, user: str | None) -> Connection:
        kwargs: dict[str, Any] = {
            "timeout": self._connect_timeout,
            "banner_timeout": self._connect_timeout,
            "auth_timeout": max(self._connect_timeout, 30),
        }
        if self._key_file:
            # an explicit key is the only one offered: agent keys could exhaust the server's MaxAuthTries
            kwargs.update(key_filename=[self._key_file], look_for_keys=False, allow_agent=False)
        conn = Connection(host, port=port, user=user, connect_kwargs=kwargs)
        conn.connect_timeout = None  # ours is in connect_kwargs (fabric would round it to whole seconds)
        return conn

    def _where(self) -> str:
        return self.address if self.name in (self.host, self.address) else f"{self.name} ({self.address})"

    def _error(self, message: str) -> TransportError:
        return TransportError(self._where(), message)

    def _trust(self, client: paramiko.SSHClient) -> str:
        """Load the keys this host may present; return where they came from, for messages."""
        keys = client.get_host_keys()
        if self._pinned is not None:
            keys.add(self._known_name, self._pinned.get_name(), self._pinned)
            client.set_missing_host_key_policy(_RejectUnknown())
            return "the pinned host_key"
        for path in [self._known_hosts, *self._extra_known_hosts]:
            if path.is_file():
                try:
                    keys.load(str(path))
                except (OSError, SSHException, ValueError) as exc:
                    raise self._error(f"cannot read known_hosts file {path}: {exc}") from None
        policy = _AcceptNew(self._known_hosts) if self._accept_new else _RejectUnknown()
        client.set_missing_host_key_policy(policy)
        return str(self._known_hosts)

    def _open_connection(self) -> Connection:
        """Connect and authenticate; TransportError for problems retrying cannot fix, else _Retryable."""
        if self._key_file and not os.path.isfile(self._key_file):
            raise self._error(f"key file {self._key_file} does not exist")
        conn = self._new_connection(self._host_arg, self._port_arg, self._user_arg)
        source = self._trust(conn.client)
        try:
            conn.open()
        except _UnknownHostKey as exc:
            conn.close()
            key = exc.key
            raise self._error(
                f"unknown host key {key.get_name()} {key.fingerprint} (not in {source}). Check the "
                f"fingerprint with the host's owner, then either add it with `ssh-keyscan -p {self.port} "
                f"{self.host} >> {self._known_hosts}`, pin it with host_key='{key.get_name()} "
                f"{key.get_base64()}', or pass accept_new_host_key=True to trust it on first contact."
            ) from None
        except BadHostKeyException as exc:
            conn.close()
            raise self._error(
                f"HOST KEY MISMATCH: the host presented {exc.key.get_name()} {exc.key.fingerprint} but "
                f"{source} expects {exc.expected_key.get_name()} {exc.expected_key.fingerprint}. Either "
                "the host was reinstalled or someone is intercepting the connection. If the change is "
                f"expected, remove the old key (`ssh-keygen -R '{self._known_name}' -f "
                f"{self._known_hosts}`) and add the new one."
            ) from None
        except (*_NETWORK_ERRORS, ValueError) as exc:
            transport = conn.client.get_transport()
            authenticating = transport is not None and transport.is_active()
            conn.close()
            if authenticating:  # the handshake succeeded, so the server refused our credentials
                keys = f"key {self._key_file}" if self._key_file else "the agent's and ~/.ssh keys"
                raise self._error(
                    f"authentication as {self.user!r} with {keys} failed ({exc}). Check that the public "
                    f"key is in ~{self.user}/.ssh/authorized_keys on the host."
                ) from None
            raise _Retryable(f"cannot connect to {self.address}: {exc}") from exc
        assert conn.transport is not None
        conn.transport.set_keepalive(self._keepalive)
        # Without TCP_NODELAY, Nagle holds back the exec request and EOF that follow a channel open
        # until the server's delayed ACK: ~40 ms on every command instead of ~3 ms on loopback.
        with contextlib.suppress(AttributeError, OSError):  # a gateway channel is not a socket
            conn.transport.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._count_lock:
            self.connections_opened += 1
        log.debug("%s: connected to %s@%s", self.name, self.user, self.address)
        return conn

    def _transport(self) -> paramiko.Transport:
        """The live paramiko transport, (re)connecting if needed."""
        with self._lock:
            conn = self._conn
            if conn is None or not conn.is_connected:
                if conn is not None:
                    self._discard_locked()
                conn = self._conn = self._open_connection()
            assert conn.transport is not None
            return conn.transport

    def _discard_locked(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _discard(self, transport: paramiko.Transport | None) -> None:
        """Drop the connection if it is still the one that failed (another thread may have replaced it)."""
        with self._lock:
            if self._conn is not None and self._conn.transport is transport:
                self._discard_locked()

    def _with_retries(self, what: str, deadline: float | None, open_: Callable[[paramiko.Transport], _T]) -> _T:
        """Call ``open_(transport)`` with a live connection, reconnecting with backoff on failure.

        Only for steps that happen before a command runs (opening a channel), so a retry never
        re-runs anything. A refused channel (the server's MaxSessions is reached, often by sessions
        it has not yet reaped) is retried sooner and does not drop the connection.
        """
        delays = iter(self._retry_delays)
        refusal_delays = iter(_REFUSED_CHANNEL_DELAYS)
        attempts = 0
        while True:
            attempts += 1
            transport = None
            try:
                transport = self._transport()
                return open_(transport)
            except _Retryable as exc:
                reason = str(exc)
                delay = next(delays, None)
            except _NETWORK_ERRORS as exc:
                # paramiko keeps one "last error" per connection: when two threads' channel opens are
                # refused at once, one gets ChannelException and the other a bare "Unable to open
                # channel." So a live connection means a refusal, unless the open timed out.
                alive = transport is not None and transport.is_active()
                if isinstance(exc, ChannelException) or (alive and not str(exc).startswith("Timeout")):
                    reason = f"the server refused a new channel ({exc!r}); is its MaxSessions below max_channels + 1?"
                    delay = next(refusal_delays, None)
                else:
                    self._discard(transport)
                    reason = f"connection lost: {exc!r}"
                    delay = next(delays, None)
            left = _remaining(deadline)
            if delay is None or (left is not None and left < delay):
                raise self._error(
                    f"could not {what} after {attempts} attempt(s): {reason} Check that the host is up "
                    f"and sshd listens on port {self.port}."
                )
            log.info("%s: could not %s (%s); retrying in %.2fs", self.name, what, reason, delay)
            time.sleep(delay)

    # -- commands ---------------------------------------------------------------------------------

    def run(self, command: str, *, stdin: str | None = None, timeout: float | None = None) -> CommandResult:
        """Run ``command`` with ``sh -c`` in the login home, whatever the user's login shell is."""
        with self._count_lock:
            self.round_trips += 1
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._channels.acquire(timeout=_remaining(deadline)):
            raise TimeoutError(f"{self.name}: no free SSH channel within {timeout}s")
        try:
            chan = self._with_retries(
                "open an SSH session", deadline, lambda t: t.open_session(timeout=self._connect_timeout)
            )
            try:
                return self._exec(chan, command, stdin, deadline, timeout)
            finally:
                chan.close()
        finally:
            self._channels.release()

    @staticmethod
    def _command_line(command: str, stdin: bool) -> str:
        """The line for the login shell: ``sh -c``, with input that ends before the channel can close.

        Nothing may be sent on a channel after the server has closed it: OpenSSH drops the whole
        connection ("packet referred to nonexistent channel"), and paramiko sends a separate EOF or
        data from the caller's thread while its own thread may already have answered the server's
        close. So without input, stdin is /dev/null and no EOF is sent; with input, the host drains it
        to our EOF before exiting, so the server cannot close first even if the command reads nothing.
        """
        quoted = f"sh -c {shlex.quote(command)}"
        if not stdin:
            return f"{quoted} </dev/null"
        return "sh -c " + shlex.quote(f"{quoted}; s=$?; cat >/dev/null; exit $s")

    def _exec(
        self, chan: Channel, command: str, stdin: str | None, deadline: float | None, timeout: float | None
    ) -> CommandResult:
        transport = chan.get_transport()
        pending = memoryview(stdin.encode() if stdin else b"")
        try:
            chan.exec_command(self._command_line(command, bool(pending)))
        except _NETWORK_ERRORS as exc:
            if transport is None or not transport.is_active():
                self._discard(transport)
            raise self._error(f"could not start the command ({exc!r}); it may or may not have run") from exc
        out, err = bytearray(), bytearray()
        # paramiko signals new data on a pipe; waiting on it avoids polling the channel in a loop
        with selectors.DefaultSelector() as sel:
            sel.register(chan.fileno(), selectors.EVENT_READ)
            while True:
                if pending:
                    try:
                        while pending and chan.send_ready():
                            pending = pending[chan.send(bytes(pending[:_CHUNK])) :]
                        if not pending:
                            chan.shutdown_write()
                    except OSError:  # only if the connection died: the host waits for our EOF
                        pending = memoryview(b"")
                while chan.recv_ready():
                    out += chan.recv(65536)
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                if (chan.eof_received or chan.closed) and not (chan.recv_ready() or chan.recv_stderr_ready()):
                    break
                left = _remaining(deadline)
                if left == 0:
                    self._give_up(chan)
                    raise TimeoutError(f"{self.name}: command timed out after {timeout}s")
                # the remote window does not signal on the pipe, so poll while input is pending
                wait = 0.02 if pending else 5.0
                sel.select(wait if left is None else min(wait, left))
        if not chan.status_event.wait(_remaining(deadline)):
            self._give_up(chan)
            raise TimeoutError(f"{self.name}: command timed out after {timeout}s")
        code = chan.exit_status
        if code == -1 and not (transport is not None and transport.is_active()):
            raise self._error("connection lost while a command was running; it may have partly run")
        return CommandResult(code, out.decode(errors="replace"), err.decode(errors="replace"))

    def _give_up(self, chan: Channel) -> None:
        """Ask sshd to signal the timed-out command's process group, then drop the channel.

        Closing the channel alone leaves the command running. OpenSSH (>= 7.9) honours the "signal"
        channel request, except for root logins (no privilege-separated child) and ForceCommand
        sessions, so this is best effort. paramiko has no API for it, so the request is built here,
        and sent under the channel lock so it cannot follow our reply to the server's close (see
        ``_command_line``).
        """
        with contextlib.suppress(Exception), chan.lock:
            if not (chan.closed or chan.eof_received):
                m = Message()
                m.add_byte(cMSG_CHANNEL_REQUEST)
                m.add_int(chan.remote_chanid)
                m.add_string("signal")
                m.add_boolean(False)
                m.add_string("TERM")
                transport: Any = chan.get_transport()
                transport._send_user_message(m)
        chan.close()

    # -- files ------------------------------------------------------------------------------------

    @staticmethod
    def _remote_path(remote: str) -> str:
        """SFTP starts in the login home but does not expand ``~``."""
        if remote == "~":
            return "."
        return remote[2:] if remote.startswith("~/") else remote

    def _sftp_client(self) -> paramiko.SFTPClient:
        """The shared SFTP client (caller holds _sftp_lock), reopened if its connection changed."""

        def open_sftp(transport: paramiko.Transport) -> paramiko.SFTPClient:
            if self._sftp is not None and self._sftp_transport is transport and not self._sftp.sock.closed:
                return self._sftp
            if self._sftp is not None:
                with contextlib.suppress(Exception):
                    self._sftp.close()
            sftp = paramiko.SFTPClient.from_transport(transport)
            if sftp is None:
                raise SSHException("the server refused the SFTP subsystem")
            sftp.get_channel().settimeout(TRANSFER_TIMEOUT)  # type: ignore[union-attr]
            self._sftp, self._sftp_transport = sftp, transport
            return sftp

        return self._with_retries("open an SFTP session", None, open_sftp)

    def _transfer(self, what: str, action: Callable[[paramiko.SFTPClient], object]) -> None:
        with self._count_lock:
            self.round_trips += 1
        with self._sftp_lock:
            sftp = self._sftp_client()
            try:
                action(sftp)
            except (FileNotFoundError, PermissionError, IsADirectoryError, FileRefused):
                raise  # a file problem, not a connection one
            except TimeoutError as exc:  # the host stopped answering mid-transfer: this SFTP session is stuck
                with contextlib.suppress(Exception):
                    sftp.close()
                self._sftp = None
                raise self._error(f"{what}: no answer for {TRANSFER_TIMEOUT:g}s") from exc
            except _NETWORK_ERRORS as exc:
                transport = self._sftp_transport
                if (
                    isinstance(exc, OSError)
                    and transport is not None
                    and transport.is_active()
                    and not sftp.sock.closed
                ):
                    raise  # a local file problem, not a connection one
                self._sftp = None
                self._discard(transport)
                raise self._error(f"connection lost during {what} ({exc!r})") from exc

    def put(self, local: Path, remote: str) -> None:
        """Copy a local file to ``remote`` (absolute, or relative to the login home)."""
        self._transfer(f"put {remote}", lambda sftp: sftp.put(str(local), self._remote_path(remote)))

    def get(self, remote: str, local: Path, *, max_bytes: int | None = None, tail: int | None = None) -> int:
        """Copy the regular file ``remote`` to ``local`` (see ``Transport.get``).

        The file is checked with lstat (a link, FIFO or device is refused before anything opens it) and read
        through a channel with a timeout, so nothing a job leaves behind can block or flood the client.
        """
        copied = 0

        def fetch(sftp: paramiko.SFTPClient) -> None:
            nonlocal copied
            path = self._remote_path(remote)
            attrs = sftp.lstat(path)
            skip = check_regular(remote, attrs.st_mode, attrs.st_size, max_bytes, tail)
            size = attrs.st_size or 0
            with sftp.open(path, "rb") as source:
                source.prefetch(size)
                copied = copy_bounded(source, size, skip, local)  # type: ignore[arg-type]

        self._transfer(f"get {remote}", fetch)
        return copied

    def read(self, remote: str, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes of the regular file ``remote`` from ``offset`` (see ``Transport.read``).

        Read over SFTP after an lstat, so a link or FIFO is refused, and b"" when the file does not exist yet (a
        job that has not written its log).
        """
        data = b""

        def read(sftp: paramiko.SFTPClient) -> None:
            nonlocal data
            path = self._remote_path(remote)
            try:
                attrs = sftp.lstat(path)
            except FileNotFoundError:
                return
            check_regular(remote, attrs.st_mode, attrs.st_size, None, None)
            with sftp.open(path, "rb") as source:
                source.seek(offset)
                data = source.read(size)

        self._transfer(f"read {remote}", read)
        return data

    def close(self) -> None:
        """Close the connection; detached jobs on the host keep running. The next call reconnects."""
        with self._sftp_lock:
            if self._sftp is not None:
                with contextlib.suppress(Exception):
                    self._sftp.close()
            self._sftp = self._sftp_transport = None
        with self._lock:
            self._discard_locked()
