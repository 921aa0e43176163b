"""Scale: every CPU slot of the fleet busy at once, and every job's task run recorded by the server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from cloudsend_prefect.flow import cloudsend
from tests.faults import write_config


def peak_concurrency(spans: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant (an end before a start at the same time)."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans], key=lambda e: (e[0], e[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


async def job_task_runs(flow_run_id: UUID, batch_jobs: int, prefix: str) -> dict[str, int]:
    """The job task runs (named ``<prefix>-<n>``) of a flow run the server recorded, by state name."""
    async with get_client() as client:
        runs = []
        for offset in range(0, batch_jobs + 200, 200):
            runs += await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                limit=200,
                offset=offset,
            )
    counts: dict[str, int] = {}
    for run in runs:
        if not run.name.startswith(f"{prefix}-"):
            continue
        name = run.state.name if run.state else "none"
        counts[name] = counts.get(name, 0) + 1
    return counts


def test_every_slot_of_the_fleet_is_busy_at_once(tmp_path: Path) -> None:
    """300 slots, 600 jobs of 4 s: 300 run at once (from the times the jobs wrote themselves), not a thread
    pool's worth; and the server records all 600 task runs."""
    count, slots = 600, 300
    job = {
        "name": "sleeper",
        "run_command": 's=$(date +%s.%N); sleep 4; echo "$s $(date +%s.%N)" > t.txt',
        "output_files": ["t.txt"],
        "repeat": count,
    }
    config = write_config(
        tmp_path, {"project": "wide", "poll_interval": 0.5, "instances": [{"cpus": slots}], "jobs": [job]}
    )
    state = cloudsend(config=str(config), results_dir=str(tmp_path / "results"), return_state=True)
    summary = state.result()
    assert summary.counts == {"done": count}
    spans = []
    for result in summary.jobs:
        start, end = (tmp_path / "results" / "wide" / result.name / "t.txt").read_text().split()
        spans.append((float(start), float(end)))
    assert peak_concurrency(spans) == slots
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    recorded = asyncio.run(job_task_runs(flow_run_id, count, "sleeper"))  # at once: the flow waits until they are
    assert recorded == {"Completed": count}, recorded
