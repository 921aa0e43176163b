"""The `cloudsend` flow end to end on the local provider, checked the way a user would check a batch."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterName,
    LogFilter,
    LogFilterTaskRunId,
)
from prefect.states import Cancelling

from cloudsend_prefect.block import CloudSendCluster
from cloudsend_prefect.config import Job
from cloudsend_prefect.errors import ConfigError
from cloudsend_prefect.flow import cloudsend, run_batch, summary_of
from cloudsend_prefect.results import BatchFailed, BatchSummary
from tests.faults import write_config

COUNTING_SCRIPT = """\
import sys, pathlib
# Count runs in a file outside the run directory: the test reads how often each job really ran.
with open(sys.argv[1], "a") as fh:
    fh.write(sys.argv[2] + "\\n")
pathlib.Path("out.txt").write_text(f"{sys.argv[2]} squared is {int(sys.argv[2]) ** 2}\\n")
"""


def run(config: Path, tmp_path: Path, **kw: object) -> BatchSummary:
    return run_batch(config=str(config), results_dir=str(tmp_path / "results"), **kw)


def by_name(summary: BatchSummary) -> dict:
    return {job.name: job for job in summary.jobs}


def test_issue_minimal_config_runs_as_is(tmp_path: Path) -> None:
    """The minimal file from the spine issue, with a numpy pip environment, runs unchanged."""
    config = tmp_path / "proj" / "demo.yaml"
    files = {
        "analyse.py": textwrap.dedent(
            """\
            import sys, numpy as np
            lo, hi = int(sys.argv[1]), int(sys.argv[2])
            rows = open("data/input.csv").read().split()
            open("result.txt", "w").write(f"{np.arange(lo, hi).sum()} {len(rows)}\\n")
            """
        ),
        "data/input.csv": "a\nb\nc\n",
    }
    write_config(tmp_path / "proj", {}, files)
    config.write_text(
        textwrap.dedent(
            """\
            project: demo
            provider: local
            instances: [{cpus: 4}]
            environments: [{name: sci, env_pypi: [numpy]}]
            jobs:
              - {run_script: analyse.py 1 10, env_name: sci, cpus_req: 1,
                 upload_files: [data/input.csv], output_files: [result.txt], repeat: 2}
              - {run_command: "echo done > done.txt", output_files: done.txt}
            """
        )
    )
    summary = run(config, tmp_path)
    assert summary.ok, summary.jobs
    assert [j.name for j in summary.jobs] == ["analyse-1", "analyse-2", "echo"]
    results = tmp_path / "results" / "demo"
    for name in ("analyse-1", "analyse-2"):
        assert (results / name / "result.txt").read_text() == "45 3\n"
    assert (results / "echo" / "done.txt").read_text() == "done\n"


def test_outcomes_failures_do_not_stop_others_and_args_are_literal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tricky = ["a b", "it's", '"q"', "$(touch pwned)", "; touch pwned2", "`touch pwned3`"]
    config = write_config(
        tmp_path / "proj",
        {
            "project": "outcomes",
            "instances": [{"cpus": 2}],
            "jobs": [
                {"name": "ok", "run_command": "echo fine > ok.txt", "output_files": ["ok.txt"]},
                {"name": "boom", "run_command": "echo 'something broke' >&2; exit 3"},
                {"name": "forgot", "run_command": "true", "output_files": ["never.txt"]},
                {"name": "args", "run_script": "show.py", "args": tricky, "output_files": ["argv.json"]},
            ],
        },
        {"show.py": "import json, sys\njson.dump(sys.argv[1:], open('argv.json', 'w'))\n"},
    )
    summary = run(config, tmp_path)
    jobs = by_name(summary)
    assert jobs["ok"].state == "done"
    assert (jobs["boom"].state, jobs["boom"].exit_code, jobs["boom"].reason) == ("failed", 3, "exit code 3")
    assert jobs["forgot"].state == "aborted" and "missing output file: never.txt" in jobs["forgot"].reason
    assert jobs["args"].state == "done"
    results = tmp_path / "results" / "outcomes"
    assert json.loads((results / "args" / "argv.json").read_text()) == tricky
    assert "something broke" in (results / "boom" / "stderr.log").read_text()
    # The failed job's task run log says why, with the tail of its stderr.
    boom = [r.getMessage() for r in caplog.records if getattr(r, "task_run_name", "") == "boom"]
    assert any("exit code 3" in m and "something broke" in m for m in boom), boom
    assert not list(tmp_path.rglob("pwned*")) and not list(Path(jobs["args"].store or "").rglob("pwned*"))
    assert not summary.ok


def test_jobs_share_cpus_and_never_exceed_them(tmp_path: Path) -> None:
    """8 one-CPU jobs and 2 two-CPU jobs on 4 CPUs: concurrency reaches 4 CPUs and never exceeds it."""
    jobs = [{"run_command": f"sleep 1; echo {i} > n.txt", "output_files": ["n.txt"]} for i in range(8)]
    jobs += [{"run_command": f"sleep 1 # big {i}", "cpus_req": 2} for i in range(2)]
    config = write_config(tmp_path / "proj", {"project": "packing", "instances": [{"cpus": 4}], "jobs": jobs})
    t0 = time.monotonic()
    summary = run(config, tmp_path)
    elapsed = time.monotonic() - t0
    assert summary.ok
    spans = []
    for spec_job, result in zip(jobs, summary.jobs, strict=True):
        assert result.started is not None and result.ended is not None
        spans.append((result.started, result.ended, int(spec_job.get("cpus_req", 1))))
    events = sorted([(s, c) for s, _, c in spans] + [(e, -c) for _, e, c in spans], key=lambda x: (x[0], x[1]))
    load = peak = 0
    for _, delta in events:
        load += delta
        peak = max(peak, load)
    assert peak == 4
    # 12 CPU-seconds of work on 4 CPUs: 3 s ideal; queued jobs start as soon as CPUs free up.
    assert max(e for _, e, _ in spans) - min(s for s, _, _ in spans) < 4.5
    assert elapsed < 30


def test_rerun_skips_finished_jobs_and_still_delivers_outputs(tmp_path: Path) -> None:
    counter = tmp_path / "runs.log"
    jobs = [{"run_script": f"count.py {counter} {n}", "output_files": ["out.txt"]} for n in (2, 3, 4)]
    config = write_config(
        tmp_path / "proj", {"project": "rerun", "instances": [{"cpus": 2}], "jobs": jobs}, {"count.py": COUNTING_SCRIPT}
    )
    first = run(config, tmp_path)
    assert first.ok
    results = tmp_path / "results" / "rerun"
    shutil.rmtree(results)
    second = run(config, tmp_path)
    assert second.ok
    assert sorted(counter.read_text().split()) == ["2", "3", "4"]  # nothing ran twice
    assert {p.name for p in results.iterdir()} == {"count-1", "count-2", "count-3", "joblog.tsv"}
    for name, text in (("count-1", "2 squared is 4"), ("count-2", "3 squared is 9"), ("count-3", "4 squared is 16")):
        assert (results / name / "out.txt").read_text() == text + "\n"

    # An edited script is a new job: all three run again, exactly once more.
    (tmp_path / "proj" / "count.py").write_text(COUNTING_SCRIPT + "# edited\n")
    third = run(config, tmp_path)
    assert third.ok
    assert sorted(counter.read_text().split()) == ["2", "2", "3", "3", "4", "4"]

    # rerun=True runs everything again even though nothing changed.
    run(config, tmp_path, rerun=True)
    assert len(counter.read_text().split()) == 9


def test_failed_jobs_run_again_on_the_next_run_and_retries_apply(tmp_path: Path) -> None:
    flag = tmp_path / "flag"
    counter = tmp_path / "attempts.log"
    jobs = [
        # Fails until the flag file exists.
        {"name": "flaky", "run_command": f"echo x >> {counter}; test -f {flag}"},
        # Fails on its first attempt only; max_retries brings it to done in the same run.
        {
            "name": "retried",
            "run_command": f"echo r >> {counter}.r; test $(wc -l < {counter}.r) -ge 2",
            "max_retries": 1,
        },
    ]
    config = write_config(tmp_path / "proj", {"project": "retry", "instances": [{"cpus": 2}], "jobs": jobs})
    first = by_name(run(config, tmp_path))
    assert first["flaky"].state == "failed"
    assert first["retried"].state == "done"
    assert len(Path(f"{counter}.r").read_text().split()) == 2
    flag.touch()
    second = by_name(run(config, tmp_path))
    assert second["flaky"].state == "done" and second["retried"].state == "done"
    assert len(counter.read_text().split()) == 2  # flaky ran once per run
    assert len(Path(f"{counter}.r").read_text().split()) == 2  # retried was cached


def test_environment_failure_aborts_only_its_jobs_with_the_log(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "proj",
        {
            "project": "envfail",
            "instances": [{"cpus": 2}],
            "environments": [
                {"name": "broken", "command": "echo 'setting up'; echo 'no compiler here' >&2; exit 7"},
                {"name": "conda", "env_conda": ["numpy"]},
                {"name": "fine", "command": "echo ready-to-go"},
            ],
            "jobs": [
                {"name": "needs-broken", "run_command": "echo hi", "env_name": "broken"},
                {"name": "needs-conda", "run_command": "echo hi", "env_name": "conda"},
                {"name": "needs-fine", "run_command": "echo hi > hi.txt", "env_name": "fine", "output_files": "hi.txt"},
                {"name": "no-env", "run_command": "echo hi > hi.txt", "output_files": "hi.txt"},
            ],
        },
    )
    jobs = by_name(run(config, tmp_path))
    assert jobs["needs-broken"].state == "aborted" and "environment" in jobs["needs-broken"].reason
    assert jobs["needs-conda"].state == "aborted"
    assert jobs["needs-fine"].state == "done" and jobs["no-env"].state == "done"


def test_environment_is_built_once_and_reused(tmp_path: Path, cloudsend_home: Path) -> None:
    marker = tmp_path / "built.log"
    config = write_config(
        tmp_path / "proj",
        {
            "project": "envreuse",
            "instances": [{"cpus": 2}],
            "environments": [{"name": "e", "command": f"echo built >> {marker}", "env_pypi": ["six"]}],
            "jobs": [
                {"run_command": "python -c 'import six; print(six.__version__)' > v.txt", "output_files": "v.txt"}
            ],
        },
    )
    assert run(config, tmp_path).ok
    assert run(config, tmp_path, rerun=True).ok
    assert marker.read_text() == "built\n"
    assert (tmp_path / "results" / "envreuse" / "python" / "v.txt").read_text().strip()


def test_cluster_block_with_jobs_as_parameters(tmp_path: Path) -> None:
    CloudSendCluster(project="blockrun", instances=[{"cpus": 2}]).save("test-cluster", overwrite=True)
    (tmp_path / "in.txt").write_text("payload\n")
    jobs = [Job(run_command="cat in.txt > copy.txt", upload_files=["in.txt"], output_files=["copy.txt"], repeat=2)]
    summary = cloudsend(
        cluster="test-cluster", jobs=jobs, base_dir=str(tmp_path), results_dir=str(tmp_path / "results")
    )
    assert summary.ok and summary.batch == "blockrun"
    assert (tmp_path / "results" / "blockrun" / "cat-2" / "copy.txt").read_text() == "payload\n"


@pytest.mark.parametrize("bad", ["no-such-cluster"])
def test_missing_block_is_a_clear_error(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        cloudsend(cluster=bad, jobs=[Job(run_command="true")], results_dir=str(tmp_path))


def _artifacts(keys: list[str]) -> dict:
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    return {a.key: a for a in found}


def test_table_and_progress_artifacts(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "proj",
        {"project": "artifacts", "instances": [{"cpus": 2}], "jobs": [{"run_command": "true", "repeat": 3}]},
    )
    assert run(config, tmp_path).ok
    keys = ["artifacts-jobs", "artifacts-progress", "artifacts-plan"]
    found: dict = {}
    for _ in range(50):  # the test server records artifacts asynchronously
        found = _artifacts(keys)
        if len(found) == 3:
            break
        time.sleep(0.2)
    assert set(found) == set(keys)
    table = found["artifacts-jobs"].data
    rows = json.loads(table) if isinstance(table, str) else table
    assert [r["state"] for r in rows] == ["done"] * 3
    assert float(found["artifacts-progress"].data) == 100.0


def test_a_batch_with_jobs_not_done_is_a_failed_flow_run(tmp_path: Path) -> None:
    """The flow run's state is the batch's: Failed, with counts and the first failures, when a job is not done
    (what `--watch`, automations and the runs list see); its summary still comes back."""
    jobs = [
        {"name": "fine", "run_command": "echo ok > ok.txt", "output_files": ["ok.txt"], "max_retries": 2},
        {"name": "boom", "run_command": "exit 3"},
    ]
    config = write_config(tmp_path / "proj", {"project": "partly", "instances": [{"cpus": 2}], "jobs": jobs})
    state = cloudsend(config=str(config), results_dir=str(tmp_path / "results"), return_state=True)
    assert state.is_failed()
    assert state.message == "1 of 2 jobs of batch partly not done (1 done, 1 failed): boom: failed, exit code 3"
    summary = summary_of(state)
    assert summary.counts == {"done": 1, "failed": 1}
    assert (tmp_path / "results" / "partly" / "fine" / "ok.txt").read_text() == "ok\n"
    with pytest.raises(BatchFailed, match="boom: failed, exit code 3") as raised:
        cloudsend(config=str(config), results_dir=str(tmp_path / "results"))
    assert raised.value.summary.counts == {"done": 1, "failed": 1}

    # Each job's task run: named after it, its own retries, its cache key (Prefect 3 leaves that one empty).
    keys = {job.name: job.key for job in summary.jobs}
    flow_run_id = state.state_details.flow_run_id

    async def task_runs() -> list[Any]:
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))

    runs = {run.name: run for run in asyncio.run(task_runs()) if run.task_key.startswith("run_job")}
    assert set(runs) == {"fine", "boom"}, sorted(runs)
    assert runs["fine"].empirical_policy.retries == 2 and runs["boom"].empirical_policy.retries == 0
    assert {name: run.cache_key for name, run in runs.items()} == {
        n: f"cloudsend-job-partly-{k}" for n, k in keys.items()
    }

    async def pending_names() -> set[str]:  # the name each run had in its first state
        async with get_client() as client:
            body = {"filter": {"event": {"name": ["prefect.task-run.Pending"]}}, "limit": 50}
            events = (await client.request("POST", "/events/filter", json=body)).json()["events"]
        return {e["resource"]["prefect.resource.name"] for e in events if str(flow_run_id) in json.dumps(e)}

    assert {"fine", "boom"} <= asyncio.run(pending_names())
    assert not [name for name in asyncio.run(pending_names()) if name.startswith("run-job")]


def test_a_run_with_nothing_to_run_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nothing to run: give a config file"):
        cloudsend(results_dir=str(tmp_path))


def test_cancelling_the_flow_run_cancels_its_jobs(tmp_path: Path) -> None:
    """A cancel from the API (as the UI's button sends) while jobs run: those on the host are killed, the
    queued ones never start, task runs and flow run end Cancelled, and the summary says why."""
    pids = tmp_path / "pids"
    job = {"name": "long", "run_command": f"echo $$ >> {pids}; exec sleep 300", "repeat": 4, "max_retries": 2}
    config = write_config(tmp_path / "proj", {"project": "cancel-local", "instances": [{"cpus": 2}], "jobs": [job]})
    states: list[Any] = []
    batch = f"cancel-{time.time_ns()}"
    runner = threading.Thread(
        target=lambda: states.append(
            cloudsend(config=str(config), results_dir=str(tmp_path / "results"), batch=batch, return_state=True)
        )
    )
    runner.start()
    deadline = time.monotonic() + 60
    while not (pids.exists() and len(pids.read_text().split()) == 2):
        assert time.monotonic() < deadline and runner.is_alive(), "the jobs did not start"
        time.sleep(0.2)

    async def cancel() -> None:
        async with get_client() as client:
            (run,) = await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[batch])))
            await client.set_flow_run_state(run.id, Cancelling(), force=True)

    asyncio.run(cancel())
    runner.join(timeout=60)
    assert not runner.is_alive()
    (state,) = states
    assert state.is_cancelled(), state
    summary = summary_of(state)
    assert [j.reason for j in summary.jobs] == ["cancelled"] * 4  # two killed, two dropped from the host's queue
    assert len(pids.read_text().split()) == 2
    for pid in map(int, pids.read_text().split()):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

    async def task_runs() -> list[Any]:
        async with get_client() as client:
            flow_run_filter = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            return await client.read_task_runs(flow_run_filter=flow_run_filter)

    jobs = [t for t in asyncio.run(task_runs()) if t.task_key.startswith("run_job")]
    assert len(jobs) == 4 and all(t.state.is_cancelled() and t.run_count == 1 for t in jobs), jobs  # not retried


def test_a_running_jobs_output_reaches_its_task_runs_logs_while_it_runs(tmp_path: Path, monkeypatch: Any) -> None:
    from cloudsend_prefect import dispatch

    monkeypatch.setattr(dispatch, "LIVE_AFTER", 0.5)
    monkeypatch.setattr(dispatch, "LIVE_EVERY", 0.5)
    command = "for i in 1 2 3 4 5 6; do echo line $i; echo warn $i >&2; sleep 0.5; done"
    job = {"name": "talker", "run_command": command}
    config = write_config(
        tmp_path / "proj", {"project": "live", "poll_interval": 0.2, "instances": [{}], "jobs": [job]}
    )
    state = cloudsend(config=str(config), results_dir=str(tmp_path / "results"), return_state=True)
    (result,) = summary_of(state).jobs
    assert result.ok and result.ended is not None

    async def logs() -> list[Any]:
        async with get_client() as client:
            flow_run_filter = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            (run,) = [t for t in await client.read_task_runs(flow_run_filter=flow_run_filter) if t.name == "talker"]
            return await client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[run.id])))

    deadline = time.monotonic() + 20
    found = asyncio.run(logs())
    while not any("line 1" in log.message for log in found):  # the server records logs a moment later
        assert time.monotonic() < deadline, [log.message for log in found]
        time.sleep(0.5)
        found = asyncio.run(logs())
    live = [log for log in found if log.message.startswith(("stdout:", "stderr:"))]
    assert live and all(log.timestamp.timestamp() < result.ended for log in live)  # sent while it ran
    assert any("line 1" in log.message for log in live) and any("warn 1" in log.message for log in live)


def test_a_task_run_state_the_server_never_got_is_set_at_the_end(tmp_path: Path, monkeypatch: Any) -> None:
    """An event lost on its way to the server (a real server's messaging can drop one) would leave the job's
    task run Running in the UI for ever: at the batch's end, the final states the server misses are set
    through its API."""
    from prefect import task_engine

    from cloudsend_prefect import running

    emit = task_engine.emit_task_run_state_change_event

    def lossy(*, task_run: Any, validated_state: Any, **kw: Any) -> Any:
        if task_run.name == "lost" and validated_state.is_final():
            return None  # never sent, as if the server's messaging had dropped it
        return emit(task_run=task_run, validated_state=validated_state, **kw)

    monkeypatch.setattr(task_engine, "emit_task_run_state_change_event", lossy)
    monkeypatch.setattr(running, "STALL", 1.0)
    jobs = [{"name": name, "run_command": "true"} for name in ("kept", "lost")]
    config = write_config(tmp_path / "proj", {"project": "lossy", "instances": [{"cpus": 2}], "jobs": jobs})
    state = cloudsend(config=str(config), results_dir=str(tmp_path / "results"), return_state=True)
    assert state.is_completed()

    async def job_runs() -> dict[str, Any]:
        async with get_client() as client:
            flow_run_filter = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            runs = await client.read_task_runs(flow_run_filter=flow_run_filter)
        return {run.name: run.state.type.value for run in runs if run.task_key.startswith("run_job")}

    assert asyncio.run(job_runs()) == {"kept": "COMPLETED", "lost": "COMPLETED"}
