"""What a person reads about a batch in Prefect's UI: the contents of its plan, jobs, cost and summary artifacts.

Pure functions of the batch's plan, results and hosts (nothing here talks to Prefect: the flow and the plan
task create the artifacts). Everything is written for reading, not for parsing: times in UTC
(``2026-11-29 06:10:03 UTC``), durations as ``1 min 12 s``, a failure's reason with the line of its stderr
that names the error. A batch may hold 50,000 jobs, so every table is bounded (``MAX_ROWS``) and says how
many rows it left out and where all of them are (``cloudsend status``, the results folder).
"""

from __future__ import annotations

import datetime as dt
import heapq
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloudsend_prefect.planning import Placement
from cloudsend_prefect.providers.base import HostInfo
from cloudsend_prefect.providers.costs import Estimate, usd
from cloudsend_prefect.results import BatchSummary, JobResult, tail_lines

MAX_ROWS = 200  # rows of a table artifact: more is unreadable, and heavy for the server and the UI
LISTED = 10  # jobs not done, and slowest jobs, listed in the summary
CELL_CHARS = 160  # a longer cell (reason, outputs) is cut: the table stays readable
HEAD_BYTES = 65536  # of a job's stderr read for its first line
STATE_ORDER = ("done", "failed", "aborted")

Row = dict[str, Any]


# -- words and numbers --------------------------------------------------------------------------------------
def human_duration(seconds: float | None) -> str:
    """``12 ms``, ``4.2 s``, ``42 s``, ``1 min 12 s``, ``2 h 5 min``, ``3 d 4 h``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 10:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if not minutes:
        return f"{secs} s"
    hours, minutes = divmod(minutes, 60)
    if not hours:
        return f"{minutes} min {secs} s"
    days, hours = divmod(hours, 24)
    return f"{hours} h {minutes} min" if not days else f"{days} d {hours} h"


def utc(epoch: float | None) -> str:
    """An epoch time as ``2026-11-29 06:10:03 UTC`` (``-`` when unknown): one zone for every host and reader."""
    if epoch is None:
        return "-"
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def percent(part: float, whole: float) -> str:
    """``part`` as a share of ``whole`` (``42.0 %``), or ``-`` when there is no whole to share."""
    return f"{100 * part / whole:.1f} %" if whole > 0 else "-"


def counts_text(states: Iterable[str]) -> str:
    """``3 done, 1 failed``: done first, then failures, then any other state."""
    counts = Counter(states)
    order = sorted(counts, key=lambda s: (STATE_ORDER.index(s) if s in STATE_ORDER else len(STATE_ORDER), s))
    return ", ".join(f"{counts[state]:,} {state}" for state in order)


def clip(text: str, limit: int = CELL_CHARS) -> str:
    """One line of at most ``limit`` characters."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def md(text: object) -> str:
    """Text shown as itself in markdown (job names, paths and stderr lines are the users' own)."""
    return re.sub(r"([!-/:-@\[-`{-~])", r"\\\1", clip(str(text), 400))


# -- jobs ---------------------------------------------------------------------------------------------------
def stderr_line(store: str | None) -> str:
    """The line of a job's stderr that best says why it failed: its first non-empty line, except for a Python
    traceback, whose first line (``Traceback (most recent call last):``) says nothing and whose last names the
    error. Reads the client-side copy of the log, at most ``HEAD_BYTES`` of its start and its tail."""
    if not store:
        return ""
    path = Path(store) / "stderr.log"
    try:
        with path.open("rb") as f:
            head = f.read(HEAD_BYTES).decode(errors="replace")
    except OSError:
        return ""
    first = next((line.strip() for line in head.splitlines() if line.strip()), "")
    if first.startswith("Traceback (most recent call last)"):
        return next((line.strip() for line in reversed(tail_lines(path)) if line.strip()), first)
    return first


def reason(job: JobResult) -> str:
    """Why a job is not done: its reason (``exit code 1``, ``timed out after 60s``) and its stderr's telling line."""
    if job.ok:
        return ""
    why = job.reason or job.state
    line = stderr_line(job.store)
    return clip(f"{why}; stderr: {line}" if line else why)


def state_text(job: JobResult) -> str:
    """A job's state as the tables show it: a job reused from an earlier run is marked ``(cached)``."""
    return f"{job.state} (cached)" if job.cached else job.state


def outputs_text(job: JobResult) -> str:
    """A job's outputs as one table cell (``-`` for none): a long list is cut, with the number of files said."""
    if not job.outputs:
        return "-"
    listed = ", ".join(job.outputs)
    return listed if len(listed) <= CELL_CHARS else clip(listed, CELL_CHARS - 12) + f" ({len(job.outputs)} files)"


def shown_jobs(jobs: Sequence[JobResult], limit: int = MAX_ROWS) -> list[JobResult]:
    """The jobs a bounded table lists, in the order a person looks for them: every job not done (up to
    ``limit``, in the batch's order), then the done ones, slowest first. The UI shows a table ten rows a page:
    a failure must not hide on page 5."""
    missed = [job for job in jobs if not job.ok][:limit]
    slowest = heapq.nlargest(limit - len(missed), (job for job in jobs if job.ok), key=lambda j: j.duration or 0.0)
    return missed + slowest


def jobs_table(summary: BatchSummary, limit: int = MAX_ROWS) -> list[Row]:
    """The ``<batch>-jobs`` table: one row per shown job, then a row saying how many more there are and where."""
    shown = shown_jobs(summary.jobs, limit)
    rows: list[Row] = [
        {
            "job": job.name,
            "state": state_text(job),
            "host": job.host or "-",
            "started": utc(job.started),
            "duration": human_duration(job.duration),
            "reason": reason(job),
            "outputs": outputs_text(job),
        }
        for job in shown
    ]
    hidden = len(summary.jobs) - len(shown)
    if hidden:
        keys = {job.key for job in shown}
        rest = counts_text(job.state for job in summary.jobs if job.key not in keys)
        rows.append(
            {
                "job": f"… and {hidden:,} more ({rest})",
                "reason": f"cloudsend status lists every job; {os.path.abspath(summary.results_dir)} has a "
                "folder per job with its outputs and logs",
            }
        )
    return rows


def jobs_description(summary: BatchSummary, limit: int = MAX_ROWS) -> str:
    """The ``<batch>-jobs`` artifact's description: the counts, how the table is ordered, and what it leaves out."""
    total = len(summary.jobs)
    head = f"Jobs of batch {summary.batch}: {counts_text(job.state for job in summary.jobs) or 'none'}."
    if total <= limit:
        return (
            f"{head} Jobs not done first, then the slowest. Times in UTC, from each host's clock; reason: why a job "
            "is not done, and the line of its stderr that says most."
        )
    missed = sum(1 for job in summary.jobs if not job.ok)
    shown_missed = min(missed, limit)
    return (
        f"{head} Shown: {shown_missed:,} of the {missed:,} jobs not done and the {limit - shown_missed:,} slowest "
        f"done, of {total:,}; `cloudsend status` and the results folder have them all."
    )


# -- CPU time and cost --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HostUse:
    """One host's CPU time in a batch, in CPU-seconds."""

    name: str
    provider: str
    cpus: int
    used: float  # by the jobs this flow run ran: duration x CPUs requested
    available: float  # CPUs x the batch's wall time


@dataclass(frozen=True)
class Usage:
    """How much of the hosts' CPU time a batch's jobs used, from provisioning to teardown."""

    seconds: float  # the batch's wall time, provisioning to teardown
    hosts: list[HostUse]

    @property
    def used(self) -> float:
        """CPU-seconds the batch's jobs used, on all hosts."""
        return math.fsum(h.used for h in self.hosts)

    @property
    def available(self) -> float:
        """CPU-seconds all hosts offered over the batch's wall time."""
        return math.fsum(h.available for h in self.hosts)

    def line(self) -> str:
        """One sentence: used of available, and the share."""
        return (
            f"CPU time {human_duration(self.used)} used of {human_duration(self.available)} available on "
            f"{len(self.hosts)} host(s) over {human_duration(self.seconds)} ({percent(self.used, self.available)})"
        )


def measure(jobs: Iterable[JobResult], cpus: Mapping[str, int], hosts: Sequence[HostInfo], seconds: float) -> Usage:
    """CPU time used by jobs on each host against what the hosts offered over ``seconds``.

    ``cpus``: CPUs requested by job key. Jobs from an earlier run (cached) used nothing in this one; for a job
    run again after its host was lost, only its last attempt is known, so ``used`` is a lower bound.
    """
    used: defaultdict[str, float] = defaultdict(float)
    for job in jobs:
        if job.host is not None and job.duration is not None and not job.cached:
            used[job.host] += job.duration * cpus.get(job.key, 1)
    return Usage(
        seconds=seconds,
        hosts=[HostUse(h.name, h.provider, h.cpus, used[h.name], h.cpus * seconds) for h in hosts],
    )


def cost_table(usage: Usage, report: Estimate | None, limit: int = MAX_ROWS) -> list[Row]:
    """The ``<batch>-cost`` table: each host's CPU time used and available, and for EC2 hosts what they cost;
    then the total."""
    priced = {row.host: row for row in report.rows} if report else {}

    def aws_columns(host: str) -> Row:
        row = priced.get(host)
        if row is None:
            return dict.fromkeys(
                ("instance", "type", "market", "billed hours", "usd per hour", "cost", "price from"), "-"
            )
        return {
            "instance": row.machine_id or "-",
            "type": row.kind or "-",
            "market": row.market,
            "billed hours": round(row.hours, 4),
            "usd per hour": "-" if row.usd_per_hour is None else row.usd_per_hour,
            "cost": "unknown" if row.cost is None else usd(row.cost),
            "price from": row.basis,
        }

    def use_columns(name: str, provider: str, cpus: int, used: float, available: float) -> Row:
        return {
            "host": name,
            "provider": provider,
            "CPUs": cpus,
            "CPU time used": human_duration(used),
            "CPU time available": human_duration(available),
            "utilisation": percent(used, available),
        }

    rows = []
    for use in usage.hosts[:limit]:
        row = use_columns(use.name, use.provider, use.cpus, use.used, use.available)
        rows.append({**row, **aws_columns(use.name)} if priced else row)
    if len(usage.hosts) > limit:
        rows.append({"host": f"… and {len(usage.hosts) - limit:,} more hosts (counted in the total)"})
    total = use_columns("total", "", sum(h.cpus for h in usage.hosts), usage.used, usage.available)
    if report is not None:
        unknown = "" if report.complete else " (hosts of unknown price not counted)"
        total |= {"billed hours": round(sum(r.hours for r in report.rows), 4), "cost": usd(report.total) + unknown}
    rows.append(total)
    return rows


def cost_description(batch: str, usage: Usage, report: Estimate | None) -> str:
    """The ``<batch>-cost`` artifact's description: what is counted as used and available, and how EC2 is priced."""
    text = (
        f"CPU time of batch {batch}: used by the jobs this flow run ran (each one's duration times its CPUs) against "
        f"available (each host's CPUs times the batch's {human_duration(usage.seconds)} from provisioning to teardown)."
    )
    if report is None:
        return text + " Own machines (local, ssh): no charge counted."
    return text + (
        " EC2 instances in USD, billed time per instance, an upper bound: from provisioning (a replacement: from "
        "its launch) to its stop (early, when no job could reach it any more, or at teardown), per second with a "
        "60 s minimum; on-demand prices from cloudsend's catalog "
        "(us-east-1 list prices; other regions differ), spot prices from EC2 when it answered. EBS disks and data "
        "transfer are not included."
    )


# -- the summary --------------------------------------------------------------------------------------------
def summary_markdown(summary: BatchSummary, usage: Usage, *, run: str, machine: str) -> str:
    """The ``<batch>-summary`` markdown: counts, times, CPU use, cost, where the results are, the jobs not done
    and the slowest ones."""
    jobs = summary.jobs
    ran = [job for job in jobs if not job.cached and job.started is not None]
    done = sum(1 for job in jobs if job.ok)
    cached = sum(1 for job in jobs if job.cached)
    first = min((job.started for job in ran if job.started is not None), default=None)
    last = max((job.ended for job in ran if job.ended is not None), default=None)
    span = human_duration(last - first) if first is not None and last is not None else "-"
    folder = os.path.abspath(summary.results_dir)
    earlier = f"; {cached:,} from an earlier run (cached)" if cached else ""
    lines = [
        f"# {summary.batch}: {done:,} of {len(jobs):,} jobs done",
        "",
        f"Flow run {md(run)} on {md(machine)}.",
        "",
        f"- **Jobs**: {counts_text(job.state for job in jobs) or 'none'}{earlier}",
        f"- **Makespan**: {span}, from the first job's start ({utc(first)}) to the last one's end ({utc(last)})",
        f"- **Wall time**: {human_duration(usage.seconds)}, from provisioning to teardown",
        f"- **CPU use**: {human_duration(usage.used)} of {human_duration(usage.available)} CPU time available on "
        f"{len(usage.hosts):,} host(s): {percent(usage.used, usage.available)}",
        f"- **Cost**: {_cost_text(summary, usage)}",
        f"- **Results**: {md(folder)} on {md(machine)}, one folder per job with its outputs, stdout.log and stderr.log",
    ]
    missed = [job for job in jobs if not job.ok]
    if missed:
        lines += [
            "",
            f"## Not done ({len(missed):,})",
            "",
            "| Job | State | Host | Reason | Folder |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {md(j.name)} | {md(j.state)} | {md(j.host or '-')} | {md(reason(j))} | {md(Path(folder, j.name))} |"
            for j in missed[:LISTED]
        ]
        if len(missed) > LISTED:
            lines += ["", f"… and {len(missed) - LISTED:,} more: see the {summary.batch}-jobs table."]
    slowest = heapq.nlargest(LISTED, (job for job in ran if job.ok), key=lambda j: j.duration or 0.0)
    if slowest:
        lines += ["", "## Slowest jobs", "", "| Job | Host | Started | Duration | Folder |", "|---|---|---|---|---|"]
        lines += [
            f"| {md(j.name)} | {md(j.host or '-')} | {utc(j.started)} | {human_duration(j.duration)} | "
            f"{md(Path(folder, j.name))} |"
            for j in slowest
        ]
    return "\n".join(lines) + "\n"


def _cost_text(summary: BatchSummary, usage: Usage) -> str:
    if not any(host.provider == "aws" for host in usage.hosts):
        return "none counted: own machines (local, ssh)"
    if summary.cost is None:
        return "unknown (no cost report: see the flow run's logs)"
    return f"{usd(summary.cost)} for EC2 instances, an upper bound (see the {summary.batch}-cost table)"


# -- the plan -----------------------------------------------------------------------------------------------
def plan_table(placements: Sequence[Placement], hosts: Sequence[HostInfo], limit: int = MAX_ROWS) -> list[Row]:
    """The ``<batch>-plan`` table: per host, the jobs expected there, their CPU time and when the host should be
    done (from the batch's start); then the total. One row per host, not per job: a batch may hold 50,000."""
    jobs: Counter[str] = Counter()
    cpu: defaultdict[str, float] = defaultdict(float)
    end: dict[str, float] = {}
    for p in placements:
        jobs[p.host] += 1
        cpu[p.host] += (p.end - p.start) * p.cpus
        end[p.host] = max(end.get(p.host, 0.0), p.end)

    def row(name: str, cpus: int, n: int, cpu_seconds: float, last: float | None) -> Row:
        return {
            "host": name,
            "CPUs": cpus,
            "jobs": n,
            "expected CPU time": human_duration(cpu_seconds),
            "expected done after": human_duration(last),
        }

    rows = [row(h.name, h.cpus, jobs[h.name], cpu[h.name], end.get(h.name)) for h in hosts[:limit]]
    if len(hosts) > limit:
        rows.append({"host": f"… and {len(hosts) - limit:,} more hosts (counted in the total)"})
    rows.append(
        row(
            "total",
            sum(h.cpus for h in hosts),
            len(placements),
            math.fsum(cpu.values()),
            max(end.values(), default=None),
        )
    )
    return rows


def plan_description(batch: str, placements: Sequence[Placement], hosts: Sequence[HostInfo]) -> str:
    """The ``<batch>-plan`` artifact's description: the expected makespan, and that the plan is an estimate."""
    makespan = max((p.end for p in placements), default=0.0)
    return (
        f"Expected placement of the {len(placements):,} jobs of {batch} on {len(hosts):,} host(s), by each "
        f"job's expected_duration (else 1 s): done after {human_duration(makespan)}. Jobs go to whichever host has "
        "free CPUs first, so where they really run may differ."
    )
