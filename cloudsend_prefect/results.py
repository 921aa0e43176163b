"""What a batch produced: per-job results (persisted by Prefect, hence cached) and the batch summary."""

from __future__ import annotations

import shutil
from pathlib import Path

from pydantic import BaseModel

from cloudsend_prefect.paths import cloudsend_home


class JobResult(BaseModel):
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

    @property
    def ok(self) -> bool:
        return self.state == "done"


class BatchSummary(BaseModel):
    batch: str
    results_dir: str
    jobs: list[JobResult]
    round_trips: dict[str, int] = {}  # per host: commands and file transfers this run made
    cost: float | None = None  # USD of the aws instances, provisioning to teardown (upper bound); None: no aws host

    @property
    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for job in self.jobs:
            counts[job.state] = counts.get(job.state, 0) + 1
        return counts

    @property
    def ok(self) -> bool:
        return all(job.ok for job in self.jobs)


def store_dir(key: str) -> Path:
    return cloudsend_home() / "outputs" / key


def deliver(result: JobResult, dest: Path) -> bool:
    """Copy a job's stored outputs and logs to ``dest``; False when the store lost them."""
    if result.store is None or not Path(result.store).is_dir():
        return False
    if any(not (Path(result.store) / out).exists() for out in result.outputs):
        return False
    shutil.copytree(result.store, dest, dirs_exist_ok=True)
    return True
