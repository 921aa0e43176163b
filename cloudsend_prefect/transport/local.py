"""The local machine as a host: commands through a subprocess, files by copy."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from cloudsend_prefect.transport.base import CommandResult


class LocalTransport:
    name = "local"

    def __init__(self, name: str = "local") -> None:
        self.name = name
        self.round_trips = 0
        self._home = Path.home()

    def run(self, command: str, *, stdin: str | None = None, timeout: float | None = None) -> CommandResult:
        self.round_trips += 1
        try:
            proc = subprocess.run(
                ["/bin/sh", "-c", command],
                input=stdin if stdin is not None else "",
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=self._home,
            )
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(f"{self.name}: command timed out after {timeout}s") from exc
        return CommandResult(proc.returncode, proc.stdout, proc.stderr)

    def _path(self, remote: str) -> Path:
        return Path(os.path.expanduser(remote)) if remote.startswith("~") else self._home / remote

    def put(self, local: Path, remote: str) -> None:
        self.round_trips += 1
        shutil.copyfile(local, self._path(remote))

    def get(self, remote: str, local: Path) -> None:
        self.round_trips += 1
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._path(remote), local)

    def close(self) -> None:
        return None
