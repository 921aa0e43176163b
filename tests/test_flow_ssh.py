"""Batches on the `ssh` provider, across three real sshd hosts on loopback ports."""

from __future__ import annotations

import itertools
from pathlib import Path

from cloudsend_prefect.flow import run_batch
from cloudsend_prefect.results import BatchSummary
from tests.faults import ssh_instances, write_config
from tests.sshd import SshdHost


def run_config(tmp_path: Path, config: dict, files: dict[str, str] | None = None, **kw: object) -> BatchSummary:
    path = write_config(tmp_path / "proj", config, files)
    return run_batch(config=str(path), results_dir=str(tmp_path / "results"), **kw)


def peak_cpus(spans: list[tuple[float, float, int]]) -> int:
    events = sorted([(s, c) for s, _, c in spans] + [(e, -c) for _, e, c in spans], key=lambda x: (x[0], x[1]))
    return max(itertools.accumulate(delta for _, delta in events))


def test_batch_across_three_ssh_hosts(tmp_path: Path, sshd_hosts: list[SshdHost]) -> None:
    jobs = [
        {
            "run_script": f"work.py {i}",
            "upload_files": ["data/shared.txt"],
            "output_files": ["out.txt"],
            "name": f"work-{i:02d}",
        }
        for i in range(18)
    ]
    files = {
        "work.py": "import sys, time\ntime.sleep(0.5)\n"
        "n = int(sys.argv[1])\n"
        "open('out.txt', 'w').write(f\"{n} {open('data/shared.txt').read().strip()} {n * n}\\n\")\n",
        "data/shared.txt": "shared-input",
    }
    config = {
        "project": "ssh-e2e",
        "poll_interval": 0.2,
        "instances": ssh_instances(sshd_hosts, 2, "e2e"),
        "jobs": jobs,
    }
    summary = run_config(tmp_path, config, files)
    assert summary.ok, [(j.name, j.reason) for j in summary.jobs if not j.ok]
    for i in range(18):
        out = tmp_path / "results" / "ssh-e2e" / f"work-{i:02d}" / "out.txt"
        assert out.read_text() == f"{i} shared-input {i * i}\n"
    by_host: dict[str, list[tuple[float, float, int]]] = {}
    for job in summary.jobs:
        assert job.started is not None and job.ended is not None and job.host is not None
        by_host.setdefault(job.host, []).append((job.started, job.ended, 1))
    assert set(by_host) == {h.name for h in sshd_hosts}  # every host took work
    for spans in by_host.values():
        assert peak_cpus(spans) == 2  # concurrent up to the host's CPUs, never beyond
    # Uploads are stored once per host by content: the script and the data file, not once per job.
    for h in sshd_hosts:
        store = Path(f"{h.home}/e2e/files")
        assert len([p for p in store.iterdir() if p.is_file()]) == 2
    # Watching costs a round trip per host per poll, not per job; staging is batched.
    trips = sum(summary.round_trips.values())
    assert trips / len(jobs) < 8, summary.round_trips


def test_changed_upload_is_sent_again_unchanged_is_not(tmp_path: Path, sshd_hosts: list[SshdHost]) -> None:
    host = sshd_hosts[:1]
    config = {
        "project": "ssh-uploads",
        "instances": ssh_instances(host, 2, "uploads"),
        "jobs": [
            {"run_command": "cat data/in.txt > copy.txt", "upload_files": ["data/in.txt"], "output_files": "copy.txt"}
        ],
    }
    first = run_config(tmp_path, config, {"data/in.txt": "version 1\n"})
    assert first.ok
    store = Path(f"{host[0].home}/uploads/files")
    assert len([p for p in store.iterdir() if p.is_file()]) == 1
    second = run_config(tmp_path, config, {"data/in.txt": "version 2\n"})
    assert second.ok
    assert (tmp_path / "results" / "ssh-uploads" / "cat" / "copy.txt").read_text() == "version 2\n"
    assert len([p for p in store.iterdir() if p.is_file()]) == 2
