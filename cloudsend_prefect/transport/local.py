"""The local machine as a host: commands through a subprocess, files by copy."""

from __future__ import annotations

import errno
import fnmatch
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from cloudsend_prefect.transport.base import CommandResult, FileRefused, check_regular, copy_bounded

# What a job on the local provider sees of the client's environment: what a login gives (identity, locale,
# PATH) and what package tools need to reach their registries (TLS roots, proxies, pip/uv/conda settings),
# never the rest: the client's credentials (AWS keys, Prefect API keys, tokens...) stay with the client.
# ``pass_env`` (the config's) adds names or shell patterns.
PASSED_ENV = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "LC_*",
    "TZ",
    "TMPDIR",
    "*_PROXY",
    "*_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "PIP_*",
    "UV_*",
    "CONDA_*",
    "MAMBA_*",
)


def job_environment(pass_env: Sequence[str] = ()) -> dict[str, str]:
    """The client's variables a local job gets: those matching ``PASSED_ENV`` or ``pass_env``."""
    patterns = (*PASSED_ENV, *pass_env)
    return {k: v for k, v in os.environ.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}


class LocalTransport:
    """The client machine as a ``Transport``: what the local provider's hosts and tests run on.

    Commands run from the user's home with only ``job_environment``'s variables, so a local job sees what an SSH
    login would and never the client's credentials.
    """

    name = "local"

    def __init__(self, name: str = "local", pass_env: Sequence[str] = ()) -> None:
        self.name = name
        self.round_trips = 0
        self._home = Path.home()
        self._env = job_environment(pass_env)

    def run(self, command: str, *, stdin: str | None = None, timeout: float | None = None) -> CommandResult:
        """Run ``command`` with ``/bin/sh -c`` from home (see ``Transport.run``); a timeout is a ``TimeoutError``."""
        self.round_trips += 1
        try:
            proc = subprocess.run(
                ["/bin/sh", "-c", command],
                input=stdin if stdin is not None else "",
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=self._home,
                env=self._env,
            )
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(f"{self.name}: command timed out after {timeout}s") from exc
        return CommandResult(proc.returncode, proc.stdout, proc.stderr)

    def _path(self, remote: str) -> Path:
        return Path(os.path.expanduser(remote)) if remote.startswith("~") else self._home / remote

    def put(self, local: Path, remote: str) -> None:
        """Copy ``local`` to ``remote`` (absolute, ``~``-relative or relative to home)."""
        self.round_trips += 1
        shutil.copyfile(local, self._path(remote))

    def _open(self, remote: str) -> int:
        """O_NOFOLLOW: a link is refused, not followed; O_NONBLOCK: opening a FIFO does not wait for a writer."""
        try:
            return os.open(self._path(remote), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise FileRefused(f"{remote} is a symbolic link: only regular files are fetched") from None
            raise

    def get(self, remote: str, local: Path, *, max_bytes: int | None = None, tail: int | None = None) -> int:
        """Copy the regular file ``remote`` to ``local`` (see ``Transport.get``).

        The file is opened without following links or waiting on a FIFO and checked on the open descriptor, so what a
        job leaves behind is refused before it is read.
        """
        self.round_trips += 1
        fd = self._open(remote)
        with os.fdopen(fd, "rb") as source:
            st = os.fstat(fd)
            skip = check_regular(remote, st.st_mode, st.st_size, max_bytes, tail)
            return copy_bounded(source, st.st_size, skip, local)

    def read(self, remote: str, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes of ``remote`` from ``offset`` (b"" when it does not exist): what ``logs`` follows."""
        self.round_trips += 1
        try:
            fd = self._open(remote)
        except FileNotFoundError:
            return b""
        try:
            st = os.fstat(fd)
            check_regular(remote, st.st_mode, st.st_size, None, None)
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Nothing to close: every command is its own process."""
        return None
