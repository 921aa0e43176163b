"""`cloudsend instances`, `stop` and `start` against moto's EC2 server: a project's instances only, with state,
address, uptime and cost so far; stopped and started again by the project's tag."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from typer.testing import CliRunner

from cloudsend_prefect.cli import app
from cloudsend_prefect.loading import parse_config
from cloudsend_prefect.providers import aws
from cloudsend_prefect.providers.aws import pricing
from tests.moto_server import CONNECTIONS, LOOPBACK, REGION, AwsEnv, ec2, linux_ami

runner = CliRunner()


def provision(tmp_path: Path, project: str, number: int) -> list[str]:
    image = linux_ami()["ImageId"]
    data = {
        "project": project,
        "provider": "aws",
        "ssh_from": ["203.0.113.5/32"],
        "instances": [{"type": "t3.micro", "img_id": image, "address": LOOPBACK, "number": number}],
    }
    config = parse_config(data, source=str(tmp_path / "batch.yaml"), base_dir=tmp_path)
    return [h.machine_id or "" for h in aws.provision(config, list(enumerate(config.instances)), CONNECTIONS)]


def states(ids: list[str]) -> dict[str, str]:
    found = ec2().describe_instances(InstanceIds=ids)["Reservations"]
    return {i["InstanceId"]: i["State"]["Name"] for r in found for i in r["Instances"]}


def listed(*args: str) -> dict[str, Any]:
    result = runner.invoke(app, ["instances", *args, "--json"])
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


def test_instances_stop_and_start_act_on_the_project_only(tmp_path: Path, aws_env: AwsEnv) -> None:
    ids = provision(tmp_path, "fleet", 2)
    others = provision(tmp_path, "other", 1)

    rows = listed("--project", "fleet", "--region", REGION)["instances"]
    assert sorted(row["id"] for row in rows) == sorted(ids)
    price = pricing.on_demand_price("t3.micro")
    assert price is not None
    for row in rows:
        assert (row["provider"], row["state"], row["region"], row["type"]) == ("aws", "running", REGION, "t3.micro")
        assert row["address"] and row["uptime"] >= 0
        assert row["usd_per_hour"] == price
        assert row["usd_so_far"] >= price * 60 / 3600  # billed per second, 60 s at least
    table = runner.invoke(app, ["instances", "--project", "fleet"])
    assert table.exit_code == 0 and ids[0] in table.stdout and "so far" in table.stdout

    stopped = runner.invoke(app, ["stop", "--project", "fleet"])
    assert stopped.exit_code == 0, stopped.output
    assert all(f"stopping {i}" in stopped.stdout for i in ids)
    assert set(states(ids).values()) <= {"stopping", "stopped"}
    assert set(states(others).values()) == {"running"}
    ec2().get_waiter("instance_stopped").wait(InstanceIds=ids, WaiterConfig={"Delay": 1, "MaxAttempts": 30})
    rows = listed("--project", "fleet")["instances"]
    assert {row["state"] for row in rows} == {"stopped"} and {row["usd_so_far"] for row in rows} == {None}
    again = runner.invoke(app, ["stop", "--project", "fleet"])
    assert again.exit_code == 0 and "nothing to stop" in again.stdout

    started = runner.invoke(app, ["start", "--project", "fleet", "--id", ids[0]])
    assert started.exit_code == 0, started.output
    assert started.stdout.split() == ["starting", ids[0]]
    assert states(ids)[ids[1]] == "stopped" and states(ids)[ids[0]] in ("pending", "running")


def test_instances_of_a_config_list_its_own_servers_too(tmp_path: Path, aws_env: AwsEnv) -> None:
    path = tmp_path / "mixed.yaml"
    config = {
        "project": "mixed",
        "instances": [
            {"cpus": 2, "name": "here"},
            {"provider": "ssh", "host": "127.0.0.1", "port": 2222, "user": "alice", "name": "lab"},
        ],
        "jobs": [{"run_command": "true"}],
    }
    path.write_text(yaml.safe_dump(config))
    rows = listed(str(path))["instances"]
    assert [(row["provider"], row["name"], row["state"]) for row in rows] == [
        ("local", "here", "this machine"),
        ("ssh", "lab", "own server"),
    ]
    assert rows[1]["address"] == "alice@127.0.0.1:2222"
    stop = runner.invoke(app, ["stop", str(path)])
    assert stop.exit_code == 0 and "no aws instance type" in stop.output
    missing = runner.invoke(app, ["instances"])
    assert missing.exit_code == 2 and "give a config file or --project" in missing.output
