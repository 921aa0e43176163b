"""Instance-type catalog, prices and cost: what `cloudsend plan` estimates offline and what the flow reports.

AWS is moto's server on loopback, or an unused loopback port where no call may succeed; never real AWS.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from cloudsend_prefect import providers
from cloudsend_prefect.cli import app
from cloudsend_prefect.config import BatchConfig
from cloudsend_prefect.planning import planned, planned_hosts
from cloudsend_prefect.providers.aws import pricing
from cloudsend_prefect.providers.aws.hosts import AwsHost
from cloudsend_prefect.providers.aws.pricing import instance_info, on_demand_price, spot_price
from cloudsend_prefect.providers.base import HostInfo
from cloudsend_prefect.providers.costs import Estimate, billed_hours, cost_line, estimate

runner = CliRunner()
DEAD_ENDPOINT = "http://127.0.0.1:9"  # the discard port: nothing listens, every call fails at once


@pytest.fixture
def fake_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake credentials and no route to any real AWS configuration, credentials or metadata service."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("AWS_RETRY_MODE", "standard")
    monkeypatch.setenv("AWS_ENDPOINT_URL", DEAD_ENDPOINT)


def aws_host(
    name: str, instance_type: str | None, *, spot: bool = False, region: str = "us-east-1", max_bid: float | None = None
) -> HostInfo:
    return HostInfo(
        name=name,
        provider="aws",
        cpus=2,
        base_dir=".cloudsend",
        machine_id=f"i-{name}",
        provider_data=AwsHost(instance_type=instance_type, spot=spot, region=region, max_bid=max_bid).model_dump(),
    )


def priced(hosts: list[HostInfo], seconds: float | dict[str, float]) -> Estimate:
    """What the hosts cost for ``seconds``, at their providers' offline prices."""
    quotes, _ = providers.quote(hosts)
    return estimate([quotes[h.name] for h in hosts], seconds)


# -- the catalog --------------------------------------------------------------------------------------------
def test_catalog_knows_common_types_and_not_others() -> None:
    assert len(pricing.catalog()) >= 60
    c5 = instance_info("c5.xlarge")
    assert c5 is not None and (c5.vcpus, c5.memory_gib, c5.gpus) == (4, 8, 0)
    m5 = instance_info("m5.large")
    assert m5 is not None and (m5.vcpus, m5.memory_gib) == (2, 8)
    r6i = instance_info("r6i.2xlarge")
    assert r6i is not None and (r6i.vcpus, r6i.memory_gib) == (8, 64)
    g4 = instance_info("g4dn.12xlarge")
    assert g4 is not None and (g4.vcpus, g4.gpus) == (48, 4)
    assert on_demand_price("t3.large") == pytest.approx(0.0832)
    # the catalog has us-east-1 prices only: a host elsewhere is priced at them, and says so
    elsewhere = pricing.offline_price(AwsHost(instance_type="t3.large", region="eu-west-1"))
    assert elsewhere.usd_per_hour == on_demand_price("t3.large") and "us-east-1 price" in elsewhere.basis
    assert instance_info("z9.mega") is None and on_demand_price("z9.mega") is None and instance_info(None) is None


def test_catalog_prices_grow_with_size_within_a_family() -> None:
    families: dict[str, list[pricing.InstanceInfo]] = {}
    for info in pricing.catalog().values():
        families.setdefault(info.type.split(".")[0], []).append(info)
    for name, infos in families.items():
        if name in ("g4dn", "g5", "g6"):  # GPU count, not vCPUs, drives those prices
            continue
        by_vcpus = sorted(infos, key=lambda i: (i.vcpus, i.memory_gib))
        prices = [i.on_demand for i in by_vcpus]
        assert prices == sorted(prices), name
        assert all(0 < i.on_demand < 100 and i.vcpus >= 1 and i.memory_gib > 0 for i in infos)


# -- arithmetic ---------------------------------------------------------------------------------------------
def test_billing_is_per_second_with_a_minute_minimum() -> None:
    assert billed_hours(0) == billed_hours(10) == pytest.approx(60 / 3600)
    assert billed_hours(90) == pytest.approx(90 / 3600)
    assert billed_hours(7200) == pytest.approx(2.0)


def test_estimate_prices_on_demand_spot_own_machines_and_unknown_types() -> None:
    hosts = [
        aws_host("od", "c5.xlarge"),
        aws_host("sp", "c5.xlarge", spot=True),
        aws_host("bid", "c5.xlarge", spot=True, max_bid=0.05),
        HostInfo(name="laptop", provider="local", cpus=8, base_dir="/tmp/x"),
    ]
    result = priced(hosts, 1800)
    rows = {r.host: r for r in result.rows}
    assert rows["od"].market == "on-demand" and rows["od"].cost == pytest.approx(0.17 / 2)
    # a spot host with no known spot price: the on-demand price as an upper bound, said so
    assert rows["sp"].market == "spot" and rows["sp"].cost == pytest.approx(0.17 / 2)
    assert "upper bound" in rows["sp"].basis
    assert rows["bid"].usd_per_hour == 0.05 and rows["bid"].cost == pytest.approx(0.025)
    assert rows["laptop"].market == "own machine" and rows["laptop"].cost == 0
    assert result.total == pytest.approx(0.17 + 0.025) and result.complete

    short = priced([aws_host("od", "c5.xlarge")], 5)  # a 5 s instance is billed a minute
    assert short.total == pytest.approx(0.17 / 60)

    unknown = priced([aws_host("od", "c5.xlarge"), aws_host("odd", "z9.mega")], 3600)
    assert unknown.total == pytest.approx(0.17) and not unknown.complete
    assert unknown.rows[1].cost is None and "not in the catalog" in unknown.rows[1].basis


# -- spot prices from EC2 -----------------------------------------------------------------------------------
def test_spot_price_from_ec2_and_none_on_any_error(fake_aws: None, moto_ec2: str) -> None:
    import boto3

    ec2 = boto3.client("ec2", region_name="us-east-1", endpoint_url=moto_ec2)
    assert spot_price(ec2, "c5.xlarge") == pytest.approx(0.00001)  # moto's only spot price
    assert spot_price(ec2, "c5.xlarge", "us-east-1a") == pytest.approx(0.00001)
    dead = boto3.client("ec2", region_name="us-east-1", endpoint_url=DEAD_ENDPOINT)
    assert spot_price(dead, "c5.xlarge") is None
    assert spot_price(object(), "c5.xlarge") is None


def test_cost_report_of_hosts_uses_live_spot_prices_else_the_catalog(
    fake_aws: None, moto_ec2: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    hosts = [
        aws_host("aws-0", "c5.xlarge"),
        aws_host("aws-1", "m5.large", spot=True),
        HostInfo(name="laptop", provider="local", cpus=8, base_dir="/tmp/x"),
    ]
    assert providers.cost_report(hosts[2:], 3600) is None  # no aws host, no report

    offline = providers.cost_report(hosts, 3600)  # EC2 unreachable: spot falls back to on-demand
    assert offline is not None
    assert [r.host for r in offline.rows] == ["aws-0", "aws-1"]
    assert offline.total == pytest.approx(0.17 + 0.096)

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_ec2)
    live = providers.cost_report(hosts, 7200)
    assert live is not None
    spot = live.rows[1]
    assert spot.usd_per_hour == pytest.approx(0.00001) and "from EC2" in spot.basis
    assert live.total == pytest.approx(2 * 0.17 + 2 * 0.00001)
    first = live.rows[0]
    assert (first.machine_id, first.market, first.hours, first.usd_per_hour) == ("i-aws-0", "on-demand", 2.0, 0.17)
    assert first.cost == pytest.approx(0.34) and first.basis == "on-demand (catalog)"
    line = cost_line(live)
    assert "aws-0 (i-aws-0, c5.xlarge on-demand, 2.000 h: $0.3400)" in line and "upper bound" in line


def test_the_flow_reports_cost_as_an_artifact(fake_aws: None) -> None:
    from prefect import flow

    from cloudsend_prefect.flow import _report_cost
    from cloudsend_prefect.reporting import measure

    @flow
    def report(hosts: list[HostInfo]) -> tuple[float | None, float | None]:
        up = {host.name: 1800.0 for host in hosts}
        mine = _report_cost("cost-unit", hosts, measure([], {}, hosts, 1800), up, kept=False)
        own = _report_cost("cost-own", hosts[2:], measure([], {}, hosts[2:], 1800), up, kept=False)
        return mine, own

    hosts = [
        aws_host("aws-0", "c5.xlarge"),
        aws_host("aws-1", "c5.xlarge", spot=True),  # EC2 unreachable: priced at on-demand
        HostInfo(name="laptop", provider="local", cpus=8, base_dir="/tmp/x"),
    ]
    total, own = report(hosts)
    assert total == pytest.approx(0.17) and own is None
    artifact: Any = None
    for _ in range(50):  # the test server records artifacts asynchronously
        artifact = _artifact("cost-unit-cost")
        if artifact is not None:
            break
        time.sleep(0.2)
    assert artifact is not None and "upper bound" in (artifact.description or "")
    rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    assert [r["host"] for r in rows] == ["aws-0", "aws-1", "laptop", "total"]
    assert rows[1]["market"] == "spot" and rows[2]["market"] == "-" and rows[-1]["cost"] == "$0.1700"
    own_artifact = _artifact("cost-own-cost")  # own machines: CPU time only, no price
    assert own_artifact is not None and "no charge" in (own_artifact.description or "")
    own_rows = json.loads(own_artifact.data) if isinstance(own_artifact.data, str) else own_artifact.data
    assert own_rows[-1]["CPU time available"] == "4 h 0 min" and "cost" not in own_rows[-1]  # 8 CPUs x 30 min


def _artifact(key: str) -> Any:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return found[0] if found else None


# -- planning and `cloudsend plan` --------------------------------------------------------------------------
AWS_CONFIG: dict[str, Any] = {
    "project": "costly",
    "provider": "aws",
    "instances": [
        {"type": "c5.xlarge", "number": 2, "region": "us-east-1"},
        {"type": "m5.large", "name": "big", "cpus": 5, "explode": True, "eco": True},
        {"type": "r5.large", "eco": True, "max_bid": 0.05},
        {"provider": "local", "cpus": 2, "name": "here"},
    ],
    "jobs": [{"run_command": "sleep 1", "expected_duration": 1800, "repeat": 8, "cpus_req": 2}],
}


def test_planned_hosts_match_the_aws_provider_names_and_explode_with_catalog_vcpus() -> None:
    config = BatchConfig.model_validate(AWS_CONFIG)
    assert planned_hosts(config) == {
        "aws-0.0": 4,
        "aws-0.1": 4,
        "big.0": 2,  # 5 CPUs of m5.large (2 vCPUs): 3 instances
        "big.1": 2,
        "big.2": 1,
        "aws-2": 2,
        "here": 2,
    }
    hosts = {h.name: h for h in planned(config)}
    assert hosts["big.0"].provider_data["spot"] and hosts["aws-2"].provider_data["max_bid"] == 0.05
    assert hosts["here"].provider == "local"
    unknown = BatchConfig.model_validate({"provider": "aws", "instances": [{"type": "z9.mega"}]})
    (host,) = planned(unknown)
    assert host.cpus == 1 and not host.cpus_known


def table_rows(output: str) -> list[list[str]]:
    """The cells of every row of the rich tables in ``output``."""
    return [[cell.strip() for cell in line.split("│")[1:-1]] for line in output.splitlines() if line.startswith("│")]


def write(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "batch.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_plan_shows_instances_and_estimated_cost_offline(
    tmp_path: Path, cloudsend_home: Path, fake_aws: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3.session

    def no_aws(*args: object, **kwargs: object) -> None:
        raise AssertionError("cloudsend plan called AWS")

    monkeypatch.setattr(boto3.session.Session, "client", no_aws)
    result = runner.invoke(app, ["plan", str(write(tmp_path, AWS_CONFIG))], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = result.output
    for host in ("aws-0.0", "aws-0.1", "big.0", "big.2", "aws-2", "here"):
        assert host in out
    # the instance table: type, vCPUs, memory, count, market, $/h, cost for the 1800 s makespan
    rows = table_rows(out)
    assert ["aws-0.0..aws-0.1", "c5.xlarge", "4", "8", "2", "on-demand", "$0.1700", "$0.1700"] in rows
    assert ["big.0..big.2", "m5.large", "2", "8", "3", "spot", "$0.0960", "$0.1440"] in rows
    assert ["aws-2", "r5.large", "2", "16", "1", "spot", "$0.0500", "$0.0250"] in rows
    assert ["here", "local", "2", "-", "1", "own machine", "-", "$0"] in rows
    assert "estimated cost: $0.3390" in out
    assert "on-demand price as upper bound" in out and "max_bid (upper bound)" in out
    assert "us-east-1 list prices; the default region may differ" in out
    assert not cloudsend_home.exists()


def test_plan_asks_ec2_for_spot_prices_only_when_told(
    tmp_path: Path, fake_aws: None, moto_ec2: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(tmp_path, AWS_CONFIG)
    failed = runner.invoke(app, ["plan", "--spot-prices", str(config)], env={"COLUMNS": "200"})
    assert failed.exit_code == 0, failed.output  # EC2 unreachable: offline prices, said so
    assert "no spot price from EC2 for m5.large, r5.large" in failed.output
    assert "estimated cost: $0.3390" in failed.output

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_ec2)
    live = runner.invoke(app, ["plan", "--spot-prices", str(config)], env={"COLUMNS": "200"})
    assert live.exit_code == 0, live.output
    assert "spot: current price from EC2" in live.output and "$0.000010" in live.output
    assert "estimated cost: $0.1700" in live.output  # the two c5.xlarge for half an hour; spot is nearly free


def test_each_host_is_billed_for_its_own_up_time() -> None:
    """An instance stopped early, or launched late as a replacement, costs its own time, not the batch's."""
    hosts = [aws_host("kept", "c5.xlarge"), aws_host("stopped-early", "c5.xlarge")]
    result = priced(hosts, {"kept": 7200, "stopped-early": 1800})
    assert [row.hours for row in result.rows] == [2.0, 0.5]
    assert result.total == pytest.approx(2.5 * 0.17)
