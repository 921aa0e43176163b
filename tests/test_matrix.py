"""Parameter sweeps: a job's ``matrix`` (a grid or a list of points) becomes one job per point, each with its
own name, command line, hash and results folder; bad matrices are one clear error before anything starts."""

from __future__ import annotations

import json
import shlex
import textwrap
from pathlib import Path

import pytest

from cloudsend_prefect.config import MAX_JOB_RUNS, check_job_name
from cloudsend_prefect.errors import ConfigError
from cloudsend_prefect.resolve import load_config, resolve_batch
from cloudsend_prefect.specs import JobSpec


def _batch(tmp_path: Path, body: str) -> list[JobSpec]:
    (tmp_path / "fit.py").write_text("import sys\nprint(sys.argv)\n")
    (tmp_path / "data").mkdir(exist_ok=True)
    for name in ("a", "b"):
        (tmp_path / "data" / f"{name}.csv").write_text(f"{name}\n")
    path = tmp_path / "sweep.yaml"
    path.write_text("instances: [{cpus: 4}]\n" + textwrap.dedent(body))
    return resolve_batch(path).jobs


def _error(tmp_path: Path, body: str) -> str:
    with pytest.raises(ConfigError) as info:
        _batch(tmp_path, body)
    return str(info.value)


def test_a_grid_is_every_combination_each_named_by_its_values(tmp_path: Path) -> None:
    jobs = _batch(
        tmp_path,
        """
        jobs:
          - run_script: fit.py --lr {lr} --depth {depth}
            matrix: {lr: [0.1, 0.01], depth: [3, 5, 8]}
            output_files: ["model-{depth}.json"]
        """,
    )
    assert [job.name for job in jobs] == [
        f"fit-lr={lr},depth={depth}" for lr in ("0.1", "0.01") for depth in ("3", "5", "8")
    ]
    assert [shlex.split(job.command)[2:] for job in jobs][:2] == [
        ["--lr", "0.1", "--depth", "3"],
        ["--lr", "0.1", "--depth", "5"],
    ]
    assert jobs[0].outputs == ["model-3.json"]
    assert len({job.hash for job in jobs}) == 6, "each point is a job of its own"
    assert len({job.key for job in jobs}) == 6
    for job in jobs:
        check_job_name(job.name)


def test_a_list_of_points_with_a_name_template_uploads_and_repeat(tmp_path: Path) -> None:
    jobs = _batch(
        tmp_path,
        """
        jobs:
          - name: "fit-{sample}-{flag}"
            run_script: fit.py data/{sample}.csv
            upload_files: ["data/{sample}.csv"]
            args: ["--verbose={flag}"]
            matrix: [{sample: a, flag: true}, {sample: b, flag: false}]
            repeat: 2
        """,
    )
    assert [job.name for job in jobs] == ["fit-a-true-1", "fit-a-true-2", "fit-b-false-1", "fit-b-false-2"]
    assert shlex.split(jobs[2].command) == ["python3", "fit.py", "data/b.csv", "--verbose=false"]
    assert [f.rel for f in jobs[2].files] == ["fit.py", "data/b.csv"]
    assert jobs[0].hash == jobs[1].hash != jobs[2].hash, "repeats share a point's hash"


def test_values_reach_the_job_literally_never_through_the_shell(tmp_path: Path) -> None:
    hostile = "$(touch pwned); `id` 'q\" x"
    jobs = _batch(
        tmp_path,
        f"""
        jobs:
          - run_command: printf %s {{v}} > out.txt
            matrix: {{v: [{json.dumps(hostile)}, plain]}}
          - run_script: fit.py {{v}}
            matrix: {{v: [{json.dumps(hostile)}]}}
        """,
    )
    assert shlex.split(jobs[0].command) == ["printf", "%s", hostile, ">", "out.txt"]
    assert shlex.split(jobs[2].command) == ["python3", "fit.py", hostile]
    for job in jobs:  # what reaches a name is one safe path component
        check_job_name(job.name)
        assert "/" not in job.name and "$" not in job.name


def test_other_braces_are_left_alone(tmp_path: Path) -> None:
    jobs = _batch(
        tmp_path,
        """
        jobs:
          - run_command: "awk '{print $1}' <<< {x} > ${HOME:-x}.txt"
            matrix: {x: [1]}
        """,
    )
    assert jobs[0].command == "awk '{print $1}' <<< 1 > ${HOME:-x}.txt"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("jobs: [{run_command: echo, matrix: {x: [1, 2]}}]", "jobs[0].matrix: 'x' appear(s) in none of"),
        ("jobs: [{run_command: 'echo {x}', matrix: {x: []}}]", "jobs[0].matrix: x: no values"),
        ("jobs: [{run_command: 'echo {x}', matrix: []}]", "an empty list of points"),
        ("jobs: [{run_command: 'echo {x}', matrix: {'x-y': [1]}}]", "a parameter name is letters, digits and '_'"),
        ("jobs: [{run_command: 'echo {x}', matrix: [{x: 1}, {y: 2}]}]", "every point gives the same parameters"),
        ("jobs: [{run_command: 'echo {x}', matrix: {x: [null]}}]", "jobs[0].matrix"),
        ("jobs: [{run_command: 'echo {x}', matrix: {x: [[1]]}}]", "jobs[0].matrix"),
        ("jobs: [{run_script: 'fit.py {x}', upload_files: ['data/{x}.csv'], matrix: {x: [a, c]}}]", "data/c.csv"),
        ("jobs: [{name: '{x}', run_command: 'echo {x}', matrix: {x: ['-rf']}}]", "must not start with '-'"),
        ("jobs: [{name: '{x}.tsv', run_command: 'echo {x}', matrix: {x: [joblog]}}]", "the batch's joblog"),
    ],
)
def test_bad_matrices_are_one_clear_error(tmp_path: Path, body: str, expected: str) -> None:
    message = _error(tmp_path, body + "\n")
    assert expected in message
    assert message.startswith(str(tmp_path / "sweep.yaml"))


def test_points_whose_names_meet_are_numbered(tmp_path: Path) -> None:
    jobs = _batch(tmp_path, "jobs: [{name: 'fit-{x}', run_command: 'echo {x}', matrix: {x: ['a b', a_b]}}]\n")
    assert [job.name for job in jobs] == ["fit-a_b-1", "fit-a_b-2"]
    assert jobs[0].hash != jobs[1].hash


def test_two_sweeps_may_share_a_name_template(tmp_path: Path) -> None:
    jobs = _batch(
        tmp_path,
        """
        jobs:
          - {name: "fit-{x}", run_command: "echo {x}", matrix: {x: [1, 2]}}
          - {name: "fit-{x}", run_command: "echo {x} again", matrix: {x: [3, 4]}}
        """,
    )
    assert [job.name for job in jobs] == ["fit-1", "fit-2", "fit-3", "fit-4"]


def test_the_number_of_points_is_bounded_before_expansion(tmp_path: Path) -> None:
    values = list(range(1001))
    body = f"jobs: [{{run_command: 'echo {{a}} {{b}}', matrix: {{a: {values}, b: {values}}}}}]\n"
    assert f"more than {MAX_JOB_RUNS} points" in _error(tmp_path, body)
    body = f"jobs: [{{run_command: 'echo {{a}}', matrix: {{a: {values[:1000]}}}, repeat: 1001}}]\n"
    assert "1001000 runs in all (matrix points times `repeat`)" in _error(tmp_path, body)


def test_a_ten_thousand_point_grid_expands_to_distinct_jobs(tmp_path: Path) -> None:
    """(Its timing is measured by ``bench/matrix.py``, not here: a loaded machine must not fail the suite.)"""
    jobs = _batch(
        tmp_path,
        f"""
        jobs:
          - run_script: fit.py {{a}} {{b}}
            matrix: {{a: {list(range(100))}, b: {list(range(100))}}}
        """,
    )
    assert len(jobs) == 10_000
    assert len({job.name for job in jobs}) == len({job.key for job in jobs}) == 10_000
    assert [job.index for job in jobs] == list(range(10_000))


def test_load_config_keeps_the_matrix_for_the_block_and_the_flow(tmp_path: Path) -> None:
    _batch(tmp_path, "jobs: [{run_command: 'echo {x}', matrix: {x: [1, 2]}}]\n")
    config = load_config(tmp_path / "sweep.yaml")
    assert config.jobs[0].matrix == {"x": [1, 2]}
    assert config.jobs[0].runs == 2
