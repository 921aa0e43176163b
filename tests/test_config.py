"""Config loading: every malformed file gives one clear error naming the file and the field; good files load.

Covers YAML, JSON, TOML and the predecessor's Python files (read without running them), the predecessor's
keys (accepted, with notes saying why they are ignored) and the expansion of jobs into command lines.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from cloudsend_prefect.config import IGNORED_GLOBAL_KEYS, BatchConfig, InstanceType, Job
from cloudsend_prefect.errors import ConfigError
from cloudsend_prefect.resolve import load_config, resolve_batch
from cloudsend_prefect.specs import expand_jobs

MINIMAL_YAML = """\
project: demo
provider: local
instances: [{cpus: 4}]
environments: [{name: sci, env_pypi: [numpy]}]
jobs:
  - {run_script: analyse.py 1 10, env_name: sci, cpus_req: 1,
     upload_files: [data/input.csv], output_files: [result.txt], repeat: 2}
  - {run_command: "echo done > done.txt", output_files: done.txt}
"""

MINIMAL_JSON = json.dumps(
    {
        "project": "demo",
        "provider": "local",
        "instances": [{"cpus": 4}],
        "environments": [{"name": "sci", "env_pypi": ["numpy"]}],
        "jobs": [
            {
                "run_script": "analyse.py 1 10",
                "env_name": "sci",
                "cpus_req": 1,
                "upload_files": ["data/input.csv"],
                "output_files": ["result.txt"],
                "repeat": 2,
            },
            {"run_command": "echo done > done.txt", "output_files": "done.txt"},
        ],
    }
)

MINIMAL_TOML = """\
project = "demo"
provider = "local"

[[instances]]
cpus = 4

[[environments]]
name = "sci"
env_pypi = ["numpy"]

[[jobs]]
run_script = "analyse.py 1 10"
env_name = "sci"
cpus_req = 1
upload_files = ["data/input.csv"]
output_files = ["result.txt"]
repeat = 2

[[jobs]]
run_command = "echo done > done.txt"
output_files = "done.txt"
"""

# The predecessor's config.example.py, with a module-level side effect that must not happen when it is read.
PREDECESSOR_PY = """\
import pathlib

pathlib.Path(__file__).with_name("side_effect.txt").write_text("the config file was executed")

config = {
    'project': 'test',
    'dev': False,
    'debug': 1,
    'maestro': 'local',
    'auto_stop': True,
    'provider': 'local',
    'job_assign': None,
    'recover': True,
    'print_deploy': False,
    'mutualize_uploads': True,
    'instances': [
        {
            'region': None, 'cloud_id': None, 'img_id': None, 'img_username': 'ubuntu',
            'type': 't3.micro', 'cpus': 2, 'gpu': None, 'disk_size': None, 'disk_type': None,
            'eco': True, 'max_bid': '0.01', 'number': 1, 'explode': False, 'provider': 'local',
        }
    ],
    'environments': [
        {
            'name': 'env1', 'command': None, 'env_aptget': ['openssh-client'], 'env_conda': None,
            'env_conda_channels': None, 'env_pypi': ['numpy'], 'env_julia': None,
        }
    ],
    'jobs': [
        {
            'env_name': 'env1', 'cpus_req': 1, 'run_script': 'run_remote.py 1 10', 'run_command': None,
            'upload_files': ['uploaded.txt'], 'input_files': 'input.dat', 'output_files': 'output.dat',
            'repeat': 2,
        },
        {
            'env_name': None, 'cpus_req': None, 'run_script': 'run_remote.py 2 12', 'run_command': None,
            'upload_files': None, 'input_files': 'input.dat', 'output_files': 'output.dat',
        },
    ],
}
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A directory with the files the configs below name."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "input.csv").write_text("a,b\n1,2\n")
    (tmp_path / "analyse.py").write_text("import sys\nprint(sys.argv)\n")
    (tmp_path / "run_remote.py").write_text("print('remote')\n")
    (tmp_path / "uploaded.txt").write_text("uploaded\n")
    (tmp_path / "input.dat").write_text("42\n")
    (tmp_path / "requirements.txt").write_text("numpy\n")
    (tmp_path / "setup.sh").write_text("echo setup\n")
    (tmp_path / "subdir").mkdir()
    return tmp_path


def _yaml(body: str) -> tuple[str, str]:
    return "batch.yaml", textwrap.dedent(body)


# (id, (file name, file content or None for "no file"), substrings the error message must contain)
BAD_CONFIGS: list[tuple[str, tuple[str, str | None], list[str]]] = [
    # unknown keys, at every level and in every format
    ("unknown-global-key", _yaml("project: x\nprojct: y\n"), ["projct: unknown key"]),
    ("unknown-instance-key", _yaml("instances: [{cpus: 2, ram: 8}]\n"), ["instances[0].ram: unknown key"]),
    (
        "unknown-env-key",
        _yaml("environments: [{name: a, env_pip: [numpy]}]\n"),
        ["environments[0].env_pip: unknown key"],
    ),
    (
        "unknown-job-key",
        _yaml("jobs: [{run_command: x}, {run_command: y, cpu_req: 2}]\n"),
        ["jobs[1].cpu_req: unknown key"],
    ),
    (
        "unknown-job-key-json",
        ("batch.json", json.dumps({"jobs": [{"run_command": "x", "colour": "red"}]})),
        ["jobs[0].colour: unknown key"],
    ),
    (
        "unknown-job-key-toml",
        ("batch.toml", '[[jobs]]\nrun_command = "x"\nretries = 2\n'),
        ["jobs[0].retries: unknown key"],
    ),
    (
        "unknown-instance-key-py",
        ("batch.py", "config = {'instances': [{'cpus': 2, 'memory': 4}]}\n"),
        ["instances[0].memory: unknown key"],
    ),
    # bad types
    ("bad-type-cpus", _yaml("instances: [{cpus: four}]\n"), ["instances[0].cpus", "valid integer", "'four'"]),
    ("bad-type-fractional-cpus", _yaml("instances: [{cpus: 2.5}]\n"), ["instances[0].cpus", "fractional"]),
    ("bad-type-eco", _yaml("instances: [{eco: maybe}]\n"), ["instances[0].eco", "valid boolean"]),
    ("bad-type-max-bid", _yaml("instances: [{max_bid: cheap}]\n"), ["instances[0].max_bid", "USD per hour"]),
    (
        "bad-type-repeat-json",
        ("batch.json", json.dumps({"jobs": [{"run_command": "x", "repeat": "twice"}]})),
        ["jobs[0].repeat", "valid integer"],
    ),
    (
        "bad-type-uploads-mapping",
        _yaml("jobs: [{run_command: x, upload_files: {a: 1}}]\n"),
        ["jobs[0].upload_files", "valid list"],
    ),
    (
        "bad-type-env-pypi-toml",
        ("batch.toml", "[[environments]]\nenv_pypi = 5\n"),
        ["environments[0].env_pypi", "(got 5)"],
    ),
    ("bad-type-jobs-not-list", _yaml("jobs: run everything\n"), ["jobs: Input should be a valid list"]),
    ("bad-provider", _yaml("provider: azure\n"), ["provider:", "'local', 'ssh' or 'aws'", "'azure'"]),
    ("bad-maestro", _yaml("maestro: cloud\n"), ["maestro:", "'cloud'"]),
    ("bad-env-name", _yaml("environments: [{name: my env}]\n"), ["environments[0].name", "letters, digits"]),
    ("no-instances", _yaml("instances: []\n"), ["instances:", "at least 1"]),
    # negative / zero numbers
    (
        "zero-cpus-req",
        _yaml("jobs: [{run_command: x}, {run_command: y, cpus_req: 0}]\n"),
        ["jobs[1].cpus_req", "greater than or equal to 1", "(got 0)"],
    ),
    ("negative-repeat", _yaml("jobs: [{run_command: x, repeat: -1}]\n"), ["jobs[0].repeat", "(got -1)"]),
    ("zero-number", _yaml("instances: [{number: 0}]\n"), ["instances[0].number", "greater than or equal to 1"]),
    ("zero-cpus", _yaml("instances: [{cpus: 0}]\n"), ["instances[0].cpus", "greater than or equal to 1"]),
    ("negative-timeout", _yaml("jobs: [{run_command: x, timeout: -5}]\n"), ["jobs[0].timeout", "greater than 0"]),
    ("zero-poll-interval", ("batch.toml", "poll_interval = 0\n"), ["poll_interval", "greater than or equal to 0.05"]),
    ("negative-max-retries", _yaml("jobs: [{run_command: x, max_retries: -1}]\n"), ["jobs[0].max_retries"]),
    # links between the lists
    (
        "dangling-env-name",
        _yaml("environments: [{name: sci}]\njobs: [{run_command: x, env_name: nope}]\n"),
        ["jobs[0].env_name: no environment named 'nope'", "known: 'sci'"],
    ),
    (
        "dangling-env-name-no-envs",
        _yaml("jobs: [{run_command: x, env_name: sci}]\n"),
        ["jobs[0].env_name", "none defined"],
    ),
    (
        "two-unnamed-envs",
        _yaml("environments: [{env_pypi: [numpy]}, {env_pypi: [scipy]}]\n"),
        ["environments[0].name: required when there are several"],
    ),
    (
        "second-env-unnamed",
        _yaml("environments: [{name: a}, {env_pypi: [scipy]}]\n"),
        ["environments[1].name: required when there are several"],
    ),
    (
        "duplicate-env-names",
        _yaml("environments: [{name: sci}, {name: sci, env_pypi: [scipy]}]\n"),
        ["environments: duplicate name 'sci'"],
    ),
    (
        "job-fits-no-instance",
        _yaml("instances: [{cpus: 4}, {cpus: 2}]\njobs: [{run_command: x}, {run_command: y, cpus_req: 8}]\n"),
        ["jobs[1].cpus_req: 8 CPUs fit no instance (the largest has 4)"],
    ),
    ("ssh-without-host", _yaml("provider: ssh\ninstances: [{cpus: 2}]\n"), ["instances[0].host: required"]),
    (
        "ssh-instance-without-host",
        _yaml("instances: [{cpus: 2}, {provider: ssh, user: me}]\n"),
        ["instances[1].host: required for the ssh provider"],
    ),
    # files the config names
    (
        "missing-script",
        _yaml("jobs: [{run_script: missing.py 1 2}]\n"),
        ["jobs[0].run_script: file not found: missing.py"],
    ),
    (
        "script-is-a-directory",
        _yaml("jobs: [{run_script: subdir}]\n"),
        ["jobs[0].run_script: subdir is a directory"],
    ),
    (
        "unbalanced-quote-in-script",
        _yaml('jobs: [{run_script: "analyse.py \'unterminated"}]\n'),
        ["jobs[0].run_script: cannot split"],
    ),
    (
        "missing-upload",
        _yaml("jobs: [{run_command: x}, {run_script: analyse.py, upload_files: [data/input.csv, data/nope.csv]}]\n"),
        ["jobs[1].upload_files: file not found: data/nope.csv"],
    ),
    (
        "missing-input",
        _yaml("jobs: [{run_command: x, input_files: params.json}]\n"),
        ["jobs[0].input_files: file not found: params.json"],
    ),
    (
        "missing-requirements",
        _yaml("environments: [{name: a, env_pypi: reqs/requirements.txt}]\n"),
        ["environments[0].env_pypi: file not found: reqs/requirements.txt"],
    ),
    (
        "missing-conda-file",
        _yaml("environments: [{name: a}, {name: b, env_conda: environment.yml}]\n"),
        ["environments[1].env_conda: file not found: environment.yml"],
    ),
    (
        "missing-setup-script",
        _yaml("environments: [{name: a, command: install_julia.sh}]\n"),
        ["environments[0].command: file not found: install_julia.sh"],
    ),
    # exactly one of run_script / run_command
    (
        "both-script-and-command",
        _yaml("jobs: [{run_script: analyse.py, run_command: echo hi}]\n"),
        ["jobs[0]: give exactly one of run_script or run_command (both are set)"],
    ),
    (
        "neither-script-nor-command",
        _yaml("jobs: [{run_command: x}, {output_files: [a.txt]}]\n"),
        ["jobs[1]: give exactly one of run_script or run_command (neither is set)"],
    ),
    (
        "blank-script",
        _yaml("jobs: [{run_script: '   '}]\n"),
        ["jobs[0]: give exactly one of run_script or run_command (neither is set)"],
    ),
    # output paths
    (
        "absolute-output",
        _yaml("jobs: [{run_command: x, output_files: [/tmp/out.txt]}]\n"),
        ["jobs[0].output_files: '/tmp/out.txt' must be a relative path"],
    ),
    (
        "dotdot-output",
        _yaml("jobs: [{run_command: x, output_files: [ok.txt, ../out.txt]}]\n"),
        ["jobs[0].output_files: '../out.txt' must be a relative path"],
    ),
    # syntax and shape of the file
    ("invalid-yaml", _yaml("jobs: [{run_command: x}\nproject: [\n"), ["not valid YAML"]),
    ("invalid-json", ("batch.json", '{"jobs": [}'), ["not valid JSON"]),
    ("invalid-toml", ("batch.toml", "project = \n"), ["not valid TOML"]),
    ("top-level-list-yaml", _yaml("- run_command: x\n"), ["expected a mapping"]),
    ("top-level-string-json", ("batch.json", '"jobs"'), ["expected a mapping"]),
    ("empty-yaml", _yaml(""), ["expected a mapping"]),
    ("unknown-extension", ("batch.ini", "[jobs]\n"), ["unknown config format '.ini'"]),
    ("missing-file", ("nowhere.yaml", None), ["no such config file"]),
    ("not-utf8", ("batch.yaml", "project: caf\udce9\n"), ["not a UTF-8 text file"]),
    # the predecessor's Python files, read without running them
    (
        "py-config-not-literal",
        ("batch.py", "import os\nconfig = {'project': os.getenv('USER'), 'jobs': []}\n"),
        ["batch.py:2", "must be a literal dict", "allow_exec"],
    ),
    ("py-no-config", ("batch.py", "settings = {'project': 'x'}\n"), ["no `config = {...}` assignment found"]),
    ("py-syntax-error", ("batch.py", "config = {'project': 'x'\n"), ["not valid Python"]),
    (
        "py-config-modified-later",
        ("batch.py", "config = {'project': 'x'}\nconfig['jobs'] = [{'run_command': 'x'}]\n"),
        ["batch.py:2", "`config` is modified", "allow_exec"],
    ),
    (
        "py-config-updated-by-method",
        ("batch.py", "config = {'project': 'x', 'jobs': []}\nconfig['jobs'].append({'run_command': 'x'})\n"),
        ["batch.py:2", ".append()"],
    ),
    ("py-config-not-mapping", ("batch.py", "config = [1, 2]\n"), ["expected a mapping"]),
    ("py-bad-type", ("batch.py", "config = {'auto_stop': 'sometimes'}\n"), ["auto_stop", "valid boolean"]),
]


@pytest.mark.parametrize(("name_text", "expected"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_one_clear_error(project: Path, name_text: tuple[str, str | None], expected: list[str]) -> None:
    name, text = name_text
    path = project / name
    if text is not None:
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(str(path)), message  # names the file...
    for part in expected:  # ...and the field and the problem
        assert part in message, f"{part!r} not in {message!r}"
    assert len(message.splitlines()) == 1, message  # one error, not a pydantic dump


def test_at_least_thirty_bad_configs_in_every_format() -> None:
    assert len(BAD_CONFIGS) >= 30
    assert {Path(c[1][0]).suffix for c in BAD_CONFIGS} >= {".yaml", ".json", ".toml", ".py"}


def test_file_paths_resolve_against_the_config_directory_with_a_hint(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The predecessor resolved paths against the working directory; say so when that is the mix-up."""
    (project / "conf").mkdir()
    path = project / "conf" / "batch.yaml"
    path.write_text("jobs: [{run_script: analyse.py}]\n")
    monkeypatch.chdir(project)
    with pytest.raises(ConfigError, match=r"jobs\[0\].run_script: file not found: analyse.py .*working directory"):
        load_config(path)
    path.write_text("jobs: [{run_script: ../analyse.py}]\n")
    assert expand_jobs(load_config(path))[0].command == "python3 analyse.py"


# ---------------------------------------------------------------------------------------------- good files


def test_minimal_example_loads_and_expands(project: Path) -> None:
    path = project / "batch.yaml"
    path.write_text(MINIMAL_YAML)
    config = load_config(path)
    assert config.project == "demo"
    assert config.notes == []
    assert config.base_dir == project.resolve()
    assert config.jobs[1].output_files == ["done.txt"]  # a string where a list is expected

    specs = expand_jobs(config)
    assert [s.name for s in specs] == ["analyse-1", "analyse-2", "echo"]
    assert [s.command for s in specs] == ["python3 analyse.py 1 10", "python3 analyse.py 1 10", "echo done > done.txt"]
    assert [s.outputs for s in specs] == [["result.txt"], ["result.txt"], ["done.txt"]]
    first, second, third = specs
    assert first.hash == second.hash and first.key != second.key
    assert {f.rel for f in first.files} == {"analyse.py", "data/input.csv"}
    assert first.env is not None and first.env.name == "sci"
    assert first.env.files == {"requirements.txt": "numpy\n"}
    assert third.env == first.env  # the only environment is the default one
    assert third.files == []
    assert [s.cpus for s in specs] == [1, 1, 1]


def test_command_lines_are_quoted(project: Path) -> None:
    (project / "my scripts").mkdir()
    (project / "my scripts" / "run it.jl").write_text("println(ARGS)\n")
    (project / "tool").write_text("#!/bin/sh\necho $@\n")
    path = project / "batch.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            jobs:
              - run_script: analyse.py "two words" 'it''s' $HOME
                args: ["a b", "$(rm -rf /)", ";"]
              - run_script: '"my scripts/run it.jl" 3'
              - run_script: tool --flag
              - run_command: echo "$HOME" | wc -c
                args: [x y]
            """
        )
    )
    specs = expand_jobs(load_config(path))
    assert specs[0].command == "python3 analyse.py 'two words' its '$HOME' 'a b' '$(rm -rf /)' ';'"
    assert specs[1].command == "julia 'my scripts/run it.jl' 3"
    assert specs[2].command == "./tool --flag"
    assert specs[2].files[0].executable
    assert specs[3].command == "echo \"$HOME\" | wc -c 'x y'"  # a command is shell, taken as written
    assert [s.name for s in specs] == ["analyse", "run-it", "tool", "echo"]


def test_unbalanced_quote_in_a_command_is_left_to_the_shell(project: Path) -> None:
    path = project / "batch.yaml"
    path.write_text('jobs: [{run_command: "echo \'oops"}]\n')
    assert expand_jobs(load_config(path))[0].name == "echo"


def test_json_and_toml_equivalents_load_to_the_same_model(project: Path) -> None:
    loaded = {}
    for suffix, text in ((".yaml", MINIMAL_YAML), (".json", MINIMAL_JSON), (".toml", MINIMAL_TOML)):
        path = project / f"batch{suffix}"
        path.write_text(text)
        config = load_config(path)
        loaded[suffix] = (config.model_dump(), [s.model_dump() for s in expand_jobs(config)])
    assert loaded[".yaml"] == loaded[".json"] == loaded[".toml"]


def test_str_to_list_coercion(project: Path) -> None:
    path = project / "batch.yaml"
    path.write_text(
        "environments: {name: a, env_aptget: 'git, curl', env_julia: Wavelets}\n"
        "jobs: {run_command: x, output_files: 'a.txt, b/c.txt', input_files: input.dat, upload_files: null}\n"
    )
    config = load_config(path)
    assert config.environments[0].env_aptget == ["git", "curl"]
    assert config.environments[0].env_julia == ["Wavelets"]
    job = config.jobs[0]  # a single mapping where a list is expected
    assert job.output_files == ["a.txt", "b/c.txt"]
    assert job.input_files == ["input.dat"]
    assert job.upload_files == []


@pytest.mark.parametrize("key", sorted(IGNORED_GLOBAL_KEYS))
def test_predecessor_global_keys_are_accepted_with_a_note(project: Path, key: str) -> None:
    path = project / "batch.yaml"
    path.write_text(f"{key}: true\njobs: [{{run_command: x}}]\n")
    notes = load_config(path).notes
    assert len(notes) == 1
    assert notes[0].startswith(f"'{key}' is ignored: ")
    assert len(notes[0]) > len(f"'{key}' is ignored: ") + 10  # ...says why


def test_the_retired_gpu_key_is_no_field_and_still_loads(project: Path) -> None:
    """`gpu` did nothing: it is not a field (nor in the block's form), yet a config or a block saved with it
    loads; the file's gets a note, `gpu: null` none."""
    assert "gpu" not in InstanceType.model_fields
    assert "gpu" not in InstanceType.model_validate({"cpus": 1, "gpu": "eg1.medium"}).model_fields_set
    path = project / "batch.yaml"
    path.write_text("instances: {cpus: 1, gpu: eg1.medium}\njobs: [{run_command: 'true'}]\n")
    assert [n for n in load_config(path).notes if "gpu" in n] == [
        "instances[0]: 'gpu' is ignored: AWS retired Elastic GPUs; choose a GPU instance type (g5.xlarge, ...) and "
        "give jobs `gpus_req`"
    ]
    path.write_text("instances: [{cpus: 1, gpu: null}]\njobs: [{run_command: 'true'}]\n")
    assert load_config(path).notes == []


def test_a_config_in_memory_runs_other_jobs_with_all_its_settings(project: Path) -> None:
    """resolve_batch(config, jobs): the config's every key but its jobs (`recover` too), the jobs validated
    against it, relative paths from its folder."""
    (project / "fit.py").write_text("print(1)\n")
    config = BatchConfig(recover=False, instances=[{"cpus": 2}], jobs=[Job(run_command="true")]).located(
        project, "batch.yaml"
    )
    batch = resolve_batch(config, [Job(run_script="fit.py {x}", matrix={"x": [1, 2]})])
    assert not batch.config.recover and batch.config.source == "batch.yaml"
    assert [job.command for job in batch.jobs] == ["python3 fit.py 1", "python3 fit.py 2"]
    with pytest.raises(ConfigError, match=r"batch.yaml: jobs\[0\].cpus_req: 3 CPUs fit no instance"):
        resolve_batch(config, [Job(run_command="true", cpus_req=3)])


def test_profile_and_maestro_notes(project: Path) -> None:
    path = project / "batch.yaml"
    path.write_text("profile: research\nmaestro: lambda\nprovider: local\n")
    notes = load_config(path).notes
    assert any(n.startswith("'profile' is ignored") and "aws" in n for n in notes), notes
    assert any("maestro 'lambda'" in n and "Prefect flow" in n for n in notes), notes
    path.write_text("maestro: remote\n")  # built: `cloudsend run` sends the batch to the controller
    assert not any("maestro" in n for n in load_config(path).notes)
    path.write_text("profile: research\nprovider: aws\ninstances: [{type: t3.micro}]\n")
    config = load_config(path)
    assert config.profile == "research"
    assert not any("profile" in n for n in config.notes)


def test_aws_keys_on_a_local_instance_are_noted(project: Path) -> None:
    path = project / "batch.yaml"
    path.write_text(
        "instances:\n"
        "  - {provider: local, cpus: 2, type: t3.micro, region: eu-west-1, eco: true, max_bid: '0.01',\n"
        "     img_username: ubuntu, explode: true, gpu: null, disk_size: null, number: 1}\n"
        "  - {provider: aws, type: t3.micro, host: lab1}\n"
    )
    notes = load_config(path).notes
    assert notes == [
        "instances[0]: eco, explode, img_username, max_bid, region, type ignored: not used by the local provider",
        "instances[1]: host ignored: not used by the aws provider",
    ]


def test_predecessor_python_file_is_read_without_running_it(project: Path) -> None:
    path = project / "config.example.py"
    path.write_text(PREDECESSOR_PY)
    config = load_config(path)
    assert not (project / "side_effect.txt").exists()

    assert config.project == "test"
    inst = config.instances[0]
    assert (inst.cpus, inst.max_bid, inst.eco, inst.type) == (2, 0.01, True, "t3.micro")
    env = config.environments[0]
    assert (env.name, env.env_aptget, env.env_pypi, env.env_conda) == ("env1", ["openssh-client"], ["numpy"], None)
    first, second = config.jobs
    assert (first.input_files, first.output_files, first.upload_files) == (
        ["input.dat"],
        ["output.dat"],
        ["uploaded.txt"],
    )
    assert second.cpus_req == 1 and second.repeat == 1 and second.upload_files == []  # None means the default
    notes = "\n".join(config.notes)
    for key in ("debug", "dev", "job_assign", "print_deploy", "mutualize_uploads"):
        assert f"'{key}' is ignored" in notes
    assert "instances[0]: eco, img_username, max_bid, type ignored: not used by the local provider" in notes

    specs = expand_jobs(config)
    assert [s.name for s in specs] == ["run_remote-1", "run_remote-2", "run_remote-3"]
    assert [s.command for s in specs] == ["python3 run_remote.py 1 10"] * 2 + ["python3 run_remote.py 2 12"]
    assert {f.rel for f in specs[0].files} == {"run_remote.py", "uploaded.txt", "input.dat"}
    assert specs[2].env == specs[0].env  # env_name None: the only environment

    same_in_yaml = project / "same.yaml"
    same_in_yaml.write_text(
        textwrap.dedent(
            """\
            project: test
            provider: local
            instances: [{provider: local, cpus: 2, type: t3.micro, img_username: ubuntu, eco: true, max_bid: 0.01}]
            environments: [{name: env1, env_aptget: [openssh-client], env_pypi: [numpy]}]
            jobs:
              - {env_name: env1, run_script: run_remote.py 1 10, upload_files: uploaded.txt,
                 input_files: input.dat, output_files: output.dat, repeat: 2}
              - {run_script: run_remote.py 2 12, input_files: input.dat, output_files: output.dat}
            """
        )
    )
    assert [s.hash for s in expand_jobs(load_config(same_in_yaml))] == [s.hash for s in specs]


def test_python_file_runs_only_with_allow_exec(project: Path) -> None:
    path = project / "dynamic.py"
    path.write_text(
        textwrap.dedent(
            """\
            import pathlib
            from datetime import timedelta

            pathlib.Path(__file__).with_name("side_effect.txt").write_text("ran")
            config = {
                'instances': [{'provider': 'aws', 'type': 't3.micro', 'eco': True, 'eco_life': timedelta(hours=2)}],
                'jobs': [{'run_command': 'echo %d' % n} for n in range(3)],
            }
            """
        )
    )
    with pytest.raises(ConfigError, match="must be a literal dict"):
        load_config(path)
    assert not (project / "side_effect.txt").exists()

    config = load_config(path, allow_exec=True)
    assert (project / "side_effect.txt").read_text() == "ran"
    assert config.instances[0].eco_life == 2.0
    assert [j.run_command for j in config.jobs] == ["echo 0", "echo 1", "echo 2"]


def test_allow_exec_errors_name_the_file(project: Path) -> None:
    path = project / "broken.py"
    path.write_text("raise RuntimeError('no credentials')\n")
    with pytest.raises(ConfigError, match=r"broken.py: running it as Python failed: RuntimeError: no credentials"):
        load_config(path, allow_exec=True)
    path.write_text("import sys\nsys.exit(3)\n")
    with pytest.raises(ConfigError, match="SystemExit"):
        load_config(path, allow_exec=True)
    path.write_text("settings = {}\n")
    with pytest.raises(ConfigError, match="defined no `config` variable"):
        load_config(path, allow_exec=True)


def test_python_file_may_read_config_after_defining_it(project: Path) -> None:
    path = project / "batch.py"
    path.write_text(
        "config: dict = {'project': 'annotated', 'jobs': [{'run_command': 'x'}]}\n"
        "if __name__ == '__main__':\n"
        "    print(config.get('project'), config['jobs'])\n"
    )
    assert load_config(path).project == "annotated"


def test_predecessor_none_means_default() -> None:
    config = BatchConfig.model_validate(
        {
            "project": None,
            "auto_stop": None,
            "instances": [{"number": None, "eco": None, "cpus": 2}],
            "jobs": [{"run_command": "x", "cpus_req": None, "repeat": None, "output_files": None}],
        }
    )
    assert (config.project, config.auto_stop) == ("cloudsend", True)
    assert (config.instances[0].number, config.instances[0].eco) == (1, False)
    assert (config.jobs[0].cpus_req, config.jobs[0].repeat, config.jobs[0].output_files) == (1, 1, [])


# ---------------------------------------------------------------------------------------------- JSON Schema

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_committed_schema_is_current() -> None:
    from cloudsend_prefect.schema import render

    committed = (REPO_ROOT / "cloudsend.schema.json").read_text()
    assert committed == render(), "regenerate: python -m cloudsend_prefect.schema > cloudsend.schema.json"


def test_schema_module_entry_prints_the_schema() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "cloudsend_prefect.schema"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert json.loads(out) == json.loads((REPO_ROOT / "cloudsend.schema.json").read_text())


def test_schema_structure() -> None:
    from cloudsend_prefect.schema import config_schema

    schema = config_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "cloudsend batch config"
    assert schema["additionalProperties"] is False
    assert {"project", "provider", "instances", "environments", "jobs", *IGNORED_GLOBAL_KEYS} <= set(
        schema["properties"]
    )
    assert schema["properties"]["debug"]["deprecated"] is True
    job = schema["$defs"]["Job"]
    assert {"run_script", "run_command", "upload_files", "input_files", "output_files", "cpus_req", "env_name"} <= set(
        job["properties"]
    )
    assert [alt["required"] for alt in job["oneOf"]] == [["run_script"], ["run_command"]]
    assert job["additionalProperties"] is False
    assert {"cpus", "type", "host", "number", "explode"} <= set(schema["$defs"]["InstanceType"]["properties"])
    assert {"name", "env_pypi", "env_conda", "command"} <= set(schema["$defs"]["Environment"]["properties"])


def _predecessor_dict() -> dict[str, object]:
    import ast

    tree = ast.parse(PREDECESSOR_PY)
    node = next(n for n in tree.body if isinstance(n, ast.Assign))
    value = ast.literal_eval(node.value)
    assert isinstance(value, dict)
    return value


def test_schema_accepts_what_the_loader_accepts_and_rejects_the_rest() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    import yaml

    from cloudsend_prefect.schema import config_schema

    validator_cls = jsonschema.Draft202012Validator
    validator_cls.check_schema(config_schema())
    validator = validator_cls(config_schema())

    good = [
        yaml.safe_load(MINIMAL_YAML),
        json.loads(MINIMAL_JSON),
        _predecessor_dict(),
        {"jobs": {"run_command": "x", "output_files": "a.txt, b.txt", "cpus_req": None}},
        {"instances": [{"provider": "ssh", "host": "lab1", "max_bid": "0.01"}], "environments": {"env_aptget": "git"}},
    ]
    for data in good:
        assert list(validator.iter_errors(data)) == [], data

    bad = [
        {"projct": "x"},
        {"instances": [{"cpus": 2, "ram": 8}]},
        {"instances": [{"cpus": 0}]},
        {"provider": "azure"},
        {"environments": [{"env_pip": ["numpy"]}]},
        {"jobs": [{"run_command": "x", "cpu_req": 2}]},
        {"jobs": [{"run_command": "x", "run_script": "a.py"}]},
        {"jobs": [{"output_files": ["a.txt"]}]},
        {"jobs": [{"run_command": "x", "repeat": "twice"}]},
    ]
    for data in bad:
        assert list(validator.iter_errors(data)), data
