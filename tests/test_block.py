"""The CloudSend Cluster block: registered by Prefect's CLI, described for the UI form, saved and loaded."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL
from pydantic import ValidationError

from cloudsend_prefect.block import CloudSendCluster
from cloudsend_prefect.config import BatchConfig, Environment, InstanceType, Job
from cloudsend_prefect.errors import ConfigError
from cloudsend_prefect.resolve import load_config
from cloudsend_prefect.specs import EnvSpec, FileSpec, JobSpec, expand_jobs, resolve_envs


def test_registered_with_prefect_block_register(tmp_path: Path) -> None:
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    prefect = Path(sys.executable).with_name("prefect")
    done = subprocess.run(
        [str(prefect), "block", "register", "-m", "cloudsend_prefect"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "CloudSend Cluster" in done.stdout
    with get_client(sync_client=True) as client:
        block_type = client.read_block_type_by_slug("cloudsend-cluster")
    assert block_type.name == "CloudSend Cluster"


def test_every_field_is_titled_and_described_for_the_ui() -> None:
    schema = CloudSendCluster.model_json_schema()
    for name, prop in schema["properties"].items():
        assert prop.get("title") and prop.get("description"), name
    instance = schema["definitions"]["InstanceType"] if "definitions" in schema else schema["$defs"]["InstanceType"]
    for name, prop in instance["properties"].items():
        assert prop.get("title"), name
    for model in (BatchConfig, InstanceType, Environment, Job, FileSpec, EnvSpec, JobSpec):  # and the JSON Schema
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name}"


def test_the_documentation_link_opens_a_heading_of_the_readme() -> None:
    """The block's page in the UI links to the README section about it: GitHub's anchor of one of its headings
    (lower case, spaces to '-', punctuation other than '-' and '_' dropped)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    anchors = {
        re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in readme.splitlines()
        if line.startswith("#")
    }
    url = str(CloudSendCluster._documentation_url)
    assert url.split("#")[1] in anchors, url


def test_save_and_load_round_trip_from_a_config(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(
        "project: lab\ninstances: [{cpus: 3, name: big}, {cpus: 1}]\n"
        "environments: [{name: sci, env_pypi: [numpy]}, {name: base, command: 'echo hi'}]\n"
    )
    block = CloudSendCluster.from_config(load_config(tmp_path / "c.yaml"))
    block.save("lab-cluster", overwrite=True)
    loaded = CloudSendCluster.load("lab-cluster")
    assert loaded.project == "lab"
    assert [(i.name, i.cpus) for i in loaded.instances] == [("big", 3), (None, 1)]
    assert [e.name for e in loaded.environments] == ["sci", "base"]
    assert loaded.environments[0].env_pypi == ["numpy"]


def _stored(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The block document's data and the schema Prefect's server keeps for it (what the UI's forms are drawn from)."""
    with get_client(sync_client=True) as client:
        document = client.read_block_document_by_name(name, "cloudsend-cluster")
    assert document.block_schema is not None
    return document.data, document.block_schema.fields


def _nulls(value: Any, where: str = "") -> list[str]:
    if isinstance(value, dict):
        return [n for key, item in value.items() for n in _nulls(item, f"{where}.{key}")]
    if isinstance(value, list):
        return [n for i, item in enumerate(value) for n in _nulls(item, f"{where}[{i}]")]
    return [where] if value is None else []


def _project(root: Path) -> Path:
    """A config whose environments name a requirements file and setup scripts beside it, as the quickstart's do."""
    (root / "env").mkdir(parents=True)
    (root / "env" / "requirements.txt").write_text("# pinned for the lab\nrich==13.7.1\n\nrequests>=2\n")
    (root / "env" / "setup.sh").write_text("#!/bin/bash\necho building > built.txt\n")
    (root / "one-line.sh").write_text("exec ./other.sh")  # one line naming a script: must stay commands
    (root / "c.yaml").write_text(
        "project: lab\ninstances: [{cpus: 2}]\n"
        "environments:\n"
        "  - {name: sci, env_pypi: env/requirements.txt, command: env/setup.sh}\n"
        "  - {name: base, env_aptget: [jq], command: one-line.sh}\n"
        "  - {name: inline, env_pypi: [numpy], command: 'echo hi'}\n"
    )
    return root / "c.yaml"


def test_a_block_saved_in_one_directory_runs_from_another(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(_project(tmp_path / "project"))
    original = resolve_envs(config)
    monkeypatch.chdir(tmp_path / "project")
    CloudSendCluster.from_config(config).save("moved", overwrite=True)
    shutil.rmtree(tmp_path / "project")  # the block must not need the files any more

    data, _ = _stored("moved")
    assert _nulls(data) == []
    assert data["instances"] == [{"cpus": 2}]  # only what the config said: no defaults, no nulls
    assert data["environments"][0] == {
        "name": "sci",
        "env_pypi": ["# pinned for the lab", "rich==13.7.1", "", "requests>=2"],
        "command": "#!/bin/bash\necho building > built.txt",
    }

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = CloudSendCluster.load("moved")
    jobs = [Job(name=env, run_command="true", env_name=env) for env in ("sci", "base", "inline")]
    runs = expand_jobs(loaded.to_config(jobs, elsewhere), jobs)
    built = {run.name: run.env for run in runs}
    assert built["sci"] == original["sci"]  # same files, same hash: hosts reuse what the config built
    assert built["sci"] is not None and built["sci"].files["requirements.txt"] == (
        "# pinned for the lab\nrich==13.7.1\n\nrequests>=2\n"
    )
    assert built["inline"] == original["inline"]
    assert built["base"] is not None and built["base"].files["setup.sh"].startswith("exec ./other.sh\n")


def test_a_missing_environment_file_is_named_when_the_block_is_made(tmp_path: Path) -> None:
    config = load_config(_project(tmp_path))
    (tmp_path / "env" / "setup.sh").unlink()
    with pytest.raises(ConfigError) as caught:
        CloudSendCluster.from_config(config)
    message = str(caught.value)
    assert "environments[0].command: file not found: env/setup.sh" in message
    assert "environment 'sci'" in message and str(tmp_path / "c.yaml") in message


def test_a_conda_environment_file_is_refused_when_the_block_is_made(tmp_path: Path) -> None:
    (tmp_path / "environment.yml").write_text("dependencies: [numpy]\n")
    (tmp_path / "c.yaml").write_text("environments: [{env_conda: environment.yml}]\n")
    with pytest.raises(ConfigError, match=r"environments\[0\]\.env_conda: environment 'default': a conda environment"):
        CloudSendCluster.from_config(load_config(tmp_path / "c.yaml"))


def test_a_config_s_only_unnamed_environment_is_named_default_and_still_the_jobs_one(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("environments: [{env_pypi: [numpy]}]\n")
    block = CloudSendCluster.from_config(load_config(tmp_path / "c.yaml"))
    assert [env.name for env in block.environments] == ["default"]
    job = Job(run_command="true")
    (run,) = expand_jobs(block.to_config([job], tmp_path), [job])
    assert run.env is not None and run.env.files == {"requirements.txt": "numpy\n"}


def test_a_block_holds_no_file_names_for_its_environments() -> None:
    """Typed in the UI or in Python, a file name would only be found on the machine that has the file."""
    with pytest.raises(ValidationError, match=r"names a file, which a block cannot reach.*from_config"):
        CloudSendCluster(instances=[InstanceType()], environments=[{"name": "a", "env_pypi": "requirements.txt"}])
    with pytest.raises(ValidationError, match=r"reads as a script file"):
        CloudSendCluster(instances=[InstanceType()], environments=[{"name": "a", "command": "setup.sh"}])
    with pytest.raises(ValidationError, match=r"environments\.0\.name\s+Field required"):
        CloudSendCluster(instances=[InstanceType()], environments=[{"env_pypi": ["numpy"]}])
    with pytest.raises(ValidationError, match=r"instances\s+Field required"):
        CloudSendCluster()
    ok = CloudSendCluster(instances=[InstanceType()], environments=[{"name": "a", "command": "bash setup.sh\n"}])
    assert ok.environments[0].command == "bash setup.sh\n"


def test_the_stored_schema_draws_instance_types_and_environments_as_sub_forms() -> None:
    """Prefect's UI renders an array of objects as one sub-form per item, and `anyOf` as a type switch."""
    CloudSendCluster(instances=[InstanceType(cpus=1)]).save("schema-check", overwrite=True)
    _, schema = _stored("schema-check")
    definitions = schema["definitions"]
    assert schema["required"] == ["instances"]
    for field, definition in (("instances", "InstanceType"), ("environments", "ClusterEnvironment")):
        prop = schema["properties"][field]
        assert prop["type"] == "array" and prop["items"] == {"$ref": f"#/definitions/{definition}"}
        item = definitions[definition]
        assert item["type"] == "object"
        for name, sub in item["properties"].items():
            assert sub.get("title") and "anyOf" not in sub and sub.get("default", 0) is not None, name
    assert schema["properties"]["instances"]["minItems"] == 1
    environment = definitions["ClusterEnvironment"]
    assert environment["required"] == ["name"]
    assert environment["properties"]["env_pypi"] == {
        "type": "array",
        "items": {"type": "string"},
        "title": "pip packages",
        "description": environment["properties"]["env_pypi"]["description"],
    }
    assert environment["properties"]["command"]["type"] == "string"
    assert "required" not in definitions["InstanceType"]
    assert all("anyOf" not in prop or {"type": "null"} not in prop["anyOf"] for prop in schema["properties"].values())
