"""The `aws` provider against moto's EC2 server over real HTTP, and whole batches on it.

Everything is checked the way a user would check it: in the EC2 API (describe calls), on disk, in the
flow's logs and results. moto's instances carry addresses of real networks, so no test ever connects to
them: the ``loopback`` address resolver (tests/moto_server.py) maps each instance to a loopback sshd host.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
import stat
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from botocore.awsrequest import AWSResponse
from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner

from cloudsend_prefect import flow
from cloudsend_prefect.cli import app
from cloudsend_prefect.config import BatchConfig
from cloudsend_prefect.dispatch import Dispatcher
from cloudsend_prefect.errors import ConfigError
from cloudsend_prefect.flow import cloudsend
from cloudsend_prefect.loading import parse_config
from cloudsend_prefect.providers import HostInfo, aws
from cloudsend_prefect.providers.aws import addresses as aws_addresses
from cloudsend_prefect.providers.aws import hosts as aws_hosts
from cloudsend_prefect.providers.aws import keys as aws_keys
from cloudsend_prefect.providers.aws import launch as aws_launch
from cloudsend_prefect.providers.aws import network as aws_network
from cloudsend_prefect.providers.aws import session as aws_session
from cloudsend_prefect.results import BatchSummary
from tests.moto_server import CONNECTIONS, LOOPBACK, AwsEnv, ec2, linux_ami
from tests.sshd import SshdHost

CIDR = "203.0.113.5/32"  # TEST-NET-3: documentation addresses, never routed
ALIVE = {"pending", "running", "stopping", "stopped"}


# -- helpers --------------------------------------------------------------------------------------------
@pytest.fixture
def ami(aws_env: AwsEnv) -> dict[str, Any]:
    return linux_ami()


def instance(ami: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return {"type": "t3.micro", "img_id": ami["ImageId"], "address": LOOPBACK, **kw}


def make_config(tmp_path: Path, project: str, instances: list[dict[str, Any]], **extra: Any) -> BatchConfig:
    data = {"project": project, "provider": "aws", "ssh_from": [CIDR], "instances": instances, **extra}
    return parse_config(data, source=str(tmp_path / "batch.yaml"), base_dir=tmp_path)


def provision(config: BatchConfig) -> list[HostInfo]:
    return aws.provision(config, list(enumerate(config.instances)), CONNECTIONS)


def described(project: str, region: str = "eu-west-1") -> list[dict[str, Any]]:
    """Every instance the project has in EC2, whatever its state, by rank."""
    pages = ec2(region).describe_instances(Filters=[{"Name": "tag:cloudsend:project", "Values": [project]}])
    found = [i for r in pages["Reservations"] for i in r["Instances"]]
    return sorted(found, key=lambda i: tag(i, "cloudsend:rank") or "")


def states(project: str) -> dict[str, str]:
    return {i["InstanceId"]: i["State"]["Name"] for i in described(project)}


def tag(resource: dict[str, Any], key: str) -> str | None:
    return next((t["Value"] for t in resource.get("Tags", []) if t["Key"] == key), None)


def rank_of(body: dict[str, Any]) -> str | None:
    """The rank tag in a serialized RunInstances request."""
    return next((body[k[:-3] + "Value"] for k, v in body.items() if v == "cloudsend:rank" and k.endswith(".Key")), None)


@dataclass
class Wire:
    """The EC2 requests as boto3 serializes them for the HTTP call, and the cloud's answers to fake.

    A fault is a function of (operation, request) returning an EC2 error code to answer with, or None to
    let the request through to moto.
    """

    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    faults: list[Callable[[str, dict[str, Any]], str | None]] = field(default_factory=list)
    # Like faults, but the request reaches moto and is carried out; only its answer is replaced by the error.
    lost_answers: list[Callable[[str, dict[str, Any]], str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def sent(self, operation: str) -> list[dict[str, Any]]:
        with self.lock:
            return [body for op, body in self.calls if op == operation]

    def before(
        self, model: Any, params: dict[str, Any], context: dict[str, Any], **_: Any
    ) -> tuple[AWSResponse, dict[str, Any]] | None:
        body = dict(params.get("body") or {})
        with self.lock:
            self.calls.append((model.name, body))
        for fault in self.faults:
            code = fault(model.name, body)
            if code:
                error = {"Code": code, "Message": f"injected: {code}"}
                return AWSResponse(params["url"], 400, {}, None), {"Error": error, "ResponseMetadata": {}}
        context["test_lost_answer"] = next((c for f in self.lost_answers if (c := f(model.name, body))), None)
        return None

    def after(self, http_response: Any, parsed: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        code = context.get("test_lost_answer")
        if code:
            http_response.status_code = 500
            parsed["Error"] = {"Code": code, "Message": f"injected: the answer was lost ({code})"}


@pytest.fixture
def wire(aws_env: AwsEnv, monkeypatch: pytest.MonkeyPatch) -> Wire:
    """Record (and optionally answer) every EC2 call the provider makes."""
    recorder = Wire()
    real = aws_session.client  # every AWS client of the provider is made there

    def client(*args: Any, **kwargs: Any) -> Any:
        made = real(*args, **kwargs)
        made.meta.events.register("before-call.ec2", recorder.before)
        made.meta.events.register("after-call.ec2", recorder.after)
        return made

    monkeypatch.setattr(aws_session, "client", client)
    return recorder


def no_capacity(*types: str, subnets: tuple[str, ...] = ()) -> Callable[[str, dict[str, Any]], str | None]:
    def fault(op: str, body: dict[str, Any]) -> str | None:
        if op != "RunInstances":
            return None
        if body.get("InstanceType") in types or body.get("SubnetId") in subnets:
            return "InsufficientInstanceCapacity"
        return None

    return fault


# -- keys and network -----------------------------------------------------------------------------------
def test_key_pair_is_in_ec2_and_its_private_key_is_0600_outside_the_working_directory(
    tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    config = make_config(tmp_path, "keys", [instance(ami)])
    (host,) = provision(config)

    pairs = ec2().describe_key_pairs(
        Filters=[{"Name": "tag:cloudsend:project", "Values": ["keys"]}], IncludePublicKey=True
    )["KeyPairs"]
    assert len(pairs) == 1
    (launched,) = described("keys")
    assert launched["KeyName"] == pairs[0]["KeyName"]
    key_file = aws_env.config_home / "cloudsend" / "keys" / "keys-eu-west-1.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    private = serialization.load_ssh_private_key(key_file.read_bytes(), password=None)
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    assert pairs[0]["PublicKey"].split()[:2] == public.decode().split()[:2]  # EC2 holds the matching public key
    assert list(cwd.iterdir()) == []  # nothing written where the user runs the command
    assert host.key_file != str(key_file)  # (the loopback resolver logs in with the sshd hosts' test key)

    provision(config)  # a second run imports nothing new
    assert len(ec2().describe_key_pairs()["KeyPairs"]) == 1


def test_key_kept_in_a_secret_block_serves_a_machine_without_the_key_file(
    tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any]
) -> None:
    from prefect.blocks.system import Secret

    config = make_config(tmp_path, "secretkey", [instance(ami)], key_secret=unique("cs-key"))
    provision(config)
    key_file = aws_env.config_home / "cloudsend" / "keys" / "secretkey-eu-west-1.pem"
    original = key_file.read_text()
    assert Secret.load(f"{config.key_secret}-eu-west-1").get() == original
    key_file.unlink()  # e.g. a worker on another machine
    provision(config)
    assert key_file.read_text() == original and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert len(ec2().describe_key_pairs()["KeyPairs"]) == 1  # the same pair, not a new one


def ingress(project: str) -> list[dict[str, Any]]:
    (group,) = ec2().describe_security_groups(Filters=[{"Name": "group-name", "Values": [f"cloudsend-{project}"]}])[
        "SecurityGroups"
    ]
    return group["IpPermissions"]


def test_security_group_lets_in_ssh_from_the_configured_cidr_only(
    tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any]
) -> None:
    provision(make_config(tmp_path, "sg", [instance(ami)]))
    (rule,) = ingress("sg")
    assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22)
    assert [r["CidrIp"] for r in rule["IpRanges"]] == [CIDR]
    assert not rule.get("Ipv6Ranges") and not rule.get("UserIdGroupPairs")
    (launched,) = described("sg")
    groups = [g["GroupName"] for g in launched["SecurityGroups"]]
    assert groups == ["cloudsend-sg"]  # not the VPC's default group
    provision(make_config(tmp_path, "sg", [instance(ami)]))  # a second run adds no duplicate rule
    assert [r["CidrIp"] for rule in ingress("sg") for r in rule["IpRanges"]] == [CIDR]


def test_ssh_from_takes_bare_addresses_and_ipv6_and_refuses_nonsense(
    tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any]
) -> None:
    provision(make_config(tmp_path, "v6", [instance(ami)], ssh_from=["198.51.100.9", "2001:db8:5::/64"]))
    (rule,) = ingress("v6")
    assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22)
    assert [r["CidrIp"] for r in rule["IpRanges"]] == ["198.51.100.9/32"]
    assert [r["CidrIpv6"] for r in rule["Ipv6Ranges"]] == ["2001:db8:5::/64"]
    with pytest.raises(ConfigError, match=r"ssh_from.*'my laptop' is not an address or CIDR block"):
        make_config(tmp_path, "nonsense", [instance(ami)], ssh_from=["my laptop"])  # refused before any call


def test_without_ssh_from_only_this_machines_public_address_is_let_in(
    tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[str] = []

    def checkip(url: str, timeout: float = 0) -> io.BytesIO:
        asked.append(url)
        return io.BytesIO(b"198.51.100.7\n")

    monkeypatch.setattr(aws_network.urllib.request, "urlopen", checkip)
    config = parse_config(
        {"project": "myip", "provider": "aws", "instances": [instance(ami)]}, source="x", base_dir=tmp_path
    )
    provision(config)
    assert asked == ["https://checkip.amazonaws.com"]
    assert [r["CidrIp"] for rule in ingress("myip") for r in rule["IpRanges"]] == ["198.51.100.7/32"]


def group_of(project: str) -> dict[str, Any]:
    (group,) = ec2().describe_security_groups(Filters=[{"Name": "group-name", "Values": [f"cloudsend-{project}"]}])[
        "SecurityGroups"
    ]
    return group


def only_ssh_from(project: str, *cidrs: str) -> None:
    """The group lets in TCP 22 from exactly ``cidrs`` and nothing else (no other port, source or group)."""
    permissions = ingress(project)
    assert [(p["IpProtocol"], p.get("FromPort"), p.get("ToPort")) for p in permissions] == [("tcp", 22, 22)]
    (rule,) = permissions
    sources = [r["CidrIp"] for r in rule["IpRanges"]] + [r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])]
    assert sorted(sources) == sorted(cidrs)
    assert not rule.get("UserIdGroupPairs") and not rule.get("PrefixListIds")


def test_a_reused_security_group_converges_to_the_ssh_from_of_this_run(
    tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cloudsend.aws")
    provision(make_config(tmp_path, "drift", [instance(ami)], ssh_from=["0.0.0.0/0", "2001:db8:5::/64"]))
    only_ssh_from("drift", "0.0.0.0/0", "2001:db8:5::/64")
    group = group_of("drift")["GroupId"]

    provision(make_config(tmp_path, "drift", [instance(ami)]))  # ssh_from: [CIDR]
    only_ssh_from("drift", CIDR)  # the world and the old IPv6 block are out, not kept beside the /32
    assert group_of("drift")["GroupId"] == group  # the same group, converged (instances keep it)
    messages = [r.getMessage() for r in caplog.records if r.name == "cloudsend.aws"]
    assert f"security group {group}: let in SSH from {CIDR}" in messages
    revoked = [m for m in messages if "revoked" in m]
    assert any("tcp 22 from 0.0.0.0/0" in m for m in revoked)
    assert any("tcp 22 from 2001:db8:5::/64" in m for m in revoked)


def test_rules_added_to_the_group_by_hand_are_revoked(
    tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any], wire: Wire
) -> None:
    config = make_config(tmp_path, "byhand", [instance(ami)], ssh_from=[CIDR, "2001:db8:5::/64"])
    provision(config)
    group = group_of("byhand")["GroupId"]
    (default,) = ec2().describe_security_groups(Filters=[{"Name": "group-name", "Values": ["default"]}])[
        "SecurityGroups"
    ]
    ec2().authorize_security_group_ingress(
        GroupId=group,
        IpPermissions=[
            {"IpProtocol": "tcp", "FromPort": 80, "ToPort": 80, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
            {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "Ipv6Ranges": [{"CidrIpv6": "::/0"}]},
            {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "198.51.100.0/24"}]},
            {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 23, "IpRanges": [{"CidrIp": CIDR}]},  # not exactly 22
            {"IpProtocol": "udp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": CIDR}]},  # not tcp
            {"IpProtocol": "icmp", "FromPort": -1, "ToPort": -1, "IpRanges": [{"CidrIp": "10.0.0.0/8"}]},
            {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": default["GroupId"]}]},  # another group
        ],
    )
    with wire.lock:
        wire.calls.clear()

    provision(config)
    only_ssh_from("byhand", CIDR, "2001:db8:5::/64")
    assert len(wire.sent("RevokeSecurityGroupIngress")) == 7  # one call per stale rule
    assert wire.sent("AuthorizeSecurityGroupIngress") == []  # the requested rules were there already


def test_an_unchanged_group_is_only_read(tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any], wire: Wire) -> None:
    config = make_config(tmp_path, "steady", [instance(ami)], ssh_from=[CIDR, "2001:db8:5::/64"])
    provision(config)
    before = group_of("steady")
    with wire.lock:
        wire.calls.clear()
    provision(config)
    assert wire.sent("DescribeSecurityGroups")
    assert wire.sent("AuthorizeSecurityGroupIngress") == [] and wire.sent("RevokeSecurityGroupIngress") == []
    assert group_of("steady") == before


def test_another_run_converging_the_group_at_once_is_not_an_error(
    tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any], wire: Wire
) -> None:
    provision(make_config(tmp_path, "race", [instance(ami)], ssh_from=["0.0.0.0/0"]))
    # Each change is carried out, but answered as if another run had made it first.
    wire.lost_answers.append(
        lambda op, body: {
            "AuthorizeSecurityGroupIngress": "InvalidPermission.Duplicate",
            "RevokeSecurityGroupIngress": "InvalidPermission.NotFound",
        }.get(op)
    )
    provision(make_config(tmp_path, "race", [instance(ami)]))
    only_ssh_from("race", CIDR)
    assert wire.sent("AuthorizeSecurityGroupIngress") and wire.sent("RevokeSecurityGroupIngress")


def test_key_path_refuses_a_project_or_region_that_is_not_one_file_name(
    tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any], wire: Wire
) -> None:
    config = make_config(tmp_path, "safe", [instance(ami)])
    assert aws_keys.key_path(config, "eu-west-1") == aws_env.config_home / "cloudsend" / "keys" / "safe-eu-west-1.pem"
    for project in ("../../x", "a/b", "a\\b", "..", ".", ".hidden", "", "a\0b", "a\nb"):
        # Built past the config's own checks: key_path must hold on its own.
        bad = config.model_copy(update={"project": project})
        with pytest.raises(ValueError, match=r"project .* cannot name a key file"):
            aws_keys.key_path(bad, "eu-west-1")
    with pytest.raises(ValueError, match=r"region .* cannot name a key file"):
        aws_keys.key_path(config, "../eu-west-1")

    escaping = config.model_copy(update={"project": "../../x"})
    with pytest.raises(ValueError, match="cannot name a key file"):
        provision(escaping)
    assert wire.sent("ImportKeyPair") == [] and wire.sent("RunInstances") == []
    assert not list(tmp_path.rglob("*.pem"))  # no private key written anywhere

    keys = aws_env.config_home / "cloudsend" / "keys"
    keys.mkdir(parents=True)
    (keys / "planted-eu-west-1.pem").symlink_to(tmp_path / "elsewhere.pem")
    with pytest.raises(ValueError, match="resolves outside"):
        aws_keys.key_path(config.model_copy(update={"project": "planted"}), "eu-west-1")
    assert not (tmp_path / "elsewhere.pem").exists()


def test_key_file_and_directory_are_made_private_even_when_they_were_not(
    tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any]
) -> None:
    config = make_config(tmp_path, "loose", [instance(ami)])
    key_file = aws_keys.key_path(config, "eu-west-1")
    aws_keys.ensure_key(ec2(), config, "eu-west-1")
    key_file.chmod(0o644)  # e.g. copied from another machine with a loose umask
    key_file.parent.chmod(0o755)
    aws_keys.ensure_key(ec2(), config, "eu-west-1")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700


# -- run_instances --------------------------------------------------------------------------------------
def test_run_instances_arguments_as_ec2_records_them(
    tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any], wire: Wire
) -> None:
    config = make_config(
        tmp_path,
        "args",
        [
            instance(ami, type="c5.xlarge", disk_size=42, disk_type="gp3", eco=True, max_bid=0.05, name="spot"),
            instance(ami, type="t3.micro", name="plain"),
        ],
        idle_minutes=7,
    )
    provision(config)
    spot, plain = described("args")
    client = ec2()

    # The root volume: on the image's own root device, with the size and type asked for.
    assert spot["RootDeviceName"] == ami["RootDeviceName"]
    (mapping,) = spot["BlockDeviceMappings"]
    assert mapping["DeviceName"] == ami["RootDeviceName"] and mapping["Ebs"]["DeleteOnTermination"]
    (volume,) = client.describe_volumes(VolumeIds=[mapping["Ebs"]["VolumeId"]])["Volumes"]
    assert (volume["Size"], volume["VolumeType"]) == (42, "gp3")
    assert tag(volume, "cloudsend:project") == "args"

    # Spot when eco, with the max price; a spot instance terminates rather than stops.
    assert spot["InstanceLifecycle"] == "spot" and "InstanceLifecycle" not in plain
    spot_request, plain_request = sorted(wire.sent("RunInstances"), key=lambda b: b["InstanceType"])
    assert spot_request["InstanceMarketOptions.MarketType"] == "spot"
    assert spot_request["InstanceMarketOptions.SpotOptions.MaxPrice"] == "0.05"
    assert not any(k.startswith("InstanceMarketOptions") for k in plain_request)
    assert not any(k.startswith("BlockDeviceMapping") for k in plain_request)  # the image's root as it is

    def attribute(inst: dict[str, Any], name: str) -> Any:
        key = name[0].upper() + name[1:]
        return client.describe_instance_attribute(InstanceId=inst["InstanceId"], Attribute=name)[key]["Value"]

    assert attribute(spot, "instanceInitiatedShutdownBehavior") == "terminate"
    assert attribute(plain, "instanceInitiatedShutdownBehavior") == "stop"
    # The dead-man switch (tests/test_deadman.py): powers off after idle_minutes without a job or a client.
    user_data = base64.b64decode(attribute(plain, "userData")).decode()
    assert "ExecStart=/usr/local/bin/cloudsend-deadman 420\n" in user_data

    for inst, rank, itype in ((spot, "0", "c5.xlarge"), (plain, "1", "t3.micro")):
        assert inst["InstanceType"] == itype
        assert tag(inst, "cloudsend:project") == "args"
        assert tag(inst, "cloudsend:rank") == rank
        assert tag(inst, "cloudsend:cluster")
        assert tag(inst, "Name") == f"cloudsend-args-{rank}"
        assert inst["MetadataOptions"]["HttpTokens"] == "required"  # IMDSv2 only
        assert inst["ImageId"] == ami["ImageId"]
    assert tag(spot, "cloudsend:cluster") != tag(plain, "cloudsend:cluster")


def test_io_volume_types_get_the_iops_ec2_requires() -> None:
    # EC2 refuses io1/io2 volumes without Iops. moto 5.2.5 drops Iops from run_instances' mappings (and so
    # always refuses io1/io2 there), so this one is checked on the request the provider builds.
    config = parse_config(
        {"provider": "aws", "instances": [{"type": "t3.micro", "disk_size": 20, "disk_type": "io2"}]},
        source="x",
        base_dir=Path("."),
    )
    image = {
        "ImageId": "ami-1",
        "RootDeviceName": "/dev/xvda",
        "BlockDeviceMappings": [{"DeviceName": "/dev/xvda", "Ebs": {"SnapshotId": "snap-1", "VolumeType": "gp2"}}],
    }
    want = aws_launch.Want("0", 2, 0, "aws-0")
    params = aws_launch.run_params(config, config.instances[0], image, "k", "sg-1", want.rank, "c")
    (mapping,) = params["BlockDeviceMappings"]
    assert mapping["DeviceName"] == "/dev/xvda"
    assert mapping["Ebs"] == {
        "SnapshotId": "snap-1",
        "VolumeSize": 20,
        "VolumeType": "io2",
        "Iops": 1000,
        "DeleteOnTermination": True,
    }


# -- reuse ----------------------------------------------------------------------------------------------
def test_second_run_reuses_instances_by_tags_and_creates_none(
    tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any], wire: Wire
) -> None:
    config = make_config(tmp_path, "reuse", [instance(ami, number=2)])
    first = provision(config)
    assert all(h.created for h in first)
    created, images = len(wire.sent("RunInstances")), len(wire.sent("DescribeImages"))
    assert created == 2
    second = provision(config)
    assert [h.machine_id for h in second] == [h.machine_id for h in first]
    assert not any(h.created for h in second)  # reused: not this run's to remove
    assert len(wire.sent("RunInstances")) == created
    assert len(wire.sent("DescribeImages")) == images  # nothing to launch: no image looked up
    assert len(described("reuse")) == 2

    # What the machine is changed (another disk size): never reused for it, a new one is made.
    bigger = make_config(tmp_path, "reuse", [instance(ami, number=2, disk_size=30)])
    third = provision(bigger)
    assert not {h.machine_id for h in third} & {h.machine_id for h in first}
    assert len(described("reuse")) == 4


def test_stopped_instances_are_started_again_on_reuse(tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any]) -> None:
    config = make_config(tmp_path, "restart", [instance(ami, number=2)])
    hosts = provision(config)
    aws.teardown(hosts)
    assert set(states("restart").values()) == {"stopped"}
    assert set(aws.status(hosts, CONNECTIONS).values()) == {"stopped"}
    again = provision(config)
    assert [h.machine_id for h in again] == [h.machine_id for h in hosts]
    assert set(states("restart").values()) == {"running"}
    assert set(aws.status(again, CONNECTIONS).values()) == {"running"}


def test_number_and_explode_decide_instances_and_their_cpus(
    tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any]
) -> None:
    config = make_config(
        tmp_path,
        "counts",
        [
            instance(ami, type="t3.micro", number=2),  # 2 vCPUs each
            instance(ami, type="c5.xlarge", cpus=10, explode=True),  # 4 vCPUs: 4 + 4 + 2
            instance(ami, type="c5.xlarge", cpus=6, explode=True, number=2),  # twice 4 + 2
            instance(ami, type="c5.xlarge", cpus=3),  # fewer than the type has: no split
        ],
    )
    hosts = provision(config)
    assert [(h.name, h.cpus) for h in hosts] == [
        ("aws-0.0", 2),
        ("aws-0.1", 2),
        ("aws-1.0", 4),
        ("aws-1.1", 4),
        ("aws-1.2", 2),
        ("aws-2.0.0", 4),
        ("aws-2.0.1", 2),
        ("aws-2.1.0", 4),
        ("aws-2.1.1", 2),
        ("aws-3", 3),
    ]
    launched = described("counts")
    assert len(launched) == 10 and len({i["InstanceId"] for i in launched}) == 10
    by_rank = {tag(i, "cloudsend:rank"): i["InstanceType"] for i in launched}
    assert by_rank == {
        h.name.removeprefix("aws-"): ("t3.micro" if h.name.startswith("aws-0") else "c5.xlarge") for h in hosts
    }


def test_invalid_image_lists_usable_images_and_creates_nothing(
    tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any]
) -> None:
    bad = instance(ami)
    bad["img_id"] = "ami-0123456789abcdef0"
    with pytest.raises(aws_session.AwsError, match="ami-0123456789abcdef0 does not exist in eu-west-1") as err:
        provision(make_config(tmp_path, "badimg", [bad]))
    listed = [line.split()[0] for line in str(err.value).splitlines()[1:]]
    assert listed, str(err.value)
    images = ec2().describe_images(ImageIds=listed)["Images"]
    assert {i["ImageId"] for i in images} == set(listed)
    assert not [i["Name"] for i in images if i.get("Platform") == "windows"]  # cloudsend cannot use those
    assert described("badimg") == []


# -- capacity -------------------------------------------------------------------------------------------
def test_no_capacity_tries_the_fallback_types_in_order(
    tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any], wire: Wire, caplog: pytest.LogCaptureFixture
) -> None:
    wire.faults.append(no_capacity("c5.xlarge", "m5.xlarge"))
    caplog.set_level(logging.WARNING, logger="cloudsend.aws")
    config = make_config(
        tmp_path, "fallback", [instance(ami, type="c5.xlarge", fallback_types=["m5.xlarge", "t3.large"])]
    )
    (host,) = provision(config)
    assert [b["InstanceType"] for b in wire.sent("RunInstances")] == ["c5.xlarge", "m5.xlarge", "t3.large"]
    (launched,) = described("fallback")
    assert launched["InstanceType"] == "t3.large" == aws_hosts.aws_data(host).instance_type
    assert host.cpus == 2  # the CPUs of what was launched (t3.large), not of the type asked for (4)
    assert "no capacity for c5.xlarge" in caplog.text and "no capacity for m5.xlarge" in caplog.text


def test_no_capacity_in_a_zone_tries_the_next_zone(
    tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any], wire: Wire
) -> None:
    subnets = {s["AvailabilityZone"]: s["SubnetId"] for s in ec2().describe_subnets()["Subnets"]}
    wire.faults.append(no_capacity(subnets=(subnets["eu-west-1a"],)))
    provision(make_config(tmp_path, "zones", [instance(ami, zones=["eu-west-1a", "eu-west-1b"])]))
    (launched,) = described("zones")
    assert launched["Placement"]["AvailabilityZone"] == "eu-west-1b"


def test_no_capacity_anywhere_is_a_clear_error_and_leaves_nothing(
    tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any], wire: Wire
) -> None:
    wire.faults.append(no_capacity("c5.xlarge", "t3.large"))
    config = make_config(tmp_path, "nocap", [instance(ami, type="c5.xlarge", fallback_types=["t3.large"], number=2)])
    with pytest.raises(aws_session.AwsError) as err:
        provision(config)
    message = str(err.value)
    assert "no capacity or quota left" in message and "fallback_types" in message
    assert "c5.xlarge in subnet-" in message and "t3.large in subnet-" in message
    assert "InsufficientInstanceCapacity" in message
    assert described("nocap") == []


# -- failures while provisioning ------------------------------------------------------------------------
def test_failure_of_one_launch_terminates_every_instance_this_call_created(
    tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any], wire: Wire
) -> None:
    wire.faults.append(lambda op, body: "InternalError" if op == "RunInstances" and rank_of(body) == "0.1" else None)
    config = make_config(tmp_path, "midway", [instance(ami, number=3)])
    with pytest.raises(Exception, match="InternalError"):
        provision(config)
    launched = described("midway")
    assert len(launched) == 2  # ranks 0.0 and 0.2 were created...
    assert not ALIVE & set(states("midway").values())  # ...and terminated: nothing left running or pending


def test_an_instance_whose_launch_answer_was_lost_is_terminated_too(
    tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any], wire: Wire
) -> None:
    # EC2 made the instance but the answer never arrived (a timeout, a dropped connection): the provider
    # does not know its id, yet it must not be left running.
    wire.lost_answers.append(
        lambda op, body: "RequestTimeout" if op == "RunInstances" and rank_of(body) == "0.1" else None
    )
    with pytest.raises(Exception, match="RequestTimeout"):
        provision(make_config(tmp_path, "lost", [instance(ami, number=3)]))
    by_rank = {tag(i, "cloudsend:rank"): i["State"]["Name"] for i in described("lost")}
    assert by_rank == {"0.0": "terminated", "0.1": "terminated", "0.2": "terminated"}


def test_failure_after_a_first_type_is_up_terminates_it_but_not_reused_instances(
    tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = provision(make_config(tmp_path, "later", [instance(ami)]))  # an earlier run's instance, reused below
    config = make_config(tmp_path, "later", [instance(ami), instance(ami, type="c5.xlarge", number=2)])
    resolve = aws.ADDRESS_RESOLVERS[LOOPBACK]

    def broken(inst: dict[str, Any]) -> aws_addresses.Endpoint:
        if tag(inst, "cloudsend:rank") == "1.1":
            raise RuntimeError("resolver exploded")
        return resolve(inst)

    monkeypatch.setitem(aws.ADDRESS_RESOLVERS, LOOPBACK, broken)
    with pytest.raises(RuntimeError, match="resolver exploded"):
        provision(config)
    by_rank = {tag(i, "cloudsend:rank"): i["State"]["Name"] for i in described("later")}
    assert by_rank == {"0": "running", "1.0": "terminated", "1.1": "terminated"}
    assert states("later")[kept[0].machine_id or ""] == "running"
    # No connection of the failed call stays cached for the next run's host of the same name.
    assert not {"aws-0", "aws-1.0"} & CONNECTIONS.names()


# -- teardown and down ----------------------------------------------------------------------------------
def test_teardown_stops_on_demand_and_terminates_spot_or_everything_when_asked(
    tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any]
) -> None:
    config = make_config(tmp_path, "teardown", [instance(ami), instance(ami, eco=True)])
    hosts = provision(config)
    aws.teardown(hosts)
    # a one-time spot cannot stop
    assert aws.status(hosts, CONNECTIONS) == {"aws-0": "stopped", "aws-1": "terminated"}
    hosts = provision(config)
    aws.teardown(hosts, terminate=True)
    assert set(states("teardown").values()) == {"terminated"}
    assert set(aws.status(hosts, CONNECTIONS).values()) == {"terminated"}


def test_teardown_and_status_take_instances_already_gone_in_their_stride(
    tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any]
) -> None:
    hosts = provision(make_config(tmp_path, "gone-already", [instance(ami, number=3)]))
    ec2().terminate_instances(InstanceIds=[hosts[0].machine_id or ""])  # e.g. by its idle timer
    forgotten = hosts[1].model_copy(update={"machine_id": "i-0123456789abcdef0"})  # EC2 no longer knows it
    hosts = [hosts[0], forgotten, hosts[2]]
    aws.teardown(hosts)
    health = aws.status(hosts, CONNECTIONS)
    assert health == {"aws-0.0": "terminated", "aws-0.1": "terminated", "aws-0.2": "stopped"}
    assert states("gone-already")[hosts[0].machine_id or ""] == "terminated"  # not brought back as stopped
    aws.teardown(hosts)  # a second teardown (everything already stopped or gone) is a no-op
    aws.teardown(hosts, terminate=True)
    assert set(aws.status(hosts, CONNECTIONS).values()) == {"terminated"}


def test_cloudsend_down_removes_instances_group_and_key_of_the_project_only(
    tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any]
) -> None:
    provision(make_config(tmp_path, "other", [instance(ami)]))
    provision(make_config(tmp_path, "gone", [instance(ami, number=2)]))
    aws.teardown(provision(make_config(tmp_path, "gone", [instance(ami, type="c5.xlarge")])))  # a stopped one
    path = tmp_path / "down.yaml"
    path.write_text(
        yaml.safe_dump({"project": "gone", "provider": "aws", "ssh_from": [CIDR], "instances": [instance(ami)]})
    )
    result = CliRunner().invoke(app, ["down", str(path), "--yes"])
    assert result.exit_code == 0, result.output
    ids = [i["InstanceId"] for i in described("gone")]
    for instance_id in ids:
        assert f"instance {instance_id}" in result.output
    assert "security group" in result.output and "key pair cloudsend-gone-" in result.output
    assert set(states("gone").values()) == {"terminated"}
    client = ec2()
    names = [g["GroupName"] for g in client.describe_security_groups()["SecurityGroups"]]
    assert "cloudsend-gone" not in names and "cloudsend-other" in names
    pairs = [k["KeyName"] for k in client.describe_key_pairs()["KeyPairs"]]
    assert not any(p.startswith("cloudsend-gone-") for p in pairs)
    assert any(p.startswith("cloudsend-other-") for p in pairs)
    assert not (aws_env.config_home / "cloudsend" / "keys" / "gone-eu-west-1.pem").exists()
    assert set(states("other").values()) == {"running"}  # another project is left alone

    again = CliRunner().invoke(app, ["down", str(path), "--yes"])
    assert again.exit_code == 0 and "nothing to remove" in again.output


# -- credentials ----------------------------------------------------------------------------------------
def test_profile_credentials_are_used_without_a_block(
    tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    config_file, credentials_file = tmp_path / "aws-config", tmp_path / "aws-credentials"
    config_file.write_text(f"[profile batchy]\nregion = eu-west-1\nendpoint_url = {aws_env.endpoint}\n")
    credentials_file.write_text("[batchy]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config_file))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials_file))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name)
    (host,) = provision(make_config(tmp_path, "profiled", [instance(ami)], profile="batchy"))
    data = aws_hosts.aws_data(host)
    assert (data.aws_profile, data.region) == ("batchy", "eu-west-1")
    assert [i["InstanceId"] for i in described("profiled")] == [host.machine_id]


# -- whole batches --------------------------------------------------------------------------------------
def square_jobs(count: int) -> list[dict[str, Any]]:
    return [
        {
            "name": f"sq-{i}",
            "run_command": f"echo {i} squared is $(( {i} * {i} )) > out.txt; pwd > where.txt",
            "output_files": ["out.txt", "where.txt"],
        }
        for i in range(count)
    ]


def run_batch(tmp_path: Path, config: dict[str, Any], **kw: Any) -> Any:
    project = tmp_path / "proj"
    project.mkdir(exist_ok=True)
    path = project / "batch.yaml"
    path.write_text(yaml.safe_dump(config))
    if kw.get("return_state"):
        return cloudsend(config=str(path), results_dir=str(tmp_path / "results"), **kw)
    return flow.run_batch(config=str(path), results_dir=str(tmp_path / "results"), **kw)  # the summary, even failed


def batch(project: str, ami: dict[str, Any], instances: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "project": project,
        "provider": "aws",
        "ssh_from": [CIDR],
        "poll_interval": 0.2,
        "instances": instances,
        **extra,
    }


def unique(stem: str) -> str:
    """Projects name the batch directories on the shared sshd hosts: one per test run."""
    return f"{stem}-{uuid.uuid4().hex[:6]}"


def test_batch_runs_on_ec2_instances_reached_over_ssh_then_stops_them(
    tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any], sshd_hosts: list[SshdHost], wire: Wire
) -> None:
    project = unique("e2e")
    config = batch(
        project,
        ami,
        [instance(ami, number=2, cpus=2), instance(ami, type="c5.xlarge", cpus=2, eco=True, max_bid=0.1)],
        jobs=square_jobs(9),
    )
    summary = run_batch(tmp_path, config)
    assert isinstance(summary, BatchSummary)
    assert summary.ok, [(j.name, j.reason) for j in summary.jobs if not j.ok]
    results = tmp_path / "results" / project
    for i in range(9):
        assert (results / f"sq-{i}" / "out.txt").read_text() == f"{i} squared is {i * i}\n"
    assert {j.host for j in summary.jobs} == {"aws-0.0", "aws-0.1", "aws-1"}  # every instance took work
    # ...on the sshd host its instance resolved to: the job ran in that host's home.
    slot = aws_env.resolver.slots
    for job in summary.jobs:
        sshd = sshd_hosts[slot[(job.host or "").removeprefix("aws-")]]
        where = (results / job.name / "where.txt").read_text().strip()
        assert where.startswith(str(sshd.home / ".cloudsend" / "jobs" / project)), where

    # Teardown: on-demand instances stopped, the spot one terminated; nothing left running.
    by_rank = {tag(i, "cloudsend:rank"): i["State"]["Name"] for i in described(project)}
    assert by_rank == {"0.0": "stopped", "0.1": "stopped", "1": "terminated"}
    assert len(wire.sent("RunInstances")) == 3
    # Host keys pinned per instance id, outside the working directory.
    pins = sorted(p.name for p in (aws_env.config_home / "cloudsend" / "known_hosts").iterdir())
    assert pins == sorted(i["InstanceId"] for i in described(project))


def test_auto_stop_terminate_removes_the_instances(
    tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any], sshd_hosts: list[SshdHost]
) -> None:
    project = unique("term")
    config = batch(project, ami, [instance(ami, number=2, cpus=1)], jobs=square_jobs(2), auto_stop="terminate")
    assert run_batch(tmp_path, config).ok
    assert set(states(project).values()) == {"terminated"}


def test_auto_stop_false_keeps_them_running_and_says_how_to_remove_them(
    tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any], sshd_hosts: list[SshdHost], caplog: pytest.LogCaptureFixture
) -> None:
    project = unique("keep")
    config = batch(project, ami, [instance(ami, number=2, cpus=1)], jobs=square_jobs(2), auto_stop=False)
    assert run_batch(tmp_path, config).ok
    running = states(project)
    assert set(running.values()) == {"running"}
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    warnings = [m for m in warnings if "kept running" in m]
    assert len(warnings) == 1, caplog.text
    assert f"cloudsend down --project {project}" in warnings[0]
    assert all(instance_id in warnings[0] for instance_id in running)


def test_a_failing_job_does_not_keep_instances_running(
    tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any], sshd_hosts: list[SshdHost]
) -> None:
    project = unique("fail")
    jobs = [*square_jobs(2), {"name": "boom", "run_command": "echo broken >&2; exit 3"}]
    summary = run_batch(tmp_path, batch(project, ami, [instance(ami, number=2, cpus=1)], jobs=jobs))
    by_name = {j.name: j for j in summary.jobs}
    assert by_name["boom"].state == "failed" and by_name["boom"].exit_code == 3
    assert by_name["sq-0"].ok and by_name["sq-1"].ok
    assert set(states(project).values()) == {"stopped"}


def test_an_error_after_provisioning_still_stops_the_instances(
    tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any], sshd_hosts: list[SshdHost], monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(self: Dispatcher) -> None:
        raise RuntimeError("dispatcher exploded")

    monkeypatch.setattr(Dispatcher, "start", explode)
    project = unique("crash")
    with pytest.raises(RuntimeError, match="dispatcher exploded"):
        run_batch(tmp_path, batch(project, ami, [instance(ami, number=2, cpus=1)], jobs=square_jobs(2)))
    launched = states(project)
    assert len(launched) == 2 and set(launched.values()) == {"stopped"}


def test_an_error_while_provisioning_leaves_no_instance_running(
    tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any], sshd_hosts: list[SshdHost], wire: Wire
) -> None:
    project = unique("provfail")
    wire.faults.append(lambda op, body: "InternalError" if op == "RunInstances" and rank_of(body) == "1" else None)
    config = batch(project, ami, [instance(ami, cpus=1), instance(ami, type="c5.xlarge")], jobs=square_jobs(1))
    with pytest.raises(Exception, match="InternalError"):
        run_batch(tmp_path, config)
    launched = states(project)
    assert len(launched) == 1 and set(launched.values()) == {"terminated"}


def _flow_run_records(flow_run_id: Any) -> tuple[list[str], list[Any]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return [log.message for log in logs], artifacts


def test_credentials_from_an_aws_credentials_block_never_show_the_secret(
    tmp_path: Path,
    aws_env: AwsEnv,
    ami: dict[str, Any],
    sshd_hosts: list[SshdHost],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    cloudsend_home: Path,
) -> None:
    from prefect_aws import AwsClientParameters, AwsCredentials

    secret = f"s3cret-{uuid.uuid4().hex}"
    block = f"cs-{uuid.uuid4().hex[:8]}"
    AwsCredentials(
        aws_access_key_id="testing",
        aws_secret_access_key=secret,
        region_name="eu-west-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=aws_env.endpoint),
    ).save(block)
    # Only the block knows where EC2 is and who we are: the environment points at a closed loopback port
    # and holds no credentials, so anything bypassing the block fails (and never reaches the internet).
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    caplog.set_level(logging.DEBUG, logger="cloudsend")

    project = unique("block")
    config = batch(project, ami, [instance(ami, number=2, cpus=1)], jobs=square_jobs(3), aws_credentials=block)
    state = run_batch(tmp_path, config, return_state=True)
    summary = state.result()
    assert summary.ok, [(j.name, j.reason) for j in summary.jobs if not j.ok]
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws_env.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    assert set(states(project).values()) == {"stopped"}  # teardown found them through the block too

    flow_run_id = state.state_details.flow_run_id
    messages: list[str] = []
    artifacts: list[Any] = []
    for _ in range(50):  # the test server stores logs and artifacts asynchronously
        messages, artifacts = _flow_run_records(flow_run_id)
        if len(artifacts) >= 3 and any("batch " + project in m for m in messages):
            break
        time.sleep(0.2)
    assert len(artifacts) >= 3 and messages
    captured = capsys.readouterr()
    seen = {
        "caplog": caplog.text,
        "stdout": captured.out,
        "stderr": captured.err,
        "flow logs": "\n".join(messages),
        "artifacts": json.dumps([a.model_dump(mode="json") for a in artifacts]),
        "summary": summary.model_dump_json(),
    }
    for root in (tmp_path, cloudsend_home, *(h.home / ".cloudsend" for h in sshd_hosts)):
        for path in Path(root).rglob("*"):
            if path.is_file():
                seen[str(path)] = path.read_bytes().decode(errors="replace")
    leaks = [where for where, text in seen.items() if secret in text]
    assert leaks == []


def test_a_failure_of_another_provider_leaves_no_aws_instance_running(
    tmp_path: Path, aws_env: AwsEnv, ami: dict[str, Any], sshd_hosts: list[SshdHost]
) -> None:
    project = unique("mixed")
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    unreachable = {
        "provider": "ssh",
        "name": "gone",
        "host": "127.0.0.1",
        "port": closed,
        "user": sshd_hosts[0].user,
        "key_file": str(sshd_hosts[0].key_file),
        "host_key": sshd_hosts[0].host_public_key,
    }
    config = batch(project, ami, [instance(ami, cpus=1), unreachable], jobs=square_jobs(1))
    with pytest.raises(Exception):  # noqa: B017
        run_batch(tmp_path, config)
    assert not {"pending", "running"} & set(states(project).values())
