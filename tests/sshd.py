"""Real OpenSSH ``sshd`` processes on loopback ports, standing in for remote hosts in tests.

Mocked SSH hides exactly the failures that matter (host keys, session limits, dropped connections,
detached jobs), so the SSH tests talk to real sshd processes. Each host gets its own directory and,
when the login shell is bash, its own ``$HOME`` (commands start there, SFTP relative paths resolve
there), so three loopback hosts behave like three machines rather than sharing one home directory.
Nothing outside the pytest temp directory is touched except sshd's privilege-separation dir.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloudsend_prefect.transport.ssh import SSHTransport

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd")
PRIVSEP_DIR = Path("/run/sshd")  # Debian's compiled-in privilege-separation directory
INSTALL_HINT = "apt-get install openssh-server"


def find_sshd() -> str | None:
    """sshd's absolute path (sshd refuses to re-exec from a relative one); /usr/sbin is often off PATH."""
    found = shutil.which("sshd")
    if found:
        return os.path.abspath(found)
    return next((c for c in SSHD_CANDIDATES if os.access(c, os.X_OK)), None)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_keypair(private_path: Path, comment: str) -> str:
    """Write an unencrypted ed25519 key in OpenSSH format; return the public key line."""
    key = Ed25519PrivateKey.generate()
    private_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    private_path.chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    line = f"{public.decode()} {comment}"
    private_path.with_name(private_path.name + ".pub").write_text(line + "\n")
    return line


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name field may contain spaces or ')'
        children.setdefault(ppid, []).append(int(entry))
    return children


def _descendants(pid: int) -> list[int]:
    children = _children_map()
    found: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def _pids_with_cwd_under(root: Path) -> list[int]:
    pids = []
    prefix = str(root.resolve())
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                continue
            if cwd == prefix or cwd.startswith(prefix + "/"):
                pids.append(int(entry))
    return pids


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


@dataclass
class SshdHost:
    """One sshd on 127.0.0.1:port, with everything a client needs to reach it."""

    name: str
    port: int
    key_file: Path  # client private key (shared by all hosts)
    known_hosts_file: Path  # holds only this host's key, as ``[127.0.0.1]:port ssh-ed25519 ...``
    base_dir: Path  # <tmp>/host-<i>: sshd files in etc/, the login home in home/
    home: Path  # where commands start and relative SFTP paths resolve
    log_file: Path
    config_file: Path
    host_public_key: str  # "ssh-ed25519 AAAA..." (pin it with SSHTransport(host_key=...))
    sshd_path: str
    host: str = "127.0.0.1"
    user: str = field(default_factory=getpass.getuser)
    pid: int | None = None
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start sshd on the same port and wait until it sends its SSH banner."""
        if self.running:
            return
        PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        self._proc = subprocess.Popen(
            [self.sshd_path, "-D", "-f", str(self.config_file), "-E", str(self.log_file)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in pytest must not hit sshd before teardown stops it
        )
        self.pid = self._proc.pid
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                log = self.log_file.read_text(errors="replace")[-2000:] if self.log_file.exists() else ""
                self._proc = None
                self.pid = None
                raise RuntimeError(f"sshd for {self.name} on port {self.port} exited at start:\n{log}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                    if s.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sshd for {self.name} did not answer on port {self.port} in {timeout}s")
            time.sleep(0.02)

    def stop(self, *, kill_jobs: bool = False) -> None:
        """Kill sshd and every open session on it, as a crash would; clients see their connection drop.

        Sessions are separate processes (children of the listener), so the listener is frozen first
        to stop it forking new ones while they are collected. ``kill_jobs`` also kills processes
        left running in this host's directories, such as detached jobs.
        """
        proc, self._proc, self.pid = self._proc, None, None
        if proc is not None and proc.poll() is None:
            _kill(proc.pid, signal.SIGSTOP)
            for child in _descendants(proc.pid):
                _kill(child)
            _kill(proc.pid)
            proc.wait(timeout=10)
        if kill_jobs:
            for pid in _pids_with_cwd_under(self.base_dir):
                _kill(pid)

    def transport(self, **kw: Any) -> SSHTransport:
        """An SSHTransport to this host that verifies its key against ``known_hosts_file``."""
        options: dict[str, Any] = {
            "port": self.port,
            "user": self.user,
            "key_file": str(self.key_file),
            "known_hosts": str(self.known_hosts_file),
            "name": self.name,
        }
        options.update(kw)
        return SSHTransport(self.host, **options)


def start_sshd_hosts(
    root: Path, count: int = 3, *, sshd_path: str | None = None, env: Mapping[str, str] | None = None
) -> list[SshdHost]:
    """Start ``count`` sshd hosts under ``root``; on failure, stop the ones already started.

    ``env``: variables their commands get, PATH included (a host that looks like another machine: see
    tests/stock.py).
    """
    sshd = sshd_path or find_sshd()
    if sshd is None:
        raise FileNotFoundError(f"sshd not found: {INSTALL_HINT}")
    client_dir = root / "client"
    client_dir.mkdir(parents=True, exist_ok=True)
    key_file = client_dir / "id_ed25519"
    authorized_keys = client_dir / "authorized_keys"
    authorized_keys.write_text(_write_keypair(key_file, "cloudsend-test-client") + "\n")
    authorized_keys.chmod(0o644)  # sshd reads it as the login user
    # Commands reach the login shell as `bash -c`, and bash sources ~/.bashrc for commands from sshd
    # unless SHLVL says it is nested: root's .bashrc runs `pyenv init`, whose rehash lock in the one
    # shared home serialises every command on every loopback host (~80 ms each). BASH_ENV then gives
    # each host its own home; it unsets itself so bash scripts started by jobs do not re-run it.
    isolate_home = Path(pwd.getpwnam(getpass.getuser()).pw_shell).name == "bash"
    if env and not isolate_home:
        raise RuntimeError("a host environment of its own needs bash as the login shell (it is set through BASH_ENV)")
    exports = "".join(f"{name}={shlex.quote(value)}; export {name}\n" for name, value in (env or {}).items())

    hosts: list[SshdHost] = []
    try:
        for i in range(count):
            base = root / f"host-{i}"
            etc, home = base / "etc", base / "home"
            etc.mkdir(parents=True)
            home.mkdir()
            if not isolate_home:
                home = Path.home()
            host_key = etc / "ssh_host_ed25519_key"
            public = _write_keypair(host_key, f"host-{i}")
            env_file = etc / "bash_env.sh"
            env_file.write_text(f"unset BASH_ENV\nHOME='{home}'; export HOME\n{exports}cd \"$HOME\" || exit 1\n")
            setenv = f"SHLVL=1 BASH_ENV={env_file}" if isolate_home else "SHLVL=1"
            sftp = f"internal-sftp -d {home}" if isolate_home else "internal-sftp"
            for attempt in range(5):
                port = _free_port()
                config = etc / "sshd_config"
                config.write_text(
                    f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile {etc / "sshd.pid"}
AuthorizedKeysFile {authorized_keys}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
MaxSessions 20
MaxStartups 50:30:100
UseDNS no
PrintMotd no
X11Forwarding no
SetEnv {setenv}
Subsystem sftp {sftp}
"""
                )
                known_hosts = etc / "known_hosts"
                known_hosts.write_text(f"[127.0.0.1]:{port} {public}\n")
                host = SshdHost(
                    name=f"host-{i}",
                    port=port,
                    key_file=key_file,
                    known_hosts_file=known_hosts,
                    base_dir=base,
                    home=home,
                    log_file=etc / "sshd.log",
                    config_file=config,
                    host_public_key=" ".join(public.split()[:2]),
                    sshd_path=sshd,
                )
                try:
                    host.start()
                    break
                except RuntimeError:  # most likely the free port was taken meanwhile
                    if attempt == 4:
                        raise
            hosts.append(host)
    except BaseException:
        for h in hosts:
            h.stop(kill_jobs=True)
        raise
    return hosts


def require_sshd() -> str:
    """sshd's path, or fail the test run: the SSH tests must never be silently skipped."""
    sshd = find_sshd()
    if sshd is None:
        where = "on CI " if os.environ.get("CI") else ""
        pytest.fail(
            f"OpenSSH sshd is not installed {where}but the SSH tests need real sshd hosts: "
            f"run `{INSTALL_HINT}` (the tests start their own sshd on loopback ports; no service needed).",
            pytrace=False,
        )
    return sshd


@contextlib.contextmanager
def sshd_hosts_running(root: Path, count: int = 3, *, env: Mapping[str, str] | None = None) -> Iterator[list[SshdHost]]:
    hosts = start_sshd_hosts(root, count, sshd_path=require_sshd(), env=env)
    try:
        yield hosts
    finally:
        for h in hosts:
            h.stop(kill_jobs=True)


@pytest.fixture(scope="session")
def sshd_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[SshdHost]]:
    """Three running sshd hosts for the whole session. A test that stops one must start it again."""
    with sshd_hosts_running(tmp_path_factory.mktemp("sshd"), 3) as hosts:
        yield hosts
