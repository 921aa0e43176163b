"""The `cloudsend` command line, as a user types it."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from cloudsend_prefect.cli import app
from cloudsend_prefect.flow import run_batch
from cloudsend_prefect.results import BatchSummary

runner = CliRunner()


def write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "batch.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_validate_accepts_a_good_config_and_names_the_field_of_a_bad_one(tmp_path: Path) -> None:
    good = write(tmp_path, {"instances": [{"cpus": 2}], "jobs": [{"run_command": "true", "repeat": 3}]})
    result = runner.invoke(app, ["validate", str(good)])
    assert result.exit_code == 0, result.output
    assert "3 job run(s)" in result.output
    bad = write(tmp_path, {"instances": [{"cpus": 2}], "jobs": [{"run_command": "true", "cpus_req": 3}]})
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2
    assert "batch.yaml" in result.output and "jobs[0].cpus_req" in result.output


def test_plan_shows_the_assignment_and_starts_nothing(tmp_path: Path, cloudsend_home: Path) -> None:
    config = write(
        tmp_path,
        {
            "instances": [{"cpus": 2, "name": "box"}],
            "jobs": [{"run_command": "sleep 1", "expected_duration": 10, "repeat": 3}],
        },
    )
    result = runner.invoke(app, ["plan", str(config)])
    assert result.exit_code == 0, result.output
    assert "sleep-3" in result.output and "box (2 CPUs)" in result.output
    assert " 10 " in result.output and " 20 " in result.output  # the third job waits for a free CPU
    assert not cloudsend_home.exists()


def test_run_status_and_logs(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        {
            "project": "cli-run",
            "instances": [{"cpus": 2}],
            "jobs": [
                {
                    "name": "hello",
                    "run_command": "echo hello-out; echo hello-err >&2; echo hi > hi.txt",
                    "output_files": "hi.txt",
                },
                {"name": "broken", "run_command": "echo oops >&2; exit 4"},
            ],
        },
    )
    results = tmp_path / "results"
    result = runner.invoke(app, ["run", str(config), "--results-dir", str(results)])
    assert result.exit_code == 1, result.output  # a job is not done
    assert "1 done, 1 failed" in result.output and "exit code 4" in result.output
    assert (results / "cli-run" / "hello" / "hi.txt").read_text() == "hi\n"

    status = runner.invoke(app, ["status", str(config)])
    assert status.exit_code == 0, status.output
    assert "hello" in status.output and "done" in status.output and "failed" in status.output
    as_json = runner.invoke(app, ["status", str(config), "--json"])
    assert as_json.exit_code == 0, as_json.output
    report = json.loads(as_json.stdout)
    assert (report["batch"], report["project"]) == ("cli-run", "cli-run")
    jobs = {job["job"]: job for job in report["jobs"]}
    assert (jobs["hello"]["state"], jobs["hello"]["exit"], jobs["hello"]["host"]) == ("done", 0, "local-0")
    assert (jobs["broken"]["state"], jobs["broken"]["exit"]) == ("failed", 4) and jobs["broken"]["duration"] >= 0

    out = runner.invoke(app, ["logs", str(config), "hello"])
    assert out.exit_code == 0 and out.output == "hello-out\n"
    err = runner.invoke(app, ["logs", str(config), "broken", "--stderr"])
    assert err.exit_code == 0 and err.output == "oops\n"
    unknown = runner.invoke(app, ["logs", str(config), "nope"])
    assert unknown.exit_code == 2 and "no job named nope" in unknown.output


def test_run_reads_the_config_once_and_resolves_its_jobs_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`cloudsend run` resolves its batch before anything is created and hands it to the flow: the file is read
    once and its jobs expanded once per run (a large sweep is not resolved again in the flow)."""
    from cloudsend_prefect import loading, resolve, specs

    calls: Counter[str] = Counter()
    for module, name in ((loading, "_read_mapping"), (resolve, "expand_jobs"), (specs, "expand_jobs")):
        real = getattr(module, name)

        def counted(*args: Any, real: Any = real, name: str = name, **kwargs: Any) -> Any:
            calls[name] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    jobs = [{"name": "fit-{lr}", "run_command": "echo {lr}", "matrix": {"lr": [1, 2]}}]
    config = write(tmp_path, {"project": "once", "instances": [{"cpus": 2}], "jobs": jobs})
    result = runner.invoke(app, ["run", str(config), "--results-dir", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "2 done" in result.output
    assert calls == {"_read_mapping": 1, "expand_jobs": 1}


def test_the_flows_thread_count_is_read_as_each_run_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    from cloudsend_prefect import flow

    monkeypatch.setattr(flow, "MAX_WORKERS", 3)
    assert flow.cloudsend.task_runner.duplicate()._max_workers == 3  # the copy Prefect makes for a run


def test_cancel_a_running_batch(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        {
            "project": "cli-cancel",
            "poll_interval": 0.2,
            "instances": [{"cpus": 1}],
            "jobs": [{"run_command": "sleep 60", "repeat": 2}],
        },
    )
    summary: list[BatchSummary] = []
    thread = threading.Thread(target=lambda: summary.append(run_batch(config=str(config), results_dir=str(tmp_path))))
    thread.start()
    deadline = time.monotonic() + 60
    while "running" not in runner.invoke(app, ["status", str(config)]).output:
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.3)
    result = runner.invoke(app, ["cancel", str(config)])
    assert result.exit_code == 0, result.output
    assert "cancelled sleep-1" in result.output and "cancelled sleep-2" in result.output
    thread.join(timeout=60)
    assert summary, "the flow did not end after the cancel"
    assert [(j.state, j.reason) for j in summary[0].jobs] == [("aborted", "cancelled")] * 2


def test_run_output_stays_readable_for_big_batches(tmp_path: Path) -> None:
    """Past 50 jobs the final table lists only the jobs not done, and the counts say the rest; a rerun shows
    the finished jobs as cached, not as freshly done."""
    jobs = [{"name": "ok", "run_command": "true", "repeat": 60}, {"name": "bad", "run_command": "exit 3", "repeat": 3}]
    config = write(tmp_path, {"project": "big-cli", "poll_interval": 0.2, "instances": [{"cpus": 8}], "jobs": jobs})
    result = runner.invoke(app, ["run", str(config), "--results-dir", str(tmp_path / "r")])
    assert result.exit_code == 1, result.output
    assert "jobs not done" in result.output and "60 done, 3 failed;" in result.output
    assert "bad-1" in result.output and "ok-1 " not in result.output
    again = runner.invoke(app, ["run", str(config), "--results-dir", str(tmp_path / "r")])
    assert again.exit_code == 1, again.output
    assert "60 done, 3 failed (60 cached);" in again.output


def test_init_writes_a_commented_starter_that_runs_as_is(tmp_path: Path) -> None:
    from cloudsend_prefect.schema import render

    path = tmp_path / "new" / "cloudsend.yaml"
    result = runner.invoke(app, ["init", str(path)])
    assert result.exit_code == 0, result.output
    text = path.read_text()
    assert text.startswith("# yaml-language-server: $schema=cloudsend.schema.json\n")
    assert text.count("\n#") + text.count("  #") >= 10, "commented"
    assert (path.parent / "cloudsend.schema.json").read_text() == render()
    checked = runner.invoke(app, ["validate", str(path)])
    assert checked.exit_code == 0 and "4 job run(s)" in checked.output, checked.output
    planned = runner.invoke(app, ["plan", str(path)])
    assert planned.exit_code == 0 and "square-3" in planned.output and "4 jobs" in planned.output
    again = runner.invoke(app, ["init", str(path)])
    assert again.exit_code == 1 and "exists (--force replaces it)" in again.output
    assert runner.invoke(app, ["init", str(path), "--force"]).exit_code == 0


def test_the_schemas_examples_are_configs_the_loader_and_the_schema_accept(tmp_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from cloudsend_prefect.loading import parse_config
    from cloudsend_prefect.schema import CONFIG_EXAMPLE, JOB_EXAMPLES, config_schema, starter_config

    schema = config_schema()
    validator = jsonschema.Draft202012Validator(schema)
    kinds = {next(k for k in ("matrix", "repeat", "run_script", "run_command") if k in job) for job in JOB_EXAMPLES}
    assert kinds == {"matrix", "repeat", "run_script", "run_command"}
    assert any(isinstance(job.get("matrix"), list) for job in JOB_EXAMPLES), "a list of points too"
    configs = [
        CONFIG_EXAMPLE,
        yaml.safe_load(starter_config("x.json")),
        *({"environments": [{"name": "sci"}], "jobs": [job]} for job in JOB_EXAMPLES),
    ]
    for data in configs:
        assert list(validator.iter_errors(data)) == [], data
        parse_config(data, source="example", base_dir=tmp_path)  # the models take it too
    assert schema["$defs"]["Job"]["examples"] == JOB_EXAMPLES and schema["examples"] == [CONFIG_EXAMPLE]
