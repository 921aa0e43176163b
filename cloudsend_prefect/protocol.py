"""The host protocol: everything the client and the scripts on a host must agree on, in one place.

The client side is ``runtime.HostRuntime`` (the only caller of ``host.sh``); the host side is
``runtime/host.sh`` and the dead-man switch ``providers/deadman.sh``, which reads host.sh's layout. They share:

- the manifest ``host.sh tick`` reads on stdin (``manifest_job``): a ``J`` line per job, then its ``F`` files,
  ``O`` outputs and ``C`` command lines, then ``E``;
- the job record ``host.sh status`` prints, one JSON line per job (``JobStatus``), with its state
  (``JobState``) and, for the ends the client acts upon, a cause (``Cause``);
- an environment's build state (``EnvState``) and the words of ``host.sh env``;
- the layout under the runtime's base directory (``FILES``, ``ENVS``, ``JOBS``... and the files of a job).

The shell scripts get these names from a block of variable assignments that ``shell_block`` renders from this
module: each script carries the block for the names it uses, between ``# <protocol>`` and ``# </protocol>``,
and tests/test_host_sh.py checks that it is exactly what this module renders (edit names here, then paste the
block the test prints).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Literal, cast, get_args

from pydantic import BaseModel

from cloudsend_prefect.specs import JobSpec

JobState = Literal["queued", "waiting", "running", "done", "failed", "aborted"]
JOB_STATES: tuple[JobState, ...] = get_args(JobState)
FINAL_STATES: tuple[JobState, ...] = ("done", "failed", "aborted")  # a record in these never changes again

# Why a job ended, where the client acts on it: ``fenced``, not started because its batch's lease expired (the
# client queues it again); ``cancelled`` on the host (its task ends Cancelled, never retried); ``environment``,
# its environment failed to build (the build's log is shown).
Cause = Literal["fenced", "cancelled", "environment"]
CAUSES: tuple[Cause, ...] = get_args(Cause)
FENCED: Cause = "fenced"
CANCELLED: Cause = "cancelled"
ENV_FAILED: Cause = "environment"

EnvState = Literal["absent", "building", "ready", "failed"]  # absent: no state file (never asked for)
ENV_STATES: tuple[EnvState, ...] = get_args(EnvState)
BUILDING: EnvState = "building"
READY: EnvState = "ready"
BUILD_FAILED: EnvState = "failed"
NEEDS_UV = "needs-uv"  # ``host.sh env``'s answer when the build needs Python tools the host lacks
NO_UV = "nouv"  # ``host.sh env KEY nouv``: build without them (the client could not send its uv)

RERUN_FAILED = 1  # manifest: replace the job's record if it ended other than done (a retry, a fenced job)
RERUN_ANY = 2  # manifest: replace it even if it ended done (an explicit rerun of the batch)

# The layout under the runtime's base directory (host.sh's header comment describes each part).
FILES = "files"  # the content store: files/<sha256>
INCOMING = "files/.incoming"  # uploads arriving, moved into the store by the next tick
ENVS = "envs"  # envs/<key>/: one environment each
JOBS = "jobs"  # jobs/<batch>/<key>/: a job's record (see the names below)
QUEUE = "queue"  # host-wide queue entries, "<batch> <key>", started in name order
RUNNING = "running"  # running/<batch>__<key>: "<cpus> <gpu devices or ->" while the job runs, "0" once ended
LEASES = "leases"  # leases/<batch>: its mtime is when the batch's lease expires
TOOLS = "tools"  # what environment builds share (rattler, the conda package cache, a Julia)
BIN = "bin"  # host.sh itself (one file per version) and a uv the client sent
CONTACT = "contact"  # a client's last contact (mtime) and its idle limit in seconds, for the dead-man switch
JOB_REL = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*/[A-Za-z0-9_-][A-Za-z0-9._-]*")  # <batch>/<key> under JOBS
RUN_SEP = "__"  # between batch and key in a running/ entry's name (batch names never hold it)
# ... in a job's directory
WORK = "work"  # the job's working directory: its uploads and what it writes, nothing of the runtime's
STDOUT = "stdout"
STDERR = "stderr"
PID = "pid"  # its process group's leader
END = "end"  # when it ended (epoch seconds)
# ... in an environment's directory
ENV_STATE = "state"
ENV_LOG = "bootstrap.log"

LOG_FLAGS = {STDOUT: "o", STDERR: "e"}  # JobStatus.logs: which logs held something when the record was written


def _shell_names() -> dict[str, str]:
    names: dict[str, str] = {f"S_{state.upper()}": state for state in JOB_STATES}
    names |= {"C_FENCED": FENCED, "C_CANCELLED": CANCELLED, "C_ENV": ENV_FAILED}
    names |= {"E_BUILDING": BUILDING, "E_READY": READY, "E_FAILED": BUILD_FAILED, "NEEDS_UV": NEEDS_UV, "NO_UV": NO_UV}
    names |= {"D_FILES": FILES, "D_INCOMING": INCOMING, "D_ENVS": ENVS, "D_JOBS": JOBS, "D_QUEUE": QUEUE}
    names |= {"D_RUNNING": RUNNING, "D_LEASES": LEASES, "D_TOOLS": TOOLS, "D_BIN": BIN, "F_CONTACT": CONTACT}
    names |= {"RERUN_ANY": str(RERUN_ANY), "RUN_SEP": RUN_SEP}
    names |= {"J_WORK": WORK, "J_STDOUT": STDOUT, "J_STDERR": STDERR, "J_PID": PID, "J_END": END}
    names |= {"L_STDOUT": LOG_FLAGS[STDOUT], "L_STDERR": LOG_FLAGS[STDERR]}
    names |= {"V_STATE": ENV_STATE, "V_LOG": ENV_LOG}
    return names


SHELL_NAMES = _shell_names()  # the shell variable of each name above, as the scripts' blocks assign them
BLOCK_START = "# <protocol> generated from cloudsend_prefect/protocol.py (shell_block): edit names there"
BLOCK_END = "# </protocol>"


def shell_block(names: Iterable[str]) -> str:
    """The block of assignments a shell script carries for the protocol names it uses.

    Args:
        names: shell variables of ``SHELL_NAMES``, in the order the script lists them.

    Returns:
        The block, markers included, each line ending with a newline.

    Raises:
        KeyError: a name the protocol does not define.
    """
    quoted = {name: "'" + SHELL_NAMES[name].replace("'", "'\\''") + "'" for name in names}  # always: `done` is a word
    lines = [f"{name}={value}" for name, value in quoted.items()]
    return "".join(f"{line}\n" for line in [BLOCK_START, *lines, BLOCK_END])


class JobStatus(BaseModel):
    """A job's record on its host, as ``host.sh status`` prints it (one JSON object a line)."""

    key: str
    state: JobState
    pid: int | None = None
    start: float | None = None
    end: float | None = None
    exit: int | None = None
    reason: str = ""
    cause: Cause | None = None  # why it ended, where the client acts on it (see Cause)
    logs: str | None = None  # which logs held something when this record was written: o stdout, e stderr
    lost: bool = False  # aborted because its host was lost, not for anything the job did: worth retrying

    @property
    def final(self) -> bool:
        """Whether the record is an end (it never changes again, unless a rerun replaces it)."""
        return self.state in FINAL_STATES

    @property
    def fenced(self) -> bool:
        """Not started because its batch's lease expired: not the job's doing; it can be queued again."""
        return self.state == "aborted" and self.cause == FENCED

    @property
    def cancelled(self) -> bool:
        """Cancelled on its host (queued or running), by the batch's cancellation or ``cloudsend cancel``."""
        return self.state == "aborted" and self.cause == CANCELLED

    @property
    def env_failed(self) -> bool:
        """Not started because its environment failed to build: the build's log says why."""
        return self.state == "aborted" and self.cause == ENV_FAILED

    @property
    def duration(self) -> float | None:
        """Seconds from its start to its end, once it has both."""
        return self.end - self.start if self.start is not None and self.end is not None else None


RECORD_PREFIX = '{"key":'  # how a job record's line starts (host.sh writes key first)
INTERRUPTION_PREFIX = '{"interruption":'  # a tick's line with a spot instance's interruption notice


def parse_records(out: str) -> dict[str, JobStatus]:
    """Job records as host.sh prints them, by key; other lines (a tick's spot interruption notice) are not
    records."""
    lines = (line for line in out.splitlines() if line.startswith(RECORD_PREFIX))
    return {s.key: s for s in (JobStatus.model_validate_json(line) for line in lines)}


def parse_interruption(out: str) -> str | None:
    """EC2's spot interruption notice a tick printed, as text (``action: terminate, time: ...`` for its JSON,
    ``no details`` when empty); None when it printed none."""
    for line in out.splitlines():
        if line.startswith(INTERRUPTION_PREFIX):
            notice = str(json.loads(line)["interruption"])
            with contextlib.suppress(ValueError):
                fields = json.loads(notice)
                if isinstance(fields, dict) and fields:
                    return ", ".join(f"{name}: {value}" for name, value in fields.items())
            return notice or "no details"
    return None


def parse_old_jobs(out: str) -> tuple[float, list[tuple[int, float, str]]]:
    """``host.sh old``'s answer: the host's clock, and per old job its size in bytes, when it ended (host clock)
    and its ``<batch>/<key>``. A line that is not such a job (a name host.sh would never make) is skipped."""
    lines = out.splitlines()
    if not lines:
        raise ValueError("host.sh old printed nothing")
    rows = []
    for line in lines[1:]:
        size, end, rel = line.split(" ", 2)
        if JOB_REL.fullmatch(rel):
            rows.append((int(size) * 1024, float(end), rel))
    return float(lines[0]), rows


def parse_env_state(word: str) -> EnvState:
    """An environment's state as the host wrote or printed it; absent when it gave none (or something else)."""
    return cast(EnvState, word) if word in ENV_STATES else "absent"


def slots_arg(cpus: int, gpus: int) -> str:
    """A host's capacity as ``host.sh tick`` takes it: ``CPUS:GPUS``."""
    return f"{cpus}:{gpus}"


def lease_arg(seconds: float) -> str:
    """A lease as host.sh takes it: whole seconds, rounded up (0: no renewal)."""
    return str(math.ceil(seconds)) if seconds > 0 else "0"


def file_flags(executable: bool, large: bool) -> str:
    """An upload's manifest flags: ``x`` executable, ``l`` large (shared read-only, not copied per job)."""
    return ("x" if executable else "") + ("l" if large else "") or "-"


def manifest_job(batch: str, job: JobSpec, rerun: int, flags: Mapping[str, str]) -> str:
    """A job's lines of a tick's manifest, each ending with a newline.

    ``J batch key cpus env timeout rerun maxout gpus`` (``-``: no environment, no timeout), then ``F sha flags
    rel`` per upload, ``O rel`` per output, ``C line`` per line of its command, and ``E``. A job the host already
    knows is left alone unless ``rerun`` (``RERUN_FAILED``, ``RERUN_ANY``) asks to replace its ended record.

    Args:
        batch: the batch it belongs to.
        job: the job.
        rerun: 0, ``RERUN_FAILED`` or ``RERUN_ANY``.
        flags: ``file_flags`` of each of its uploads, by sha256.

    Raises:
        ValueError: a line break or NUL in a field, which would let a name or command add lines of its own.
    """
    env = job.env.key if job.env else "-"
    timeout = f"{job.timeout:g}" if job.timeout else "-"
    lines = [f"J {batch} {job.key} {job.cpus} {env} {timeout} {rerun} {job.max_output_bytes} {job.gpus}"]
    lines += [f"F {f.sha256} {flags[f.sha256]} {_line(f.rel)}" for f in job.files]
    lines += [f"O {_line(out)}" for out in job.outputs]
    lines += [f"C {_no_nul(text)}" for text in job.command.split("\n")]
    lines.append("E")
    return "".join(line + "\n" for line in lines)


def _line(text: str) -> str:
    """A manifest field: one line, as the config's checks guarantee; refused here too."""
    if "\n" in text or "\r" in text or "\0" in text:
        raise ValueError(f"line break or NUL in a manifest field: {text!r}")
    return text


def _no_nul(text: str) -> str:
    if "\0" in text:
        raise ValueError(f"NUL in a command: {text!r}")
    return text


def script_path(base: str, version: str) -> str:
    """Where a version of host.sh lives on a host (its presence says the version is complete)."""
    return f"{base}/{BIN}/host-{version}.sh"


def env_dir(base: str, key: str) -> str:
    """An environment's directory: the files the client sends, its state, its build log, what it built."""
    return f"{base}/{ENVS}/{key}"


def job_dir(base: str, batch: str, key: str) -> str:
    """A job's record on the host: the runtime's files (status, logs...), out of the job's way."""
    return f"{base}/{JOBS}/{batch}/{key}"
