"""What a batch produced: per-job results (persisted by Prefect, hence cached) and the batch summary."""

from __future__ import annotations

import contextlib
import fcntl
import shutil
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel

from cloudsend_prefect.paths import cloudsend_home
from cloudsend_prefect.runtime import LOG_TAIL_BYTES


class JobResult(BaseModel):
    """How one job of a batch ended: the return value of its Prefect task, persisted by Prefect, so a later run of
    the batch reads it from the cache instead of running the job again (``cached`` then says so).

    ``state`` is ``done``, ``failed`` or ``aborted`` (never started, lost, cancelled, or its environment failed);
    ``reason`` says why a job is not done.
    """

    name: str
    key: str
    state: str
    reason: str = ""
    exit_code: int | None = None
    duration: float | None = None
    started: float | None = None  # epoch seconds, host clock
    ended: float | None = None
    host: str | None = None
    lost: bool = False  # its host was lost under it: run again elsewhere through a Prefect retry
    outputs: list[str] = []
    store: str | None = None  # client-side copy of the outputs and logs, which survives the hosts
    cached: bool = False  # from an earlier run (Prefect's cache): not run again by this one

    @property
    def ok(self) -> bool:
        """Whether the job ended ``done`` (what the batch's success and the exit code count)."""
        return self.state == "done"


class BatchSummary(BaseModel):
    """The flow's return value: every job's result in the batch's order, what the CLI's table, the Prefect
    artifacts and ``BatchFailed`` are made from.
    """

    batch: str
    results_dir: str
    jobs: list[JobResult]
    round_trips: dict[str, int] = {}  # per host: commands and file transfers this run made
    cost: float | None = None  # USD of the aws instances, provisioning to teardown (upper bound); None: no aws host

    @property
    def counts(self) -> dict[str, int]:
        """Jobs by state: the counts line under the table and in the failure message."""
        counts: dict[str, int] = {}
        for job in self.jobs:
            counts[job.state] = counts.get(job.state, 0) + 1
        return counts

    @property
    def ok(self) -> bool:
        """Whether every job is done: the flow run is Completed (else Failed) and the CLI exits 0."""
        return all(job.ok for job in self.jobs)

    def failure(self, shown: int = 3) -> str:
        """One line on a batch with jobs not done: counts per state, then the first few of them and why."""
        missed = [job for job in self.jobs if not job.ok]
        counts = ", ".join(f"{n} {state}" for state, n in sorted(self.counts.items()))
        first = "; ".join(f"{job.name}: {job.state}, {job.reason or 'no reason given'}" for job in missed[:shown])
        more = f"; and {len(missed) - shown} more" if len(missed) > shown else ""
        return f"{len(missed)} of {len(self.jobs)} jobs of batch {self.batch} not done ({counts}): {first}{more}"


class BatchFailed(RuntimeError):
    """A batch ended with jobs not done: the flow run's Failed state carries it, and with it the summary
    (outputs of the done jobs are delivered all the same)."""

    def __init__(self, summary: BatchSummary) -> None:
        super().__init__(summary.failure())
        self.summary = summary

    def __reduce__(self) -> tuple[type[BatchFailed], tuple[BatchSummary]]:
        return BatchFailed, (self.summary,)  # persisted with the flow run's result, and read back


def store_dir(batch: str, key: str) -> Path:
    """The client-side copy of a job run's outputs and logs, per batch like its cache key (see
    ``tasks.JobCachePolicy``): a batch never reads, replaces or prunes another's."""
    return cloudsend_home() / "outputs" / batch / key


@contextlib.contextmanager
def store_lock(store: Path) -> Iterator[None]:
    """Hold ``store`` alone: two runs of the same config (same job keys) fetch into and deliver from the same
    store directory, and must not see it half-replaced. An advisory lock, released if the process dies."""
    lock = store.with_name(f"{store.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def deliver(result: JobResult, dest: Path) -> bool:
    """Copy a job's stored outputs and logs to ``dest``; False when the store lost them."""
    if result.store is None:
        return False
    store = Path(result.store)
    with store_lock(store):
        if not store.is_dir() or any(not (store / out).is_file() for out in result.outputs):
            return False
        shutil.copytree(store, dest, dirs_exist_ok=True)
    return True


def tail_lines(path: Path, lines: int = 20, max_bytes: int = LOG_TAIL_BYTES) -> list[str]:
    """The last ``lines`` lines of a file, read from at most its last ``max_bytes``: constant memory, however
    long the file (a job may write gigabytes to stderr)."""
    if not path.is_file():
        return []
    with path.open("rb") as f:
        size = f.seek(0, 2)
        f.seek(max(0, size - max_bytes))
        return f.read().decode(errors="replace").splitlines()[-lines:]
