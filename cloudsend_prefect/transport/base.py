"""The narrow transport interface every host is reached through.

A transport runs one POSIX shell command line on its host and moves files. It knows nothing of jobs,
environments or providers: the host runtime (``cloudsend_prefect.runtime``) builds on these three calls
so that the same code drives the local machine and any SSH host.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class TransportError(RuntimeError):
    """The host could not be reached or refused us (not a failing command: those return an exit code)."""

    def __init__(self, host: str, message: str) -> None:
        super().__init__(f"{host}: {message}")
        self.host = host


@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
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

    def get(self, remote: str, local: Path) -> None:
        """Copy ``remote`` to the local path, creating local parent dirs."""
        ...

    def close(self) -> None: ...
