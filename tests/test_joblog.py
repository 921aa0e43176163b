"""After a real local batch: its joblog (GNU parallel's columns, one line per job, cached runs marked),
`cloudsend status` without a config (from what this machine recorded), and cache reuse scoped by batch."""

from __future__ import annotations

import json
import time
from pathlib import Path

from typer.testing import CliRunner

from cloudsend_prefect.cli import app
from cloudsend_prefect.flow import run_batch
from cloudsend_prefect.joblog import COLUMNS, read
from cloudsend_prefect.results import BatchSummary
from tests.faults import write_config

runner = CliRunner()


def run(tmp_path: Path, config: dict, files: dict[str, str] | None = None) -> BatchSummary:
    path = write_config(tmp_path / "proj", config, files)
    return run_batch(config=str(path), results_dir=str(tmp_path / "results"))


def test_joblog_lists_every_job_as_parallel_does_and_status_reads_it_back(tmp_path: Path) -> None:
    config = {
        "project": "logged",
        "instances": [{"cpus": 2}],
        "poll_interval": 0.2,
        "jobs": [
            {
                "name": "ok",
                "run_command": "cat in.txt > out.txt",
                "upload_files": ["in.txt"],
                "output_files": "out.txt",
            },
            {"name": "boom", "run_command": "exit 3"},
            {"name": "killed", "run_command": "kill -TERM $$"},
            {"run_command": "echo {x} > x.txt", "matrix": {"x": ["a", "b"]}, "output_files": "x.txt"},
        ],
    }
    before = time.time()
    first = run(tmp_path, config, {"in.txt": "input\n"})
    after = time.time()
    assert first.counts == {"done": 3, "failed": 2}
    path = tmp_path / "results" / "logged" / "joblog.tsv"
    assert path.read_text().splitlines()[0].split("\t") == list(COLUMNS)
    rows = {row["Job"]: row for row in read(path)}
    assert set(rows) == {"ok", "boom", "killed", "echo-x=a", "echo-x=b"}
    assert sorted(int(row["Seq"]) for row in rows.values()) == [1, 2, 3, 4, 5]
    assert {row["Host"] for row in rows.values()} == {"local-0"}
    assert (rows["ok"]["State"], rows["ok"]["Exitval"], rows["ok"]["Signal"]) == ("done", "0", "0")
    assert (rows["boom"]["State"], rows["boom"]["Exitval"]) == ("failed", "3")
    assert (rows["killed"]["State"], rows["killed"]["Signal"]) == ("failed", "15")
    assert rows["echo-x=b"]["Command"] == "echo b > x.txt"
    for row in rows.values():
        assert before - 1 <= float(row["Starttime"]) <= after and 0 <= float(row["JobRuntime"]) <= after - before
    assert int(rows["ok"]["Send"]) == len("input\n")  # its upload
    assert int(rows["ok"]["Receive"]) >= len("input\n")  # its output (and no log: nothing was written to them)

    second = run(tmp_path, config, {"in.txt": "input\n"})
    assert sum(job.cached for job in second.jobs) == 3
    rows = {row["Job"]: row for row in read(path)}
    assert len(rows) == 5, "a rerun's joblog lists the whole batch again"
    assert rows["ok"]["State"] == "done (cached)" and rows["ok"]["Send"] == rows["ok"]["Receive"] == "0"
    assert rows["boom"]["State"] == "failed"

    # `cloudsend status` without a config: the batches this machine ran, and one batch's jobs
    listed = runner.invoke(app, ["status", "--json"])
    assert listed.exit_code == 0, listed.output
    (batch,) = json.loads(listed.stdout)
    assert (batch["batch"], batch["project"], batch["jobs"], batch["ended"]) == ("logged", "logged", 5, 5)
    assert (batch["done"], batch["not_done"], batch["cached"]) == (3, 2, 3)
    assert batch["results_dir"] == str((tmp_path / "results" / "logged").absolute())
    jobs = runner.invoke(app, ["status", "--batch", "logged", "--json"])
    assert jobs.exit_code == 0, jobs.output
    states = {row["job"]: (row["state"], row["exit"], row["host"]) for row in json.loads(jobs.stdout)["jobs"]}
    assert states["boom"] == ("failed", 3, "local-0") and states["ok"] == ("done (cached)", 0, "local-0")
    table = runner.invoke(app, ["status"])
    assert table.exit_code == 0 and "logged" in table.stdout
    missing = runner.invoke(app, ["status", "--batch", "nope"])
    assert missing.exit_code == 1 and "no batch nope recorded" in missing.output


def test_a_job_is_reused_only_by_its_own_batch_and_keeps_its_current_name(tmp_path: Path) -> None:
    """Project `add` runs a job identical to one project `par` ran: it runs it itself, under its own name and
    folder; a rerun of `add` reuses its own run, and a job renamed since is reported under its new name."""
    job = {"run_command": "echo same > same.txt", "output_files": "same.txt"}
    par = run(tmp_path / "par", {"project": "par", "instances": [{"cpus": 1}], "jobs": [{**job, "name": "p"}]})
    add = run(tmp_path / "add", {"project": "add", "instances": [{"cpus": 1}], "jobs": [{**job, "name": "a"}]})
    assert [(j.name, j.cached) for j in par.jobs] == [("p", False)]
    assert [(j.name, j.cached) for j in add.jobs] == [("a", False)], "not taken from project par"
    assert (tmp_path / "add" / "results" / "add" / "a" / "same.txt").read_text() == "same\n"
    renamed = run(tmp_path / "add", {"project": "add", "instances": [{"cpus": 1}], "jobs": [{**job, "name": "b"}]})
    assert [(j.name, j.cached, j.state) for j in renamed.jobs] == [("b", True, "done")]
    assert (tmp_path / "add" / "results" / "add" / "b" / "same.txt").read_text() == "same\n"
