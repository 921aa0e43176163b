"""The batch's joblog: one tab-separated line per job as it ends, in GNU parallel's ``--joblog`` format.

``<results>/<batch>/joblog.tsv`` (and the client's copy, ``$CLOUDSEND_HOME/batches/<batch>/joblog.tsv``) is
rewritten by each run of the batch (jobs reused from the cache included, so it always lists the whole
batch) and grows as jobs end, so ``tail -f`` follows a batch. The first nine
columns are parallel's, so tools that read its joblogs read this one: ``Seq`` (the job's place in the
config, from 1), ``Host``, ``Starttime`` (epoch seconds, the host's clock), ``JobRuntime`` (seconds),
``Send`` and ``Receive`` (bytes of uploads sent and of outputs and logs fetched: 0 for a cached job, which
moved nothing), ``Exitval`` (-1 when the job never exited: aborted, cancelled, lost), ``Signal`` (the
signal that killed it, else 0) and ``Command``; then cloudsend's ``State`` (``done``, ``failed``,
``aborted``; ``done (cached)`` for a job reused from an earlier run) and ``Job`` (its name). Tabs and line
ends inside a field are written as ``\\t`` and ``\\n``, so each job is one line.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from cloudsend_prefect.paths import cloudsend_home
from cloudsend_prefect.results import JobResult
from cloudsend_prefect.specs import JOBLOG, JobSpec

COLUMNS = (
    "Seq",
    "Host",
    "Starttime",
    "JobRuntime",
    "Send",
    "Receive",
    "Exitval",
    "Signal",
    "Command",
    "State",
    "Job",
)
NAME = JOBLOG
_SIGNAL = re.compile(r"killed by signal (\d+)")


def _field(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\t", "\\t").replace("\r", "\\r").replace("\n", "\\n")


def _size(paths: list[Path]) -> int:
    total = 0
    for path in paths:
        try:
            total += path.stat().st_size
        except OSError:
            continue  # gone since (a store replaced by a later run): counted as nothing
    return total


def line(spec: JobSpec, result: JobResult) -> str:
    """The job's joblog line, with its line end."""
    sent = 0 if result.cached else _size([Path(f.local) for f in spec.files])
    store = Path(result.store) if result.store and not result.cached else None
    received = _size([p for p in store.rglob("*") if p.is_file()]) if store and store.is_dir() else 0
    killed = _SIGNAL.search(result.reason)
    values = (
        spec.index + 1,
        result.host or "-",
        f"{result.started:.3f}" if result.started is not None else "0",
        f"{result.duration:.3f}" if result.duration is not None else "0",
        sent,
        received,
        result.exit_code if result.exit_code is not None else -1,
        killed.group(1) if killed else 0,
        spec.command,
        f"{result.state} (cached)" if result.cached else result.state,
        spec.name,
    )
    return "\t".join(_field(v) for v in values) + "\n"


def record_dir(batch: str) -> Path:
    """Where the client keeps its own copy of a batch's joblog and what the batch is (``batch.json``): read by
    ``cloudsend status`` without a config, wherever the batch's results folder went."""
    return cloudsend_home() / "batches" / batch


class JobLog:
    """Writes the batch's joblog as its jobs end: a listener of ``running.run_jobs`` (called on its event
    loop, one job at a time), into the results folder and the client's record of the batch. Made at the start
    of a run (the header, and ``batch.json``); each line is appended as its job ends, the files closed again,
    so they are current while the batch runs and nothing stays open after it."""

    def __init__(self, batch: str, project: str, results: Path, specs: list[JobSpec]) -> None:
        self.specs = {spec.key: spec for spec in specs}
        record = record_dir(batch)
        self.paths = [results / NAME, record / NAME]
        for path in self.paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\t".join(COLUMNS) + "\n", encoding="utf-8")
        about = {
            "batch": batch,
            "project": project,
            "results_dir": str(results.absolute()),
            "jobs": len(specs),
            "started": time.time(),
        }
        (record / "batch.json").write_text(json.dumps(about) + "\n", encoding="utf-8")

    def __call__(self, result: JobResult, total: int) -> None:
        """Append ``result``'s line to both copies of the joblog (``total`` is the listener protocol's, unused)."""
        text = line(self.specs[result.key], result)
        for path in self.paths:
            with path.open("a", encoding="utf-8") as handle:
                handle.write(text)


def read(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """A joblog's rows as mappings from column name to text (for ``cloudsend status`` and tests)."""
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n").split("\t")
        return [dict(zip(header, row.rstrip("\n").split("\t"), strict=False)) for row in handle if row.strip()]


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def recorded_jobs(batch: str) -> list[dict[str, Any]] | None:
    """The jobs of ``batch`` this machine's last run of it has ended so far, from the client's joblog (None:
    never run here). Times are epoch seconds (None when the job never started)."""
    path = record_dir(batch) / NAME
    if not path.is_file():
        return None
    rows = []
    for row in read(path):
        exit_code = int(row.get("Exitval", "-1") or -1)
        start = _number(row.get("Starttime", "0"))
        rows.append(
            {
                "seq": int(row.get("Seq", "0") or 0),
                "job": row.get("Job", ""),
                "state": row.get("State", ""),
                "host": None if row.get("Host") in (None, "-") else row["Host"],
                "exit": None if exit_code == -1 else exit_code,
                "signal": int(row.get("Signal", "0") or 0),
                "start": start or None,
                "duration": _number(row.get("JobRuntime", "")) if start else None,
                "command": row.get("Command", ""),
            }
        )
    return rows


def recorded_batches() -> list[dict[str, Any]]:
    """Every batch run from this machine, newest first: what it is (``batch.json``) and its jobs' counts so far."""
    batches = []
    for about in (cloudsend_home() / "batches").glob("*/batch.json"):
        try:
            info = json.loads(about.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # half-written by a batch starting now, or not ours
        rows = recorded_jobs(about.parent.name) or []
        states = [row["state"] for row in rows]
        log = about.parent / NAME
        batches.append(
            {
                "batch": info.get("batch", about.parent.name),
                "project": info.get("project", ""),
                "jobs": info.get("jobs", len(rows)),
                "ended": len(rows),
                "done": sum(s.startswith("done") for s in states),
                "not_done": sum(not s.startswith("done") for s in states),
                "cached": sum(s.endswith("(cached)") for s in states),
                "started": info.get("started"),
                "last_ended": log.stat().st_mtime if rows else None,
                "results_dir": info.get("results_dir", ""),
            }
        )
    return sorted(batches, key=lambda b: b["started"] or 0, reverse=True)
