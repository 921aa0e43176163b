"""Hostile or careless configs: each defect is one ConfigError naming the file and the field, before anything runs.

Names that become paths, names that collide after `repeat`, host names that collapse into one, control
characters in file names, numbers that would mean hours of work, files nested 20 000 levels deep, files that
exist but cannot be read, and SSH settings that could only fail (or silently weaken) at the first connection.
"""

from __future__ import annotations

import base64
import os
import pathlib
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloudsend_prefect import specs
from cloudsend_prefect.config import MAX_JOB_RUNS, BatchConfig
from cloudsend_prefect.errors import ConfigError
from cloudsend_prefect.loading import MAX_CONFIG_BYTES, MAX_NESTING
from cloudsend_prefect.resolve import load_config
from cloudsend_prefect.specs import JobSpec, expand_jobs

FILES = {"analyse.py": "print('hi')\n", "data/input.csv": "a,b\n", "requirements.txt": "numpy\n", "setup.sh": "true\n"}


def write(
    root: Path, config: dict[str, Any] | str, files: dict[str, str] | None = None, name: str = "batch.yaml"
) -> Path:
    """The config (a dict is dumped as YAML, escaping any control character) and the files it names."""
    for rel, text in {**FILES, **(files or {})}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    path = root / name
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return path


def error(
    root: Path, config: dict[str, Any] | str, files: dict[str, str] | None = None, name: str = "batch.yaml"
) -> str:
    """The message of the ConfigError loading this config raises, checked to be one line naming the file."""
    path = write(root, config, files, name)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}:"), message
    assert len(message.splitlines()) == 1, message
    return message


def jobs_of(root: Path, config: dict[str, Any], files: dict[str, str] | None = None) -> list[JobSpec]:
    return expand_jobs(load_config(write(root, config, files)))


def one_job(**job: Any) -> dict[str, Any]:
    return {"instances": [{"cpus": 2}], "jobs": [{"run_command": "true", **job}]}


# ---------------------------------------------------------------------------------------------- 1. names

BAD_SLUGS = ["../../x", "..", ".hidden", "a/b", "a b", "-x", "x\ny", "é", "a" * 64, ""]


@pytest.mark.parametrize("value", BAD_SLUGS)
def test_project_is_a_slug(tmp_path: Path, value: str) -> None:
    message = error(tmp_path, {"project": value})
    assert "project: " in message
    assert ("at most 63 characters" if len(value) == 64 else "letters, digits") in message


@pytest.mark.parametrize("value", ["../x", "a/b", "my host", "a" * 64])
def test_instance_and_environment_names_are_slugs(tmp_path: Path, value: str) -> None:
    assert "instances[1].name: " in error(tmp_path, {"instances": [{"cpus": 1}, {"cpus": 1, "name": value}]})
    assert "environments[0].name: " in error(tmp_path, {"environments": [{"name": value}]})


def test_longest_slugs_are_accepted(tmp_path: Path) -> None:
    name = "a" * 63
    config = load_config(write(tmp_path, {"project": name, "instances": [{"cpus": 1, "name": f"v1.2_{name[5:]}"}]}))
    assert config.project == name and config.instances[0].name == f"v1.2_{name[5:]}"


BAD_JOB_NAMES = [
    ("/abs/path", "no '/'"),
    ("../../x", "no '/'"),
    ("a\\b", "no '/' or '\\'"),
    ("[/bold]", "no '/'"),  # a results folder "[" holding "bold]": markup without a slash is fine, see below
    (".", "'.' and '..' are not names"),
    ("..", "'.' and '..' are not names"),
    ("a\nb", "control character (U+000A)"),
    ("a\tb", "control character (U+0009)"),
    ("a\x00b", "control character (U+0000)"),
    ("a\x7fb", "control character (U+007F)"),
    ("a\x9bb", "control character (U+009B)"),
    ("evil\u202etxt.exe", "control character (U+202E)"),  # right-to-left override (Cf)
    ("a\u2028b", "control character (U+2028)"),  # line separator (Zl)
    (" x", "leading or trailing whitespace"),
    ("x ", "leading or trailing whitespace"),
    ("   ", "empty"),
    ("-rf", "must not start with '-'"),
    ("x" * 129, "at most 128 characters"),
]


@pytest.mark.parametrize(("name", "problem"), BAD_JOB_NAMES, ids=[repr(n[0])[:20] for n in BAD_JOB_NAMES])
def test_job_name_is_one_safe_path_component(tmp_path: Path, name: str, problem: str) -> None:
    message = error(tmp_path, {"jobs": [{"run_command": "true"}, {"run_command": "true", "name": name}]})
    assert "jobs[1].name: " in message and problem in message, message


def test_printable_job_names_are_kept_as_written(tmp_path: Path) -> None:
    names = ["[bold]", "[red on white]x[not closed", "naïve résumé 2", "a b", "v1.2_final", "x" * 128, "日本語"]
    jobs = [{"run_command": "true", "name": name} for name in names]
    assert [s.name for s in jobs_of(tmp_path, {"jobs": jobs})] == names


def test_names_derived_from_scripts_are_already_safe(tmp_path: Path) -> None:
    files = {"-weird name [x].py": "print()\n"}
    specs_ = jobs_of(tmp_path, {"jobs": [{"run_script": "'-weird name [x].py'"}]}, files)
    assert specs_[0].name == "weird-name-x"


# ---------------------------------------------------------------------------------------------- 2. unique job names


def test_a_name_made_by_repeat_collides_with_an_explicit_name(tmp_path: Path) -> None:
    jobs = [{"run_command": "true", "name": "a", "repeat": 2}, {"run_command": "true", "name": "a-1"}]
    message = error(tmp_path, {"jobs": jobs})
    assert message.endswith(": jobs[1].name: 'a-1' is also the name of run 1 of jobs[0] (repeat)"), message


def test_an_explicit_name_collides_with_a_later_repeat(tmp_path: Path) -> None:
    jobs = [{"run_command": "true", "name": "a-2"}, {"run_command": "true", "name": "a", "repeat": 3}]
    message = error(tmp_path, {"jobs": jobs})
    assert message.endswith(": jobs[1].name: 'a-2' (run 2) is also the name of jobs[0]"), message


def test_two_jobs_with_the_same_explicit_name(tmp_path: Path) -> None:
    jobs = [{"run_command": "true", "name": "x"}, {"run_command": "false"}, {"run_command": "true", "name": "x"}]
    message = error(tmp_path, {"jobs": jobs})
    assert message.endswith(": jobs[2].name: duplicate job name 'x' (also the name of jobs[0])"), message


def test_automatic_names_are_still_numbered(tmp_path: Path) -> None:
    jobs = [{"run_command": "echo a"}, {"run_command": "echo b", "repeat": 2}, {"run_script": "analyse.py"}]
    assert [s.name for s in jobs_of(tmp_path, {"jobs": jobs})] == ["echo-1", "echo-2", "echo-3", "analyse"]


def test_an_automatic_name_that_collides_asks_for_a_name(tmp_path: Path) -> None:
    jobs = [{"run_script": "a.py", "repeat": 2}, {"run_script": "a-1.py"}]
    message = error(tmp_path, {"jobs": jobs}, {"a.py": "", "a-1.py": ""})
    assert "jobs[1]: the name taken from its script or command, 'a-1' is also the name of run 1 of jobs[0]" in message
    assert message.endswith("give the job a `name`"), message


def test_an_explicit_name_shared_with_an_automatic_one_is_numbered(tmp_path: Path) -> None:
    jobs = [{"run_command": "true", "name": "analyse"}, {"run_script": "analyse.py"}]
    assert [s.name for s in jobs_of(tmp_path, {"jobs": jobs})] == ["analyse-1", "analyse-2"]
    jobs.append({"run_command": "true", "name": "analyse-2"})
    message = error(tmp_path, {"jobs": jobs})
    assert "jobs[2].name: 'analyse-2' is also the name of numbered, as several jobs are named 'analyse'" in message


# ---------------------------------------------------------------------------------------------- 3. unique host names


def test_an_unnamed_instance_takes_a_named_ones_host_name(tmp_path: Path) -> None:
    message = error(tmp_path, {"instances": [{"cpus": 1, "name": "local-1"}, {"cpus": 1}]})
    assert message.endswith(": instances[1]: host name 'local-1' is also used by instances[0]"), message


def test_copies_of_an_instance_take_a_named_ones_host_name(tmp_path: Path) -> None:
    message = error(tmp_path, {"instances": [{"cpus": 1, "name": "x", "number": 2}, {"cpus": 1, "name": "x.1"}]})
    assert message.endswith(": instances[1]: host name 'x.1' is also used by instances[0]"), message


def test_aws_host_names_are_checked_too(tmp_path: Path) -> None:
    instances = [{"provider": "local", "cpus": 1, "name": "aws-1"}, {"provider": "aws", "type": "t3.micro"}]
    message = error(tmp_path, {"instances": instances})
    assert message.endswith(": instances[1]: host name 'aws-1' is also used by instances[0]"), message


def test_distinct_host_names_are_fine(tmp_path: Path) -> None:
    instances = [{"cpus": 1}, {"cpus": 1, "number": 2}, {"cpus": 1, "name": "local-0.0"}, {"cpus": 1, "name": "b"}]
    assert len(load_config(write(tmp_path, {"instances": instances})).instances) == 4


# ---------------------------------------------------------------------------------------------- 4. file names


@pytest.mark.parametrize("key", ["output_files", "upload_files", "input_files"])
@pytest.mark.parametrize("value", ["out\n.txt", "a\tb.txt", "nul\x00.txt", "esc\x1b[31m.txt"])
def test_file_names_have_no_control_characters(tmp_path: Path, key: str, value: str) -> None:
    message = error(tmp_path, one_job(**{key: [value]}))
    assert f"jobs[0].{key}: {value!r}: a file name contains a control character (U+" in message, message


@pytest.mark.parametrize("value", ["analyse.py\x1b", "analyse.py 1\x002", "ana\x07lyse.py"])
def test_script_line_has_no_control_characters(tmp_path: Path, value: str) -> None:
    message = error(tmp_path, {"jobs": [{"run_script": value}]})
    assert "jobs[0].run_script: " in message and ("control character" in message or "NUL" in message), message


def test_script_arguments_may_be_separated_by_tabs_and_newlines(tmp_path: Path) -> None:
    (spec,) = jobs_of(tmp_path, {"jobs": [{"run_script": "analyse.py\t1\n2\n"}]})
    assert spec.command == "python3 analyse.py 1 2"


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (one_job(run_command="echo a\x00b"), "jobs[0].run_command"),
        ({"jobs": [{"run_command": "x"}, {"run_command": "echo", "args": ["ok", "b\x00"]}]}, "jobs[1].args"),
        ({"environments": [{"name": "e", "command": "echo\x00 hi"}]}, "environments[0].command"),
    ],
)
def test_commands_have_no_nul_bytes(tmp_path: Path, config: dict[str, Any], field: str) -> None:
    assert f"{field}: contains a NUL byte" in error(tmp_path, config)


def test_an_uploaded_link_keeps_its_own_name(tmp_path: Path) -> None:
    root, outside = tmp_path / "proj", tmp_path / "elsewhere"
    (outside / "store").mkdir(parents=True)
    (outside / "store" / "target-v7.csv").write_text("1,2\n")
    (outside / "far.csv").write_text("3,4\n")
    root.mkdir()
    (root / "data").mkdir()
    (root / "data" / "real.csv").write_text("5,6\n")
    (root / "link.csv").symlink_to(root / "data" / "real.csv")
    (root / "ext").symlink_to(outside / "store")  # a linked directory under the config's directory
    (outside / "far-link.csv").symlink_to(outside / "far.csv")
    uploads = ["link.csv", "ext/target-v7.csv", str(outside / "far-link.csv"), "data/../data/real.csv"]
    (spec,) = jobs_of(root, one_job(upload_files=uploads))
    assert [f.rel for f in spec.files] == ["link.csv", "ext/target-v7.csv", "far-link.csv", "data/real.csv"]
    digests = {f.rel: f.sha256 for f in spec.files}
    assert digests["link.csv"] == digests["data/real.csv"]  # the content is read through the link
    assert spec.files[2].local == str(outside / "far.csv")


def test_two_uploads_landing_on_one_name(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "data.csv").write_text(folder)
    message = error(root, one_job(upload_files=["../a/data.csv"], input_files=["../b/data.csv"]))
    assert (
        "jobs[0].input_files: '../b/data.csv' lands on 'data.csv' in the run directory, as does '../a/data.csv' "
        "(jobs[0].upload_files)" in message
    ), message


def test_an_upload_landing_on_the_scripts_name(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    (tmp_path / "analyse.py").write_text("print('other')\n")
    message = error(root, {"jobs": [{"run_script": "analyse.py", "upload_files": ["../analyse.py"]}]})
    assert "jobs[0].upload_files: '../analyse.py' lands on 'analyse.py'" in message
    assert "(jobs[0].run_script)" in message


def test_the_same_file_twice_and_an_output_named_like_an_upload_are_fine(tmp_path: Path) -> None:
    config = one_job(upload_files=["data/input.csv"], input_files=["data/input.csv"], output_files=["data/input.csv"])
    (spec,) = jobs_of(tmp_path, config)
    assert spec.outputs == ["data/input.csv"]


# ---------------------------------------------------------------------------------------------- 5. numbers

OUT_OF_RANGE: list[tuple[str, dict[str, Any], str]] = [
    ("poll_interval", {"poll_interval": 0.01}, "greater than or equal to 0.05"),
    ("poll_interval", {"poll_interval": 3601}, "less than or equal to 3600"),
    ("poll_interval", {"poll_interval": float("inf")}, "finite number"),
    ("poll_interval", {"poll_interval": float("nan")}, "finite number"),
    ("lost_after", {"lost_after": 0.5}, "greater than or equal to 1"),
    ("lost_after", {"lost_after": 86401}, "less than or equal to 86400"),
    ("lost_after", {"lost_after": float("inf")}, "finite number"),
    ("lost_after", {"lost_after": 5, "poll_interval": 10}, "5 s must be longer than poll_interval (10 s)"),
    ("lost_after", {"lost_after": 10, "poll_interval": 10}, "must be longer than poll_interval"),
    ("idle_minutes", {"idle_minutes": 10081}, "less than or equal to 10080"),
    ("idle_minutes", {"idle_minutes": float("inf")}, "finite number"),
    ("instances[0].number", {"instances": [{"cpus": 1, "number": 1001}]}, "less than or equal to 1000"),
    ("instances[0].cpus", {"instances": [{"cpus": 100_001}]}, "less than or equal to 100000"),
    ("instances[0].max_bid", {"instances": [{"cpus": 1, "max_bid": 1001}]}, "less than or equal to 1000"),
    ("instances[0].max_bid", {"instances": [{"cpus": 1, "max_bid": "inf"}]}, "finite number"),
    ("instances[0].max_bid", {"instances": [{"cpus": 1, "max_bid": float("nan")}]}, "finite number"),
    ("instances[0].eco_life", {"instances": [{"cpus": 1, "eco_life": float("inf")}]}, "finite number"),
    ("instances[0].disk_size", {"instances": [{"cpus": 1, "disk_size": 65537}]}, "less than or equal to 65536"),
    ("jobs[0].repeat", one_job(repeat=100_001), "less than or equal to 100000"),
    ("jobs[0].cpus_req", one_job(cpus_req=100_001), "less than or equal to 100000"),
    ("jobs[0].max_retries", one_job(max_retries=101), "less than or equal to 100"),
    ("jobs[0].timeout", one_job(timeout=30 * 86400 + 1), "less than or equal to 2592000"),
    ("jobs[0].timeout", one_job(timeout=float("inf")), "finite number"),
    ("jobs[0].expected_duration", one_job(expected_duration=float("nan")), "finite number"),
    ("jobs[0].expected_duration", one_job(expected_duration=1e12), "less than or equal to 2592000"),
]


@pytest.mark.parametrize(("field", "config", "problem"), OUT_OF_RANGE, ids=[f"{c[0]}-{c[2]}" for c in OUT_OF_RANGE])
def test_numbers_are_finite_and_bounded(tmp_path: Path, field: str, config: dict[str, Any], problem: str) -> None:
    message = error(tmp_path, config)
    assert f": {field}: " in message and problem in message, message


def test_nan_and_infinity_in_json(tmp_path: Path) -> None:
    text = '{"poll_interval": NaN, "jobs": [{"run_command": "x", "timeout": Infinity}]}'
    path = write(tmp_path, text, name="batch.json")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "poll_interval: Input should be a finite number" in str(info.value)
    assert "jobs[0].timeout: Input should be a finite number" in str(info.value)


def test_bounds_themselves_are_accepted(tmp_path: Path) -> None:
    config = {
        "poll_interval": 3600,
        "lost_after": 86400,
        "idle_minutes": 10080,
        "instances": [{"cpus": 100_000, "number": 2}],
        "jobs": [{"run_command": "x", "repeat": 3, "cpus_req": 100_000, "max_retries": 100, "timeout": 2592000}],
    }
    assert len(jobs_of(tmp_path, config)) == 3


def test_total_runs_are_bounded_before_expansion(tmp_path: Path) -> None:
    jobs = [{"run_command": f"echo {i}", "repeat": 100_000} for i in range(11)]
    started = time.monotonic()
    message = error(tmp_path, {"jobs": jobs})
    assert time.monotonic() - started < 1.0
    assert f"jobs: 1100000 runs in all (matrix points times `repeat`), more than the limit of {MAX_JOB_RUNS}" in message


def test_expand_jobs_bounds_jobs_given_separately(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, one_job()))
    many = [config.jobs[0].model_copy(update={"repeat": 100_000}) for _ in range(11)]
    with pytest.raises(ConfigError, match=r"jobs: 1100000 runs in all"):
        expand_jobs(config, many)


@pytest.mark.parametrize(
    ("config", "field"),
    [(one_job(repeat=100_000_000), "jobs[0].repeat"), ({"instances": [{"number": 10_000_000}]}, "instances[0].number")],
)
def test_huge_counts_fail_fast(tmp_path: Path, config: dict[str, Any], field: str) -> None:
    started = time.monotonic()
    message = error(tmp_path, config)
    assert time.monotonic() - started < 1.0
    assert f"{field}: Input should be less than or equal to" in message


# ---------------------------------------------------------------------------------------------- 6. parsing bounds

DEEP = 20_000


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("batch.yaml", "jobs: " + "[" * DEEP + "]" * DEEP + "\n"),
        ("batch.json", '{"jobs": ' + "[" * DEEP + "]" * DEEP + "}"),
        ("batch.toml", "jobs = " + "[" * DEEP + "]" * DEEP + "\n"),
        ("batch.yaml", "jobs:\n" + "".join("  " * i + "- \n" for i in range(1, 200))),  # block style
        ("batch.json", '{"jobs": ' + "[" * (MAX_NESTING + 5) + "]" * (MAX_NESTING + 5) + "}"),  # parses, too deep
        ("batch.yaml", "jobs: &loop [*loop]\n"),  # a list that contains itself
    ],
    ids=["yaml", "json", "toml", "yaml-block", "json-moderate", "yaml-cycle"],
)
def test_deep_nesting_is_one_error(tmp_path: Path, name: str, text: str) -> None:
    message = error(tmp_path, text, name=name)
    assert message.endswith(f": nesting deeper than {MAX_NESTING} levels (lists and mappings inside each other)")


def test_nesting_in_an_executed_python_config(tmp_path: Path) -> None:
    path = write(tmp_path, "config = {'jobs': []}\nconfig['instances'] = [config]\n", name="batch.py")
    with pytest.raises(ConfigError, match=f"nesting deeper than {MAX_NESTING} levels"):
        load_config(path, allow_exec=True)


def test_model_validation_cannot_overflow_the_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def overflow(*args: Any, **kwargs: Any) -> BatchConfig:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(BatchConfig, "model_validate", overflow)
    assert "nesting deeper than" in error(tmp_path, one_job())


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("batch.yaml", "jobs: [{run_command: x, repeat: " + "1" * 5000 + "}]\n", "a number with too many digits"),
        ("batch.json", '{"poll_interval": ' + "1" * 5000 + "}", "a number with too many digits"),
        ("batch.toml", "poll_interval = " + "1" * 5000 + "\n", "a number with too many digits"),
        ("batch.py", "config = {'poll_interval': " + "1" * 5000 + "}\n", "not valid Python: Exceeds the limit"),
    ],
    ids=["yaml", "json", "toml", "py"],
)
def test_numbers_with_too_many_digits(tmp_path: Path, name: str, text: str, problem: str) -> None:
    assert problem in error(tmp_path, text, name=name)


def test_long_numbers_that_parse_are_named_briefly(tmp_path: Path) -> None:
    message = error(tmp_path, "jobs: [{run_command: x, repeat: " + "9" * 4000 + "}]\n")
    assert "jobs[0].repeat: Input should be less than or equal to 100000 (got 99999" in message
    assert len(message) < 300


def test_a_huge_config_file_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "batch.yaml"
    with path.open("wb") as fh:
        fh.truncate(MAX_CONFIG_BYTES + 1)  # sparse: no 50 MiB written
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: 50 MiB is too large for a config file (the limit is 50 MiB); " + (
        "list data in files the jobs upload instead"
    )


# ---------------------------------------------------------------------------------------------- 7. unreadable files


def _refuse(monkeypatch: pytest.MonkeyPatch, file_name: str) -> None:
    """Opening ``file_name`` fails as chmod 000 would (which does not stop root, who runs these tests in CI)."""
    real_open = pathlib.Path.open

    def open_(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self.name == file_name:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", open_)


@pytest.mark.parametrize(
    ("config", "value", "field"),
    [
        (one_job(upload_files=["data/input.csv"]), "data/input.csv", "jobs[0].upload_files"),
        (one_job(input_files=["data/input.csv"]), "data/input.csv", "jobs[0].input_files"),
        ({"jobs": [{"run_script": "analyse.py 1"}]}, "analyse.py", "jobs[0].run_script"),
        ({"environments": [{"env_pypi": "requirements.txt"}]}, "requirements.txt", "environments[0].env_pypi"),
        ({"environments": [{"command": "setup.sh"}]}, "setup.sh", "environments[0].command"),
    ],
)
def test_a_file_that_cannot_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: dict[str, Any], value: str, field: str
) -> None:
    path = write(tmp_path, config)
    _refuse(monkeypatch, Path(value).name)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: {field}: cannot read {value}: Permission denied"


def test_a_file_that_fails_while_it_is_hashed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, one_job(upload_files=["data/input.csv"]))

    def failing(file: Path) -> str:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(specs, "file_digest", failing)
    with pytest.raises(ConfigError, match=r"jobs\[0\]\.upload_files: cannot read data/input.csv: Input/output error"):
        load_config(path)


def test_a_config_file_that_cannot_be_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, one_job())
    _refuse(monkeypatch, "batch.yaml")
    with pytest.raises(ConfigError, match=r"batch.yaml: cannot read the config file: Permission denied"):
        load_config(path)


def test_a_requirements_file_that_is_not_text(tmp_path: Path) -> None:
    path = write(tmp_path, {"environments": [{"env_pypi": "requirements.txt"}]})
    (tmp_path / "requirements.txt").write_bytes(b"numpy\n\xff\xfe\n")
    with pytest.raises(ConfigError, match=r"environments\[0\]\.env_pypi: requirements.txt is not a UTF-8 text file"):
        load_config(path)


# ---------------------------------------------------------------------------------------------- 8. ssh settings


def _blob(*fields: bytes) -> str:
    return base64.b64encode(b"".join(len(f).to_bytes(4, "big") + f for f in fields)).decode()


ED25519 = f"ssh-ed25519 {_blob(b'ssh-ed25519', bytes(32))} host-0"


def ssh(**inst: Any) -> dict[str, Any]:
    return {"instances": [{"provider": "ssh", "host": "lab1", "cpus": 1, **inst}]}


@pytest.mark.parametrize(
    ("host_key", "problem"),
    [
        ("AAAAC3NzaC1lZDI1NTE5", "expected an OpenSSH public key line"),
        ("ssh-foo AAAA", "unknown key type 'ssh-foo'"),
        ("ssh-ed25519 not*base64!", "not valid base64"),
        ("ssh-ed25519 AAAA====", "not a ssh-ed25519 key"),
        (f"ssh-rsa {_blob(b'ssh-ed25519', bytes(32))}", "not a ssh-rsa key"),
        (f"ssh-ed25519 {base64.b64encode(b'xy').decode()}", "not a ssh-ed25519 key"),
        (f"lab1 {ED25519}", "unknown key type 'lab1'"),  # a known_hosts line, host name first
    ],
)
def test_host_key_must_be_a_public_key_line(tmp_path: Path, host_key: str, problem: str) -> None:
    message = error(tmp_path, ssh(host_key=host_key))
    assert "instances[0].host_key: " in message and problem in message, message


def test_good_host_keys_are_accepted(tmp_path: Path) -> None:
    for key in (ED25519, f"ecdsa-sha2-nistp256 {_blob(b'ecdsa-sha2-nistp256', b'nistp256', bytes(65))}"):
        assert load_config(write(tmp_path, ssh(host_key=key))).instances[0].host_key == key


def test_host_key_contradicts_accept_new_host_key(tmp_path: Path) -> None:
    message = error(tmp_path, ssh(host_key=ED25519, accept_new_host_key=True))
    assert "instances[0].accept_new_host_key: contradicts host_key" in message


def test_missing_key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    message = error(tmp_path / "proj", ssh(key_file="~/.ssh/no-such-key"))
    assert "instances[0].key_file: file not found: ~/.ssh/no-such-key (looked for " in message
    assert os.path.expanduser("~/.ssh/no-such-key") in message


def test_key_file_relative_to_the_config_but_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    message = error(tmp_path / "proj", ssh(key_file="keys/id"), {"keys/id": "private\n"})
    assert "instances[0].key_file: file not found: keys/id" in message
    assert "it exists relative to the config's directory" in message and "absolute or ~/ path" in message


def test_key_file_found_as_the_transport_finds_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home" / ".ssh").mkdir(parents=True)
    (tmp_path / "home" / ".ssh" / "id").write_text("private\n")
    assert load_config(write(tmp_path, ssh(key_file="~/.ssh/id"))).instances[0].key_file == "~/.ssh/id"
    monkeypatch.chdir(tmp_path / "home")
    assert load_config(write(tmp_path, ssh(key_file=".ssh/id"))).instances[0].key_file == ".ssh/id"


def test_key_file_of_a_non_ssh_instance_is_only_noted(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, {"instances": [{"cpus": 1, "key_file": "nope"}]}))
    assert config.notes == ["instances[0]: key_file ignored: not used by the local provider"]


@pytest.mark.parametrize("remote_dir", ["~", "~/", "/", "//", "", "  ", ".", "./", "~/.", "~/x/../..", "a/../b"])
def test_remote_dir_must_be_a_dedicated_directory(tmp_path: Path, remote_dir: str) -> None:
    message = error(tmp_path, ssh(remote_dir=remote_dir))
    assert "instances[0].remote_dir: must be a dedicated directory, e.g. ~/.cloudsend" in message, message


def test_remote_dir_has_no_control_characters(tmp_path: Path) -> None:
    assert "instances[0].remote_dir: contains a control character (U+000A)" in error(
        tmp_path, ssh(remote_dir="~/.cloudsend\n")
    )


def test_good_remote_dirs(tmp_path: Path) -> None:
    for remote_dir in ("~/.cloudsend", "/srv/cloudsend", ".cloudsend", "~/work/batch-1/"):
        assert load_config(write(tmp_path, ssh(remote_dir=remote_dir))).instances[0].remote_dir == remote_dir


# ---------------------------------------------------------------------------------------------- the schema


def test_schema_tells_editors_about_names_and_bounds() -> None:
    from cloudsend_prefect.schema import config_schema

    schema = config_schema()
    assert {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]*$", "maxLength": 63} in schema["properties"][
        "project"
    ]["anyOf"]
    assert schema["$defs"]["InstanceType"]["properties"]["name"]["pattern"] == "^[A-Za-z0-9][A-Za-z0-9_.-]*$"
    assert schema["$defs"]["Job"]["properties"]["name"]["maxLength"] == 128
    assert {"maximum": 100000, "minimum": 1, "type": "integer"} in schema["$defs"]["Job"]["properties"]["repeat"][
        "anyOf"
    ]
