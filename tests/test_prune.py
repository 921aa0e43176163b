"""`cloudsend prune` against a real sshd host on loopback: old ended jobs on the host, old stored outputs and
cached results on the client, listed with their sizes (a dry run by default), removed with --yes; what has
not ended, what a running batch holds, and what is recent are never touched."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from cloudsend_prefect.cli import app
from cloudsend_prefect.flow import run_batch
from tests.faults import ssh_instances, write_config
from tests.sshd import SshdHost

runner = CliRunner()
DAYS = 86400


def backdate(path: Path, seconds: float) -> None:
    when = time.time() - seconds
    os.utime(path, (when, when))


def prune(config: Path, *extra: str) -> dict[str, Any]:
    result = runner.invoke(app, ["prune", str(config), "--older-than", "1d", "--json", *extra])
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


def test_prune_lists_then_removes_only_old_ended_things(
    tmp_path: Path, sshd_hosts: list[SshdHost], cloudsend_home: Path
) -> None:
    host = sshd_hosts[0]
    jobs = [
        {"name": "old", "run_command": "head -c 50000 /dev/zero > big.bin", "output_files": "big.bin"},
        {"name": "fresh", "run_command": "echo new > new.txt", "output_files": "new.txt"},
    ]
    config = write_config(
        tmp_path / "proj",
        {
            "project": "prunable",
            "poll_interval": 0.2,
            "lost_after": 2,  # the batch's lease on its host runs out 1 s after it ends
            "instances": ssh_instances([host], 2, "prune"),
            "jobs": jobs,
        },
    )
    summary = run_batch(config=str(config), results_dir=str(tmp_path / "results"))
    assert summary.ok
    keys = {job.name: job.key for job in summary.jobs}
    base = Path(host.home) / "prune"
    old_job = base / "jobs" / "prunable" / keys["old"]
    (old_job / "end").write_text(f"{int(time.time() - 3 * DAYS)}\n")
    backdate(old_job / "end", 3 * DAYS)
    waiting = base / "jobs" / "other" / "0123456789abcdef-1"  # a job that never ended (queued, say): not pruned
    waiting.mkdir(parents=True)
    backdate(waiting, 3 * DAYS)
    store = cloudsend_home / "outputs" / "prunable" / keys["old"]
    backdate(store, 3 * DAYS)
    result = cloudsend_home / "results" / f"cloudsend-job-prunable-{keys['old']}"
    assert result.is_file()
    backdate(result, 3 * DAYS)
    time.sleep(1.5)

    listed = prune(config)
    assert listed["removed"] is False
    found = {(item["where"], item["kind"], item["path"]) for item in listed["items"]}
    assert found == {
        ("client", "outputs", str(store)),
        ("client", "result", str(result)),
        (host.name, "job", f"prunable/{keys['old']}"),
    }
    sizes = {item["kind"]: item["size"] for item in listed["items"]}
    assert sizes["job"] >= 50000 and sizes["outputs"] >= 50000  # its output, on the host and on the client
    assert all(item["age"] > 2 * DAYS for item in listed["items"])
    assert listed["bytes"] == sum(item["size"] for item in listed["items"])
    assert old_job.is_dir() and store.is_dir() and result.is_file(), "a dry run removes nothing"
    table = runner.invoke(app, ["prune", str(config), "--older-than", "1d"])
    assert table.exit_code == 0 and "dry run: nothing removed" in table.stdout

    lease = base / "leases" / "prunable"  # a client running the batch now: its jobs stay
    when = time.time() + 60
    os.utime(lease, (when, when))
    assert {item["kind"] for item in prune(config)["items"]} == {"outputs", "result"}
    backdate(lease, 10)

    removed = prune(config, "--yes")
    assert removed["removed"] is True and len(removed["items"]) == 3
    assert not old_job.exists() and not store.exists() and not result.exists()
    assert (base / "jobs" / "prunable" / keys["fresh"]).is_dir() and waiting.is_dir()
    assert (cloudsend_home / "outputs" / "prunable" / keys["fresh"]).is_dir()
    assert prune(config)["items"] == []

    again = run_batch(config=str(config), results_dir=str(tmp_path / "results"))
    assert {job.name: job.cached for job in again.jobs} == {"old": False, "fresh": True}, "a pruned job runs again"
    assert (tmp_path / "results" / "prunable" / "old" / "big.bin").stat().st_size == 50000


def test_prune_rejects_a_bad_age(tmp_path: Path) -> None:
    result = runner.invoke(app, ["prune", "--older-than", "soon"])
    assert result.exit_code == 2 and "expected an age like 30m, 12h, 7d or 2w" in result.output
