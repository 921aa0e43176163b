"""Environment and job hashes: stable across machines and checkouts, changed by any edit that matters."""

from __future__ import annotations

import os
import shutil
import textwrap
import time
from pathlib import Path

import pytest

from cloudsend_prefect.hashing import digest, file_digest
from cloudsend_prefect.resolve import load_config
from cloudsend_prefect.specs import JobSpec, expand_jobs

CONFIG = """\
project: hashes
instances: [{cpus: 2}]
environments:
  - {name: sci, env_pypi: requirements.txt, command: setup.sh, env_aptget: [git]}
jobs:
  - {run_script: analyse.py 1 10, env_name: sci, upload_files: [data/input.csv],
     input_files: params.json, output_files: result.txt, repeat: 2}
  - {run_command: "echo done > done.txt", output_files: done.txt}
"""

FILES = {
    "analyse.py": "import sys\nprint(sys.argv)\n",
    "data/input.csv": "a,b\n1,2\n",
    "params.json": '{"alpha": 1}\n',
    "requirements.txt": "numpy==2.1.0\n",
    "setup.sh": "echo setting up\n",
    "README.txt": "not part of any job\n",
}


def make_project(root: Path, config: str = CONFIG) -> Path:
    for rel, text in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "batch.yaml").write_text(config)
    return root


def specs(root: Path) -> list[JobSpec]:
    return expand_jobs(load_config(root / "batch.yaml"))


def hashes(root: Path) -> tuple[str, list[str]]:
    jobs = specs(root)
    assert jobs[0].env is not None
    return jobs[0].env.hash, [job.hash for job in jobs]


def edit(path: Path, text: str) -> None:
    """Rewrite a file at once, as an editor would (same size, same second: the cache must not be fooled)."""
    path.write_text(text)


def test_digest_and_file_digest_are_fixed_algorithms(tmp_path: Path) -> None:
    assert digest({"b": [1, "é"], "a": None}) == digest({"a": None, "b": [1, "é"]})
    assert digest({"a": 1}) == "015abd7f5cc57a2dd94b7590f04ad8084273905ee33ec5cebeae62276a97f862"  # sha256('{"a":1}')
    (tmp_path / "hello").write_bytes(b"hello\n")
    assert file_digest(tmp_path / "hello") == "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"


def test_known_hashes_of_a_tiny_config(tmp_path: Path) -> None:
    """Pinned values: if the hashing scheme changes, every finished job of every user re-runs. Change on purpose."""
    (tmp_path / "run.py").write_text("print('hi')\n")
    (tmp_path / "batch.yaml").write_text(
        "environments: [{env_pypi: [numpy]}]\njobs: [{run_script: run.py 1, output_files: out.txt}]\n"
    )
    (job,) = specs(tmp_path)
    assert job.env is not None
    assert job.env.hash == digest({"requirements.txt": "numpy\n"})
    assert job.env.hash == "6ec02193fcc29409c73ef7f934e33f532952ff34a570aaa3d780f333e903c5f0"
    assert job.hash == "2c5969fa6085fb1a8858771df4dfa95099a9ce46bcf08faa8ea0f5a10e4babaf"
    assert job.key == job.hash[:16] + "-1"


def test_same_project_in_two_places_has_the_same_hashes(tmp_path: Path) -> None:
    first = make_project(tmp_path / "alice" / "project")
    second = tmp_path / "bob" / "elsewhere" / "deeper" / "copy"
    shutil.copytree(first, second)
    old = time.time() - 86400
    for path in second.rglob("*"):  # another checkout: other mtimes
        os.utime(path, (old, old))
    assert hashes(first) == hashes(second)
    a, b = specs(first), specs(second)
    assert [s.key for s in a] == [s.key for s in b]
    assert [s.command for s in a] == [s.command for s in b]
    assert a[0].env == b[0].env


def test_the_working_directory_does_not_matter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_project(tmp_path / "p")
    before = hashes(root)
    monkeypatch.chdir(tmp_path)
    assert hashes(root) == before


@pytest.mark.parametrize(
    ("rel", "text", "env_changes"),
    [
        ("analyse.py", "import sys\nprint(sys.argv!)\n", False),
        ("data/input.csv", "a,b\n1,3\n", False),
        ("params.json", '{"alpha": 2}\n', False),
        ("requirements.txt", "numpy==2.1.1\n", True),
        ("setup.sh", "echo setting up!\n", True),
    ],
    ids=["script", "upload", "input", "requirements", "setup-script"],
)
def test_an_edited_file_changes_the_hash(tmp_path: Path, rel: str, text: str, env_changes: bool) -> None:
    root = make_project(tmp_path)
    env_before, jobs_before = hashes(root)
    original = (root / rel).read_text()
    edit(root / rel, text)
    env_after, jobs_after = hashes(root)
    assert (env_after != env_before) == env_changes
    assert jobs_after[0] != jobs_before[0]  # the script job: its files, or its environment, changed
    # the command job uses no file; it changes only with its environment (the only one, so its default)
    assert (jobs_after[2] != jobs_before[2]) == env_changes
    edit(root / rel, original)  # put back: the old hashes, so finished jobs are reused
    assert hashes(root) == (env_before, jobs_before)


def test_a_same_size_edit_within_one_timestamp_tick_is_seen(tmp_path: Path) -> None:
    """Many filesystems stamp mtimes with a coarse clock: an edit right after a hash can keep mtime and size."""
    path = tmp_path / "f.txt"
    tick = time.time_ns()
    for text in ("value = 1\n", "value = 2\n", "value = 3\n"):
        path.write_text(text)
        os.utime(path, ns=(tick, tick))  # same inode, size and mtime as the previous version
        assert file_digest(path) == digest_bytes(text.encode())


def test_an_old_file_is_cached_and_still_rehashed_when_its_mtime_changes(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(b"x" * 1000)
    os.utime(path, (1_000_000_000, 1_000_000_000))
    assert file_digest(path) == digest_bytes(b"x" * 1000)
    path.write_bytes(b"y" * 1000)
    os.utime(path, (1_000_000_001, 1_000_000_001))
    assert file_digest(path) == digest_bytes(b"y" * 1000)


def digest_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_an_unrelated_file_does_not_change_hashes(tmp_path: Path) -> None:
    root = make_project(tmp_path)
    before = hashes(root)
    edit(root / "README.txt", "edited\n")
    (root / "new_file.py").write_text("x = 1\n")
    assert hashes(root) == before


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("run_script: analyse.py 1 10", "run_script: analyse.py 1 11"),
        ("run_script: analyse.py 1 10", "run_script: analyse.py 1 10, args: [--fast]"),
        ("run_script: analyse.py 1 10", "run_script: analyse.py 10 1"),
        ("output_files: result.txt", "output_files: [result.txt, log.txt]"),
    ],
    ids=["arg-value", "extra-args", "arg-order", "outputs"],
)
def test_changed_args_change_the_job_hash(tmp_path: Path, old: str, new: str) -> None:
    root = make_project(tmp_path)
    env_before, jobs_before = hashes(root)
    (root / "batch.yaml").write_text(CONFIG.replace(old, new))
    env_after, jobs_after = hashes(root)
    assert env_after == env_before
    assert jobs_after[0] != jobs_before[0]
    assert jobs_after[2] == jobs_before[2]


def test_the_environment_name_alone_does_not_change_hashes(tmp_path: Path) -> None:
    root = make_project(tmp_path)
    before = hashes(root)
    (root / "batch.yaml").write_text(CONFIG.replace("sci", "lab"))
    assert hashes(root) == before
    env = specs(root)[0].env
    assert env is not None and env.name == "lab"


def test_environment_content_not_form_makes_its_hash(tmp_path: Path) -> None:
    """A requirements file and the same list inline build the same environment."""
    root = make_project(tmp_path)
    env_before, _ = hashes(root)
    inline = CONFIG.replace("env_pypi: requirements.txt", "env_pypi: ['numpy==2.1.0']")
    (root / "batch.yaml").write_text(inline)
    assert hashes(root)[0] == env_before
    (root / "batch.yaml").write_text(inline.replace("env_aptget: [git]", "env_aptget: [git, curl]"))
    assert hashes(root)[0] != env_before


def test_repeat_gives_distinct_keys_with_the_same_hash(tmp_path: Path) -> None:
    root = make_project(tmp_path, CONFIG.replace("repeat: 2", "repeat: 3"))
    jobs = specs(root)
    repeated = jobs[:3]
    assert len({job.hash for job in repeated}) == 1
    assert [job.key for job in repeated] == [f"{repeated[0].hash[:16]}-{n}" for n in (1, 2, 3)]
    assert [job.name for job in repeated] == ["analyse-1", "analyse-2", "analyse-3"]
    assert len({job.key for job in jobs}) == len(jobs)


def test_two_identical_jobs_share_a_hash_but_not_a_key(tmp_path: Path) -> None:
    root = make_project(tmp_path, "jobs: [{run_command: echo hi, name: first}, {run_command: echo hi, name: second}]\n")
    first, second = specs(root)
    assert first.hash == second.hash
    assert first.key != second.key
    assert (first.name, second.name) == ("first", "second")


def test_a_file_outside_the_project_is_hashed_by_name_and_content(tmp_path: Path) -> None:
    shared_a, shared_b = tmp_path / "machine-a" / "shared", tmp_path / "machine-b" / "other" / "shared"
    for shared in (shared_a, shared_b):
        shared.mkdir(parents=True)
        (shared / "lookup.csv").write_text("k,v\n")
    roots = []
    for shared, name in ((shared_a, "a"), (shared_b, "b")):
        root = make_project(tmp_path / name)
        (root / "batch.yaml").write_text(CONFIG.replace("[data/input.csv]", f"[{shared / 'lookup.csv'}]"))
        roots.append(root)
    assert hashes(roots[0]) == hashes(roots[1])
    assert "lookup.csv" in {f.rel for f in specs(roots[0])[0].files}


def test_dedent_helper_config_is_valid(tmp_path: Path) -> None:
    """The fixture config itself loads (guards the parametrised edits above against typos)."""
    root = make_project(tmp_path)
    jobs = specs(root)
    assert [j.command for j in jobs] == ["python3 analyse.py 1 10"] * 2 + ["echo done > done.txt"]
    assert textwrap.dedent(CONFIG) == CONFIG
