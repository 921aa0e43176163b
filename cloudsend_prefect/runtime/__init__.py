"""The client side of the host runtime: drives ``host.sh`` on any host through a transport.

Every call is one round trip (plus file transfers only for content the host does not have yet), whatever
the number of jobs: staging sends a manifest of many jobs on stdin, status returns every job of a batch.
"""

from __future__ import annotations

import hashlib
import platform
import secrets
import shlex
import tempfile
import time
from collections.abc import Mapping, Sequence
from importlib.resources import files
from pathlib import Path

import uv

from cloudsend_prefect import protocol
from cloudsend_prefect.protocol import EnvState, JobStatus
from cloudsend_prefect.providers import Connections, HostInfo, upkeep
from cloudsend_prefect.specs import DEFAULT_MAX_OUTPUT_BYTES, EnvSpec, FileSpec, JobSpec
from cloudsend_prefect.transport import CommandResult, Transport

SCRIPT = files("cloudsend_prefect.runtime").joinpath("host.sh").read_bytes()
CONDA_SCRIPT = files("cloudsend_prefect.runtime").joinpath("host_conda.py").read_bytes()  # see host_conda.py
VERSION = hashlib.sha256(SCRIPT + CONDA_SCRIPT).hexdigest()[:12]

LOG_TAIL_BYTES = 64 * 1024  # at most this much of a log's end is read for its last lines
SHARE_ABOVE = 16 * 1024**2  # uploads larger than this are shared read-only by the jobs of a host, not copied
DEFAULT_LEASE = 60.0  # seconds a staging lets the batch's queued jobs start, unless renewed
SPOT_CHECK = 5.0  # seconds between two reads of a spot instance's interruption notice (EC2 gives two minutes)


class HostCommandError(RuntimeError):
    """A runtime command failed on the host for a reason other than the job itself."""


class HostRuntime:
    """One host's runtime under ``base`` (absolute, or relative to the login home)."""

    def __init__(
        self,
        transport: Transport,
        base: str,
        capacity: int,
        gpus: int = 0,
        *,
        idle: int | None = None,
        imds: str | None = None,
    ) -> None:
        self.transport = transport
        self.base = base.rstrip("/")
        self.capacity = capacity
        self.gpus = gpus
        self.idle = idle  # an instance's dead-man switch limit in seconds: re-armed at each install
        self.imds = imds  # a spot instance's metadata service: its interruption notice is read by ticks
        self.interruption: str | None = None  # EC2's spot interruption notice, once a tick has read one
        self._next_notice = 0.0  # monotonic time of the next read
        self.script = protocol.script_path(self.base, VERSION)
        self._verified: set[str] = set()  # store files checked (or sent) by this client: not hashed again
        self._sizes: dict[str, int] = {}

    @classmethod
    def for_host(cls, info: HostInfo, connections: Connections, *, watching: bool = True) -> HostRuntime:
        """The runtime of a host, its connection the one in ``connections``.

        Args:
            info: The host, as its provider describes it.
            connections: The pool of the run (or command) that reaches the host.
            watching: The batch's own client: it also keeps the host's upkeep (a cloud instance's dead-man
                switch re-armed at each install, a spot instance's interruption notice read every
                ``SPOT_CHECK`` seconds of ticks). Someone looking at a host or acting on it once (``cloudsend
                status``, ``cancel``, ``prune``) does neither.
        """
        transport = connections.get(info)
        if not watching:
            return cls(transport, info.base_dir, info.cpus, info.gpus)
        care = upkeep(info)
        return cls(transport, info.base_dir, info.cpus, info.gpus, idle=care.idle_seconds, imds=care.notices)

    def _q(self, path: str) -> str:
        return shlex.quote(path) if not path.startswith("~/") else "~/" + shlex.quote(path[2:])

    def call(
        self, *args: str, stdin: str | None = None, timeout: float | None = 120, env: Mapping[str, str] | None = None
    ) -> CommandResult:
        """Run a host.sh command (with ``env``'s variables set for it) in one round trip."""
        assigned = [f"{name}={shlex.quote(value)}" for name, value in (env or {}).items()]
        line = " ".join(
            [*assigned, "sh", self._q(self.script), args[0], self._q(self.base), *map(shlex.quote, args[1:])]
        )
        result = self.transport.run(line, stdin=stdin, timeout=timeout)
        if result.exit_code not in (0,):
            raise HostCommandError(
                f"{self.transport.name}: host.sh {args[0]} failed ({result.exit_code}): {result.stderr}"
            )
        return result

    def install(self) -> None:
        """Ship this version of host.sh unless the host already has it (one round trip when it does)."""
        base, script = self._q(self.base), self._q(self.script)
        check = self.transport.run(  # the base is private to the login user, whoever made it
            f"umask 077 && mkdir -p {base}/{protocol.BIN} && chmod 700 {base} && test -f {script} && echo present"
        )
        if "present" in check.stdout:
            self.arm()
            return
        conda_script = self.script.removesuffix(".sh") + "-conda.py"  # where host.sh looks for it
        with tempfile.TemporaryDirectory() as tmp:
            for text, remote in ((CONDA_SCRIPT, conda_script), (SCRIPT, self.script)):  # host.sh last: its
                local = Path(tmp) / "script"  # presence says the version is complete
                local.write_bytes(text)
                self.transport.put(local, remote)
        self.transport.run(f"chmod 600 {self._q(self.script)} {self._q(conda_script)}")
        self.arm()

    def arm(self) -> None:
        """A client's contact with an instance that has a dead-man switch: it powers off only ``idle`` seconds
        after this (or after its last running job or running lease, whichever is later). Nothing elsewhere."""
        if self.idle is not None:
            self.call("arm", str(self.idle))

    # -- environments -------------------------------------------------------------------------------
    def env_state(self, env: EnvSpec) -> EnvState:
        """``ready``, ``building``, ``failed`` or ``absent`` (anything else the host says counts as absent)."""
        path = f"{self._q(self.env_dir(env))}/{protocol.ENV_STATE}"
        state = self.transport.run(f"cat {path} 2>/dev/null").stdout.strip()
        return protocol.parse_env_state(state)

    def env_dir(self, env: EnvSpec) -> str:
        """The environment's directory on the host."""
        return protocol.env_dir(self.base, env.key)

    def ensure_env(self, env: EnvSpec) -> EnvState:
        """Start building the environment in the background unless it is ready or being built.

        A host with no Python tools for a pip or conda environment (no uv, and a python3 that cannot make a venv,
        as on stock Ubuntu and Debian images) is sent this client's own uv when both run the same OS and
        architecture: nothing needs installing as root, and no download from outside a package registry.
        Otherwise the host installs python3-venv if it can, or the build fails saying what the host lacks.
        """
        if self.env_state(env) == protocol.READY:
            return protocol.READY
        self.transport.run(f"mkdir -p {self._q(self.env_dir(env))}")
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in env.files.items():
                local = Path(tmp) / name
                local.write_text(text)
                self.transport.put(local, f"{self.env_dir(env)}/{name}")
        answer = self.call("env", env.key).stdout.split()
        if answer[:1] == [protocol.NEEDS_UV]:
            sent = self._send_uv(answer[1:])
            answer = self.call("env", env.key, *([] if sent else [protocol.NO_UV])).stdout.split()
        return protocol.parse_env_state(answer[0] if answer else "")

    def _send_uv(self, host_platform: list[str]) -> bool:
        """Put this client's uv at ``<base>/bin/uv`` if it runs on the host's ``uname -s``/``uname -m``; whether
        it is there now. (A build that starts without it must not wait for it: jobs wait for the build.)"""
        binary = client_uv(host_platform)
        if binary is None:
            return False
        final = f"{self.base}/{protocol.BIN}/uv"
        # Under a name of its own, then moved into place whole: a build never runs a binary still being written
        # (two environments of a host may ask for uv at once).
        incoming = f"{final}.{secrets.token_hex(8)}"
        try:
            self.transport.put(binary, incoming)
        except OSError:  # the host's disk, say: the build goes on without uv and its log says what is missing
            self.transport.run(f"rm -f {self._q(incoming)}")
            return False
        moved = self.transport.run(f"chmod 700 {self._q(incoming)} && mv -f {self._q(incoming)} {self._q(final)}")
        return moved.exit_code == 0

    def env_log_tail(self, env: EnvSpec, lines: int = 30) -> str:
        """The end of an environment's build log: what a user needs to see why its build failed."""
        log = f"{self._q(self.env_dir(env))}/{protocol.ENV_LOG}"
        return self.transport.run(f"tail -c {LOG_TAIL_BYTES} {log} 2>/dev/null | tail -n {int(lines)}").stdout

    # -- jobs -----------------------------------------------------------------------------------------
    def upload(self, specs: list[FileSpec]) -> int:
        """Send the files the host's content store lacks, or holds with other content than their hash says
        (checked once per file and client); returns how many were sent."""
        by_sha = {f.sha256: f for f in specs if f.sha256 not in self._verified}
        if not by_sha:
            return 0
        missing = self.call("missing", stdin="\n".join(by_sha) + "\n").stdout.split()
        for sha in missing:
            self.transport.put(Path(by_sha[sha].local), f"{self.base}/{protocol.INCOMING}/{sha}")
        self._verified.update(by_sha)
        return len(missing)

    def stage(
        self,
        batch: str,
        jobs: list[JobSpec],
        rerun: Mapping[str, int] | None = None,
        lease: float = DEFAULT_LEASE,
        watch: Sequence[str] = (),
    ) -> dict[str, JobStatus]:
        """Upload, stage and queue jobs, and read the records of the jobs in ``watch``: a dispatcher's poll in
        one round trip (plus one to send files the host lacks). The host starts queued jobs as its CPUs free
        up, while the batch's lease (renewed here for ``lease`` seconds) runs.

        Jobs the host already knows are left alone (re-attached), except ended ones ``rerun`` asks to replace:
        ``RERUN_FAILED`` replaces a record that ended other than done, ``RERUN_ANY`` even a done one.
        """
        self.upload([f for job in jobs for f in job.files])
        flags = {f.sha256: self._flags(f) for job in jobs for f in job.files}
        manifest = "".join(protocol.manifest_job(batch, job, (rerun or {}).get(job.key, 0), flags) for job in jobs)
        ask = {}  # a spot instance's interruption notice, every SPOT_CHECK seconds
        if self.imds is not None and time.monotonic() >= self._next_notice:
            self._next_notice = time.monotonic() + SPOT_CHECK
            ask["CLOUDSEND_IMDS"] = self.imds
        slots = protocol.slots_arg(self.capacity, self.gpus)
        out = self.call("tick", slots, protocol.lease_arg(lease), batch, *watch, stdin=manifest, env=ask).stdout
        self.interruption = protocol.parse_interruption(out) or self.interruption
        return protocol.parse_records(out)

    def _flags(self, spec: FileSpec) -> str:
        """An upload's manifest flags: ``x`` executable, ``l`` large (shared read-only, not copied per job)."""
        size = self._sizes.get(spec.sha256)
        if size is None:
            size = self._sizes[spec.sha256] = Path(spec.local).stat().st_size
        return protocol.file_flags(spec.executable, size > SHARE_ABOVE)

    def status(self, batch: str, keys: list[str] | None = None, lease: float = 0) -> dict[str, JobStatus]:
        """The records of the batch's jobs (or of ``keys`` only), in one round trip; with ``lease``, the
        batch's queued jobs may start on this host for that many seconds more (only the batch's own client
        should renew it: someone merely looking must not keep a dead client's queue alive)."""
        return protocol.parse_records(self.call("status", batch, protocol.lease_arg(lease), *(keys or [])).stdout)

    def renew(self, batch: str, lease: float) -> None:
        """Renew the batch's lease on this host without asking about any job."""
        self.call("lease", batch, protocol.lease_arg(lease))

    def cancel(self, batch: str, keys: list[str] | None = None) -> list[str]:
        """Cancel the batch's jobs (or ``keys`` only) on the host: queued ones never start, running ones are
        killed with their process group; their records end aborted, cancelled. Returns the keys cancelled."""
        return self.call("cancel", batch, *(keys or [])).stdout.split()

    def old_jobs(self, minutes: int) -> tuple[float, list[tuple[int, float, str]]]:
        """Ended jobs' records older than ``minutes``, of batches no client is running (their lease expired).

        Returns:
            The host's clock, and per job its size in bytes, its end (host clock) and its ``<batch>/<key>``.
        """
        return protocol.parse_old_jobs(self.call("old", str(max(0, int(minutes))), timeout=300).stdout)

    def forget(self, jobs: list[str]) -> None:
        """Remove these jobs' records (``<batch>/<key>``, as ``old_jobs`` lists them), each only if it has
        still ended when its turn comes."""
        if jobs:
            self.call("forget", *jobs, timeout=600)

    def job_dir(self, batch: str, key: str) -> str:
        """The job's record on the host (its status, logs...), out of the job's way."""
        return protocol.job_dir(self.base, batch, key)

    def work_dir(self, batch: str, key: str) -> str:
        """The job's working directory: its uploads and what it writes (outputs are relative to it)."""
        return f"{self.job_dir(batch, key)}/{protocol.WORK}"

    def fetch(
        self,
        batch: str,
        key: str,
        outputs: list[str],
        dest: Path,
        max_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
        logs: str | None = None,
    ) -> list[Path]:
        """Copy a finished job's output files (and its stdout/stderr) into ``dest``.

        Only regular files are copied, and at most ``max_bytes`` of outputs in all (``FileRefused`` otherwise;
        host.sh has checked both when the job ended, this holds even if something changed them since). A log
        longer than ``max_bytes`` is cut to its end, with a first line saying so. ``logs``: the job's final
        record's word on which logs hold something (``JobStatus.logs``); an empty one is made here, without a
        round trip (None: unknown, both are fetched).
        """
        got = []
        budget = max_bytes
        for rel in outputs:
            budget -= self.transport.get(f"{self.work_dir(batch, key)}/{rel}", dest / rel, max_bytes=budget)
            got.append(dest / rel)
        for stream, flag in protocol.LOG_FLAGS.items():  # absent when the job never started
            if logs is not None and flag not in logs:
                dest.mkdir(parents=True, exist_ok=True)
                (dest / f"{stream}.log").touch()
                got.append(dest / f"{stream}.log")
                continue
            try:
                self.transport.get(f"{self.job_dir(batch, key)}/{stream}", dest / f"{stream}.log", tail=max_bytes)
            except FileNotFoundError:
                continue
            got.append(dest / f"{stream}.log")
        return got

    def read_log(self, batch: str, key: str, stream: str, offset: int, size: int = 1 << 20) -> bytes:
        """Up to ``size`` bytes of a job's stdout or stderr from byte ``offset`` on (one round trip): what
        ``logs`` reads chunk by chunk, in constant memory whatever the log's length."""
        return self.transport.read(f"{self.job_dir(batch, key)}/{stream}", offset, size)


_MACHINES = {"amd64": "x86_64", "arm64": "aarch64"}  # platform.machine() spellings as uname -m says them


def client_uv(host_platform: Sequence[str]) -> Path | None:
    """The uv binary of this client's ``uv`` package when it runs on a host of ``[uname -s, uname -m]``."""
    if len(host_platform) != 2:
        return None
    system, machine = host_platform
    here = platform.machine().lower()
    if system != platform.system() or _MACHINES.get(here, here) != _MACHINES.get(machine.lower(), machine.lower()):
        return None
    try:
        return Path(uv.find_uv_bin())
    except FileNotFoundError:
        return None
