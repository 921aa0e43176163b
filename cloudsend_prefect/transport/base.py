"""The narrow transport interface every host is reached through.

A transport runs one POSIX shell command line on its host and moves files. It knows nothing of jobs,
environments or providers: the host runtime (``cloudsend_prefect.runtime``) builds on these three calls
so that the same code drives the local machine and any SSH host.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

_CHUNK = 1 << 20


class TransportError(RuntimeError):
    """The host could not be reached or refused us (not a failing command: those return an exit code)."""

    def __init__(self, host: str, message: str) -> None:
        super().__init__(f"{host}: {message}")
        self.host = host


class FileRefused(OSError):
    """A remote path that is not a regular file (a link, FIFO, device...), or is larger than allowed: nothing
    is copied. Fetching trusts nothing a job left behind."""


@dataclass(frozen=True)
class CommandResult:
    """What one command on a host gave back: a failing command is a result, not an exception, so callers
    decide what an exit code means.
    """

    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        """Whether the command exited 0."""
        return self.exit_code == 0


class Transport(Protocol):
    """One host. Implementations must be safe to call from many threads at once."""

    name: str
    round_trips: int  # commands and transfers so far: what watching a batch costs

    def run(self, command: str, *, stdin: str | None = None, timeout: float | None = None) -> CommandResult:
        """Run ``command`` with ``/bin/sh -c`` on the host, from the login user's home directory.

        Returns the exit code and output whatever the exit code; raises ``TransportError`` only when the
        host cannot be reached, and ``TimeoutError`` when ``timeout`` seconds pass.
        """
        ...

    def put(self, local: Path, remote: str) -> None:
        """Copy a local file to ``remote`` (absolute, or relative to home); parent dirs must exist."""
        ...

    def get(self, remote: str, local: Path, *, max_bytes: int | None = None, tail: int | None = None) -> int:
        """Copy the regular file ``remote`` to the local path (created with the user's umask, parent dirs too,
        written under a temporary name so a failed copy leaves nothing); returns the bytes copied.

        Raises ``FileRefused`` when ``remote`` is a symbolic link or not a regular file, or is larger than
        ``max_bytes``; with ``tail``, a longer file is cut to its last ``tail`` bytes instead, after a line
        saying so. ``FileNotFoundError`` when it does not exist.
        """
        ...

    def read(self, remote: str, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes of the regular file ``remote`` from ``offset`` on (b"" past its end or when it
        does not exist)."""
        ...

    def close(self) -> None:
        """Release the connection; jobs running on the host go on, and the next call may reconnect."""
        ...


def check_regular(where: str, mode: int | None, size: int | None, max_bytes: int | None, tail: int | None) -> int:
    """Refuse what is not a regular file, or too large a one; returns how many leading bytes to skip."""
    if mode is None or not stat.S_ISREG(mode):
        kind = "a symbolic link" if mode is not None and stat.S_ISLNK(mode) else "not a regular file"
        raise FileRefused(f"{where} is {kind}: only regular files are fetched")
    size = size or 0
    if tail is not None:
        return max(0, size - tail)
    if max_bytes is not None and size > max_bytes:
        raise FileRefused(f"{where} is {size} bytes, over the {max_bytes} bytes left of its job's output limit")
    return 0


def copy_bounded(source: BinaryIO, size: int, skip: int, local: Path) -> int:
    """Copy ``size - skip`` bytes of ``source`` (from ``skip``) to ``local`` through a temporary file, never
    more even if the source grows meanwhile, and no less (a cut transfer is an ``EOFError``). Returns the
    bytes copied from the source. The copy gets the user's umask, nothing of the source's mode."""
    local.parent.mkdir(parents=True, exist_ok=True)
    part = local.with_name(f".{local.name}.part")
    want = size - skip
    try:
        with part.open("wb") as out:
            if skip:
                source.seek(skip)
                out.write(f"[cloudsend: the first {skip} bytes are left out; the whole file is on its host]\n".encode())
            left = want
            while left > 0:
                chunk = source.read(min(_CHUNK, left))
                if not chunk:
                    raise EOFError(f"got {want - left} of {want} bytes")
                out.write(chunk)
                left -= len(chunk)
        os.replace(part, local)
    finally:
        part.unlink(missing_ok=True)
    return want
