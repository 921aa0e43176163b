"""The client side of the host runtime: drives ``host.sh`` on any host through a transport.

Every call is one round trip (plus file transfers only for content the host does not have yet), whatever
the number of jobs: staging sends a manifest of many jobs on stdin, status returns every job of a batch.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import tempfile
from importlib.resources import files
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from cloudsend_prefect.specs import EnvSpec, FileSpec, JobSpec
from cloudsend_prefect.transport import CommandResult, Transport

SCRIPT = files("cloudsend_prefect.runtime").joinpath("host.sh").read_bytes()
VERSION = hashlib.sha256(SCRIPT).hexdigest()[:12]

JobState = Literal["queued", "waiting", "running", "done", "failed", "aborted"]
FINAL_STATES = ("done", "failed", "aborted")


class HostCommandError(RuntimeError):
    """A runtime command failed on the host for a reason other than the job itself."""


class JobStatus(BaseModel):
    """A job's record on its host, as ``host.sh status`` reports it."""

    key: str
    state: JobState
    pid: int | None = None
    start: float | None = None
    end: float | None = None
    exit: int | None = None
    reason: str = ""
    lost: bool = False  # aborted because its host was lost, not for anything the job did: worth retrying

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def duration(self) -> float | None:
        return self.end - self.start if self.start is not None and self.end is not None else None


class HostRuntime:
    """One host's runtime under ``base`` (absolute, or relative to the login home)."""

    def __init__(self, transport: Transport, base: str, capacity: int) -> None:
        self.transport = transport
        self.base = base.rstrip("/")
        self.capacity = capacity
        self.script = f"{self.base}/bin/host-{VERSION}.sh"

    def _q(self, path: str) -> str:
        return shlex.quote(path) if not path.startswith("~/") else "~/" + shlex.quote(path[2:])

    def call(self, *args: str, stdin: str | None = None, timeout: float | None = 120) -> CommandResult:
        line = " ".join(["sh", self._q(self.script), args[0], self._q(self.base), *map(shlex.quote, args[1:])])
        result = self.transport.run(line, stdin=stdin, timeout=timeout)
        if result.exit_code not in (0,):
            raise HostCommandError(
                f"{self.transport.name}: host.sh {args[0]} failed ({result.exit_code}): {result.stderr}"
            )
        return result

    def install(self) -> None:
        """Ship this version of host.sh unless the host already has it (one round trip when it does)."""
        check = self.transport.run(
            f"test -f {self._q(self.script)} && echo present || mkdir -p {self._q(self.base)}/bin"
        )
        if "present" in check.stdout:
            return
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "host.sh"
            local.write_bytes(SCRIPT)
            self.transport.put(local, self.script)

    # -- environments -------------------------------------------------------------------------------
    def env_state(self, env: EnvSpec) -> str:
        """``ready``, ``building``, ``failed`` or ``absent``."""
        state = self.transport.run(f"cat {self._q(self.env_dir(env))}/state 2>/dev/null || echo absent")
        return state.stdout.strip() or "absent"

    def env_dir(self, env: EnvSpec) -> str:
        return f"{self.base}/envs/{env.key}"

    def ensure_env(self, env: EnvSpec) -> str:
        """Start building the environment in the background unless it is ready or being built."""
        if self.env_state(env) == "ready":
            return "ready"
        self.transport.run(f"mkdir -p {self._q(self.env_dir(env))}")
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in env.files.items():
                local = Path(tmp) / name
                local.write_text(text)
                self.transport.put(local, f"{self.env_dir(env)}/{name}")
        return self.call("env", env.key).stdout.strip()

    def env_log_tail(self, env: EnvSpec, lines: int = 30) -> str:
        log = f"{self._q(self.env_dir(env))}/bootstrap.log"
        return self.transport.run(f"tail -n {int(lines)} {log} 2>/dev/null").stdout

    # -- jobs -----------------------------------------------------------------------------------------
    def upload(self, specs: list[FileSpec]) -> int:
        """Send the files the host's content store lacks; returns how many were sent."""
        by_sha = {f.sha256: f for f in specs}
        if not by_sha:
            return 0
        missing = self.call("missing", stdin="\n".join(by_sha) + "\n").stdout.split()
        for sha in missing:
            self.transport.put(Path(by_sha[sha].local), f"{self.base}/files/.incoming/{sha}")
        return len(missing)

    def stage(self, batch: str, jobs: list[JobSpec], rerun: frozenset[str] = frozenset()) -> None:
        """Upload, stage and queue jobs; the host starts them as its CPUs free up.

        Jobs the host already knows are left alone (re-attached), except ended ones whose key is in ``rerun``.
        """
        self.upload([f for job in jobs for f in job.files])
        lines = []
        for job in jobs:
            env = job.env.key if job.env else "-"
            timeout = f"{job.timeout:g}" if job.timeout else "-"
            lines.append(f"J {batch} {job.key} {job.cpus} {env} {timeout} {int(job.key in rerun)}")
            lines += [f"F {f.sha256} {'x' if f.executable else '-'} {f.rel}" for f in job.files]
            lines += [f"O {out}" for out in job.outputs]
            lines += [f"C {text}" for text in job.command.split("\n")]
            lines.append("E")
        self.call("stage", str(self.capacity), stdin="\n".join(lines) + "\n")

    def status(self, batch: str) -> dict[str, JobStatus]:
        out = self.call("status", batch).stdout
        return {s.key: s for s in (JobStatus.model_validate(json.loads(line)) for line in out.splitlines() if line)}

    def cancel(self, batch: str, keys: list[str] | None = None) -> list[str]:
        return self.call("cancel", batch, *(keys or [])).stdout.split()

    def job_dir(self, batch: str, key: str) -> str:
        return f"{self.base}/jobs/{batch}/{key}"

    def fetch(self, batch: str, key: str, outputs: list[str], dest: Path) -> list[Path]:
        """Copy a finished job's output files (and its stdout/stderr) into ``dest``."""
        got = []
        for rel in outputs:
            self.transport.get(f"{self.job_dir(batch, key)}/{rel}", dest / rel)
            got.append(dest / rel)
        for stream in ("stdout", "stderr"):  # absent when the job never started
            try:
                self.transport.get(f"{self.job_dir(batch, key)}/{stream}", dest / f"{stream}.log")
            except FileNotFoundError:
                continue
            got.append(dest / f"{stream}.log")
        return got

    def read_log(self, batch: str, key: str, stream: str, offset: int) -> str:
        """A job's stdout or stderr from byte ``offset`` on (one round trip): what ``logs --follow`` polls."""
        path = self._q(f"{self.job_dir(batch, key)}/{stream}")
        return self.transport.run(f"tail -c +{int(offset) + 1} {path} 2>/dev/null").stdout

    def tail(self, batch: str, key: str, stream: str = "stderr", lines: int = 20) -> str:
        path = self._q(f"{self.job_dir(batch, key)}/{stream}")
        return self.transport.run(f"tail -n {int(lines)} {path} 2>/dev/null").stdout
