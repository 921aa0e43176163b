"""The artifacts a person reads: their builders on made-up batches, and the artifacts of real runs read back from
Prefect's server."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

from cloudsend_prefect.flow import cloudsend
from cloudsend_prefect.planning import Placement
from cloudsend_prefect.providers import HostInfo, quote
from cloudsend_prefect.providers.costs import Estimate, estimate
from cloudsend_prefect.reporting import (
    cost_table,
    human_duration,
    jobs_description,
    jobs_table,
    md,
    measure,
    plan_description,
    plan_table,
    reason,
    summary_markdown,
    utc,
)
from cloudsend_prefect.results import BatchSummary, JobResult
from tests.faults import write_config

T0 = 1795932603.0  # 2026-11-29 06:10:03 UTC


def host(name: str, cpus: int, provider: str = "local", **kw: Any) -> HostInfo:
    return HostInfo(name=name, provider=provider, cpus=cpus, base_dir="/tmp/x", **kw)


def priced(hosts: list[HostInfo], seconds: float) -> Estimate:
    """What the hosts cost for ``seconds``, at their providers' offline prices."""
    quotes, _ = quote(hosts)
    return estimate([quotes[h.name] for h in hosts], seconds)


def job(name: str, state: str = "done", duration: float | None = 1.0, **kw: Any) -> JobResult:
    started = kw.pop("started", T0)
    ended = None if duration is None else started + duration
    return JobResult(name=name, key=f"k-{name}", state=state, duration=duration, started=started, ended=ended, **kw)


def test_durations_and_times_are_for_people() -> None:
    seconds = (0.012015819549560547, 4.24, 42.4, 72, 59.6, 3600 * 2 + 300, 86400 * 3 + 3600 * 4)
    shown = ["12 ms", "4.2 s", "42 s", "1 min 12 s", "1 min 0 s", "2 h 5 min", "3 d 4 h"]
    assert [human_duration(s) for s in seconds] == shown
    assert human_duration(None) == "-" and human_duration(-0.5) == "0 ms"  # a host clock behind another's
    assert utc(T0) == "2026-11-29 06:10:03 UTC" and utc(None) == "-"


def test_reason_is_the_jobs_reason_and_its_stderrs_telling_line(tmp_path: Path) -> None:
    plain, traceback, silent = tmp_path / "plain", tmp_path / "traceback", tmp_path / "silent"
    for store in (plain, traceback, silent):
        store.mkdir()
    (plain / "stderr.log").write_text("\n  \nerror: input.csv: no such file\nusage: tool FILE\n")
    (traceback / "stderr.log").write_text(
        'Traceback (most recent call last):\n  File "a.py", line 1, in <module>\nValueError: boom\n\n'
    )
    assert reason(job("a", "failed", reason="exit code 2", store=str(plain))) == (
        "exit code 2; stderr: error: input.csv: no such file"
    )
    assert (
        reason(job("b", "failed", reason="exit code 1", store=str(traceback)))
        == "exit code 1; stderr: ValueError: boom"
    )
    assert reason(job("c", "aborted", reason="host lost", store=str(silent))) == "host lost"
    assert reason(job("d", "aborted", reason="missing output", store=None)) == "missing output"
    assert reason(job("e", store=str(plain))) == ""  # done: nothing to explain


def test_jobs_table_is_readable_and_bounded_at_scale() -> None:
    jobs = [job(f"j{i}", duration=float(i % 97)) for i in range(5000)]
    for i in (10, 2000, 4999):
        jobs[i] = job(f"j{i}", "failed", reason="exit code 3", exit_code=3)
    jobs[20] = job("j20", "aborted", duration=None, reason="environment failed to build")
    summary = BatchSummary(batch="big", results_dir="res/big", jobs=jobs)

    rows = jobs_table(summary, limit=50)
    assert len(rows) == 51
    assert [r["job"] for r in rows[:4]] == ["j10", "j20", "j2000", "j4999"]  # every job not done, first
    assert {r["duration"] for r in rows[4:50]} == {"1 min 36 s"}  # then the slowest (96 s) of the done
    assert rows[0] == {
        "job": "j10",
        "state": "failed",
        "host": "-",
        "started": "2026-11-29 06:10:03 UTC",
        "duration": "1.0 s",
        "reason": "exit code 3",
        "outputs": "-",
    }
    more = rows[-1]
    assert more["job"] == "… and 4,950 more (4,950 done)"
    assert "cloudsend status" in more["reason"] and str(Path("res/big").resolve()) in more["reason"]
    text = jobs_description(summary, limit=50)
    assert "4,996 done, 3 failed, 1 aborted" in text and "4 of the 4 jobs not done and the 46 slowest" in text

    small = BatchSummary(
        batch="small",
        results_dir="r",
        jobs=[
            job("b", outputs=["ok.txt"]),
            job("a", duration=5, cached=True),
            job("c", "failed", reason="exit code 1"),
        ],
    )
    assert [(r["job"], r["state"], r["outputs"]) for r in jobs_table(small)] == [
        ("c", "failed", "-"),
        ("a", "done (cached)", "-"),
        ("b", "done", "ok.txt"),
    ]  # all of them, the one not done first (the UI shows ten rows a page)


def test_cpu_time_used_against_available_and_the_cost() -> None:
    hosts = [host("laptop", 4), host("aws-0", 2, "aws", machine_id="i-0", provider_data={"instance_type": "c5.xlarge"})]
    jobs = [
        job("a", duration=1800, host="laptop"),
        job("b", duration=900, host="aws-0"),
        job("c", duration=3600, host="laptop", cached=True),  # from an earlier run: used nothing now
        job("d", "aborted", duration=None, host="laptop"),
    ]
    usage = measure(jobs, {"k-a": 2, "k-b": 1}, hosts, 3600)
    assert [(h.used, h.available) for h in usage.hosts] == [(3600, 14400), (900, 7200)]
    assert usage.used == 4500 and usage.available == 21600
    assert usage.line() == "CPU time 1 h 15 min used of 6 h 0 min available on 2 host(s) over 1 h 0 min (20.8 %)"

    own = cost_table(measure(jobs, {"k-a": 2}, hosts[:1], 3600), None)
    assert own == [
        {"host": "laptop", "provider": "local", "CPUs": 4, "CPU time used": "1 h 0 min",
         "CPU time available": "4 h 0 min", "utilisation": "25.0 %"},
        {"host": "total", "provider": "", "CPUs": 4, "CPU time used": "1 h 0 min",
         "CPU time available": "4 h 0 min", "utilisation": "25.0 %"},
    ]  # fmt: skip

    rows = cost_table(usage, priced(hosts[1:], 3600))
    assert rows[0]["cost"] == "-" and rows[0]["utilisation"] == "25.0 %"  # a local host costs nothing
    assert rows[1] | {"price from": "?"} == {
        "host": "aws-0", "provider": "aws", "CPUs": 2, "CPU time used": "15 min 0 s",
        "CPU time available": "2 h 0 min", "utilisation": "12.5 %", "instance": "i-0", "type": "c5.xlarge",
        "market": "on-demand", "billed hours": 1.0, "usd per hour": 0.17, "cost": "$0.1700", "price from": "?",
    }  # fmt: skip
    assert rows[-1]["cost"] == "$0.1700" and rows[-1]["utilisation"] == "20.8 %"
    unknown = priced([host("aws-9", 2, "aws", machine_id="i-9", provider_data={"instance_type": "z9.mega"})], 3600)
    assert cost_table(measure([], {}, hosts[1:], 3600), unknown)[-1]["cost"].endswith("unknown price not counted)")


def test_plan_is_per_host() -> None:
    hosts = [host("a", 2), host("b", 1)]
    placements = [
        Placement(job="x", host="a", cpus=2, start=0, end=60),
        Placement(job="y", host="b", cpus=1, start=0, end=30),
        Placement(job="z", host="b", cpus=1, start=30, end=90),
    ]
    assert plan_table(placements, hosts) == [
        {"host": "a", "CPUs": 2, "jobs": 1, "expected CPU time": "2 min 0 s", "expected done after": "1 min 0 s"},
        {"host": "b", "CPUs": 1, "jobs": 2, "expected CPU time": "1 min 30 s", "expected done after": "1 min 30 s"},
        {"host": "total", "CPUs": 3, "jobs": 3, "expected CPU time": "3 min 30 s", "expected done after": "1 min 30 s"},
    ]
    assert "3 jobs of p on 2 host(s)" in plan_description("p", placements, hosts)
    many = plan_table([], [host(f"h{i}", 1) for i in range(10)], limit=4)
    assert len(many) == 6 and many[4]["host"] == "… and 6 more hosts (counted in the total)"


def test_summary_has_counts_times_use_cost_and_where_results_are(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "stderr.log").write_text("disk | full\n")
    jobs = [
        job("fast", duration=2, host="h"),
        job("slow|one", duration=72, host="h", started=T0 + 10),
        job("bad", "failed", reason="exit code 1", host="h", store=str(store)),
        job("old", cached=True, started=T0 - 86400),  # an earlier run's: not in this run's times
    ]
    summary = BatchSummary(batch="demo", results_dir=str(tmp_path / "res" / "demo"), jobs=jobs)
    text = summary_markdown(summary, measure(jobs, {}, [host("h", 2)], 100), run="crimson-fox", machine="lab")
    assert text.startswith("# demo: 3 of 4 jobs done\n")
    assert "- **Jobs**: 3 done, 1 failed; 1 from an earlier run (cached)" in text
    assert "- **Makespan**: 1 min 22 s, from the first job's start (2026-11-29 06:10:03 UTC)" in text
    assert "- **CPU use**: 1 min 15 s of 3 min 20 s CPU time available on 1 host(s): 37.5 %" in text
    assert "- **Cost**: none counted: own machines (local, ssh)" in text
    assert f"- **Results**: {md(tmp_path / 'res' / 'demo')} on lab" in text
    assert (
        f"| bad | failed | h | {md('exit code 1; stderr: disk | full')} | {md(tmp_path / 'res' / 'demo' / 'bad')} |"
        in text
    )
    slowest = text.split("## Slowest jobs")[1]
    assert slowest.index("slow\\|one") < slowest.index("fast") and "| old |" not in slowest


# -- the artifacts of real runs ------------------------------------------------------------------------------
def _read(run_id: Any) -> dict[str, Any]:
    """The artifacts of one flow run, by key, once the server has recorded the last one (the summary)."""
    for _ in range(50):  # the test server records artifacts asynchronously
        with get_client(sync_client=True) as client:
            found = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
            )
        by_key = {a.key: a for a in found}
        if any(key.endswith("-summary") for key in by_key):
            return by_key
        time.sleep(0.2)
    raise AssertionError(f"no summary artifact for flow run {run_id}")


def _table(artifact: Any) -> list[dict[str, Any]]:
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


def test_artifacts_of_two_runs_of_one_batch(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "proj",
        {
            "project": "reporting-twice",
            "instances": [{"cpus": 2}],
            "jobs": [
                {"name": "ok", "run_command": "echo hi > ok.txt", "output_files": ["ok.txt"]},
                {"name": "boom", "run_command": "python3 -c 'raise ValueError(\"boom\")'"},
            ],
        },
    )
    runs = []
    for _ in range(2):
        state = cloudsend(config=str(config), results_dir=str(tmp_path / "results"), return_state=True)
        runs.append((state.state_details.flow_run_id, _read(state.state_details.flow_run_id)))
    (first_id, first), (second_id, second) = runs
    with get_client(sync_client=True) as client:  # named after the batch, as its artifacts, not after batch.yaml
        assert client.read_flow_run(first_id).name == "reporting-twice"
    keys = {f"reporting-twice-{kind}" for kind in ("summary", "jobs", "cost", "plan", "progress")}
    assert set(first) == set(second) == keys

    jobs = {row["job"]: row for row in _table(first["reporting-twice-jobs"])}
    assert jobs["ok"]["state"] == "done" and jobs["ok"]["outputs"] == "ok.txt" and jobs["ok"]["reason"] == ""
    assert jobs["boom"]["state"] == "failed"
    assert jobs["boom"]["reason"] == "exit code 1; stderr: ValueError: boom"
    assert jobs["ok"]["started"].endswith(" UTC") and jobs["ok"]["duration"].endswith(("ms", " s"))
    assert {row["job"]: row["state"] for row in _table(second["reporting-twice-jobs"])} == {
        "ok": "done (cached)",
        "boom": "failed",
    }

    summary = first["reporting-twice-summary"].data
    assert summary.startswith("# reporting-twice: 1 of 2 jobs done\n")
    assert "1 done, 1 failed" in summary and "## Not done (1)" in summary and md("ValueError: boom") in summary
    assert md((tmp_path / "results" / "reporting-twice").resolve()) in summary
    assert "1 from an earlier run (cached)" in second["reporting-twice-summary"].data

    cost = _table(first["reporting-twice-cost"])
    assert [row["host"] for row in cost] == ["local-0", "total"] and cost[-1]["utilisation"].endswith("%")
    assert _table(first["reporting-twice-plan"])[-1] == {
        "host": "total", "CPUs": 2, "jobs": 2, "expected CPU time": "2.0 s", "expected done after": "1.0 s"
    }  # fmt: skip

    # Each run keeps its own artifacts: two versions of each key, one per flow run.
    with get_client(sync_client=True) as client:
        versions = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["reporting-twice-summary"]))
        )
    assert sorted(str(a.flow_run_id) for a in versions) == sorted([str(first_id), str(second_id)])
    assert first["reporting-twice-summary"].id != second["reporting-twice-summary"].id
