"""The CloudSend Cluster block: registered by Prefect's CLI, described for the UI form, saved and loaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL

from cloudsend_prefect.block import CloudSendCluster
from cloudsend_prefect.loading import load_config


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
