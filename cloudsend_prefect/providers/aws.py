"""The ``aws`` provider: EC2 instances cloudsend creates, finds again by their tags, and stops or terminates.

boto3 is imported here only. Every instance carries three tags — project, cluster hash (what the machine
is) and rank (which copy) — so a later run, or the rerun of a crashed one, reuses it instead of creating a
duplicate. Whatever fails while instances are being created, the ones this call created are terminated
before the error is raised.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import logging
import math
import os
import stat
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from cloudsend_prefect.config import BatchConfig, InstanceType
from cloudsend_prefect.hashing import digest
from cloudsend_prefect.providers.base import HostHealth, HostInfo

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
else:
    EC2Client = Any

log = logging.getLogger("cloudsend.aws")

TAG_PROJECT, TAG_CLUSTER, TAG_RANK = "cloudsend:project", "cloudsend:cluster", "cloudsend:rank"
ALIVE = ["pending", "running", "stopping", "stopped"]
CAPACITY_ERRORS = {
    "InsufficientInstanceCapacity",
    "InstanceLimitExceeded",
    "VcpuLimitExceeded",
    "MaxSpotInstanceCountExceeded",
    "SpotMaxPriceTooLow",
    "Unsupported",
    "InsufficientCapacity",
}
UBUNTU_SSM = "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"
# A GPU type's default: Ubuntu 24.04 with NVIDIA's driver and CUDA installed (AWS's Deep Learning Base AMI).
GPU_IMAGE_SSM = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id"
GPU_IMAGE_NAME = "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 24.04)*"
CANONICAL = "099720109477"
REMOTE_DIR = ".cloudsend"
# The instance metadata service as an instance sees it; host.sh reads spot interruption notices there (IMDSv2).
IMDS = "http://169.254.169.254"


class AwsError(RuntimeError):
    """An EC2 problem explained for the user (what failed, and what to do)."""


@dataclass(frozen=True)
class Endpoint:
    """Where the client's SSH connection to an instance goes; user and key only when a resolver overrides them."""

    host: str
    port: int = 22
    user: str | None = None
    key_file: str | None = None


def _public(instance: dict[str, Any]) -> Endpoint:
    if not instance.get("PublicIpAddress"):
        raise AwsError(f"{instance['InstanceId']} has no public address: set `address: private` inside the VPC")
    return Endpoint(instance["PublicIpAddress"])


# How the client reaches an instance, by the name an instance type's `address` gives. Register more (a jump
# host, a tunnel, the tests' loopback sshd hosts) by adding a function here.
ADDRESS_RESOLVERS: dict[str, Callable[[dict[str, Any]], Endpoint]] = {
    "public": _public,
    "private": lambda instance: Endpoint(instance["PrivateIpAddress"]),
}


def config_dir() -> Path:
    """Keys and known hosts live here, never in the working directory."""
    return Path(os.environ.get("XDG_CONFIG_HOME", "~/.config")).expanduser() / "cloudsend"


# -- sessions -------------------------------------------------------------------------------------------
def ec2_client(region: str | None, *, credentials: str | None = None, profile: str | None = None) -> EC2Client:
    """An EC2 client from the named AwsCredentials block, else the profile, else boto3's default chain."""
    if credentials:
        from prefect_aws import AwsCredentials

        creds: Any = AwsCredentials.load(credentials)
        if region:
            creds = creds.model_copy(update={"region_name": region})
        if not creds.region_name:
            raise AwsError(f"no region: set `region` on the instance type or in block {credentials}")
        return creds.get_client("ec2")
    import boto3

    session = boto3.Session(profile_name=profile) if profile else boto3.Session()
    region = region or session.region_name
    if not region:
        raise AwsError("no region: set `region` on the instance type, in the AWS profile, or AWS_DEFAULT_REGION")
    return session.client("ec2", region_name=region)


def _config_client(config: BatchConfig, region: str | None) -> EC2Client:
    return ec2_client(region, credentials=config.aws_credentials, profile=config.profile)


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


# -- keys and network -----------------------------------------------------------------------------------
def _path_component(what: str, value: str) -> str:
    """``value`` if it can only ever name one file inside a directory: a project or region with a separator,
    a NUL or a leading dot (``..``) would put the private key (or unlink a file) outside ``keys/``."""
    unsafe = {"/", "\\", "\0", os.sep, os.altsep or "/"}
    if not value or value.startswith(".") or any(c in value for c in unsafe) or not value.isprintable():
        raise ValueError(
            f"{what} {value!r} cannot name a key file: it must be one file name component "
            "(no '/', '\\', NUL or control characters, and no leading '.')"
        )
    return value


def key_path(config: BatchConfig, region: str) -> Path:
    """``<config_dir>/keys/<project>-<region>.pem``. Checked here as well as in the config: whatever builds a
    ``BatchConfig`` (a test, a caller skipping validation), the key is never written or removed elsewhere."""
    keys = config_dir() / "keys"
    path = keys / f"{_path_component('project', config.project)}-{_path_component('region', region)}.pem"
    if path.resolve().parent != keys.resolve():  # e.g. a symlink planted as the key file's name
        raise ValueError(f"key file {path} resolves outside {keys}")
    return path


def ensure_key(ec2: EC2Client, config: BatchConfig, region: str) -> tuple[str, Path]:
    """This project's key pair in this region: generated locally (private key 0600), imported to EC2."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = key_path(config, region)
    secret = f"{config.key_secret}-{region}" if config.key_secret else None
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # mkdir's mode leaves an existing directory (or one made under a strict umask) as it is; ssh refuses a
    # private key others can read, and the directory holds every project's keys.
    if stat.S_IMODE(path.parent.stat().st_mode) != 0o700:
        path.parent.chmod(0o700)
    if path.exists() and stat.S_IMODE(path.stat().st_mode) & 0o077:
        path.chmod(0o600)
    if not path.exists():
        private = _secret_key(secret) or Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(private)
    if secret and _secret_key(secret) is None:
        from prefect.blocks.system import Secret

        Secret(value=path.read_text()).save(secret, overwrite=True)
    key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    # Named by the key's fingerprint: a lost local key gives a new pair instead of breaking or deleting the old.
    name = f"cloudsend-{config.project}-{hashlib.sha256(public).hexdigest()[:10]}"
    existing = ec2.describe_key_pairs(Filters=[{"Name": "key-name", "Values": [name]}])["KeyPairs"]
    if not existing:
        ec2.import_key_pair(
            KeyName=name,
            PublicKeyMaterial=public,
            TagSpecifications=[{"ResourceType": "key-pair", "Tags": [{"Key": TAG_PROJECT, "Value": config.project}]}],
        )
    return name, path


def _secret_key(name: str | None) -> bytes | None:
    """The private key held in a Prefect Secret block, so a worker on another machine can reach the instances."""
    if name is None:
        return None
    from prefect.blocks.system import Secret

    try:
        block: Any = Secret.load(name)
    except ValueError:  # no such block yet
        return None
    return str(block.get()).encode()


def my_cidrs(config: BatchConfig) -> list[str]:
    """Who may reach SSH: the configured CIDRs (a bare address is a /32), else this machine's public
    address as a /32."""
    if not config.ssh_from:
        with urllib.request.urlopen("https://checkip.amazonaws.com", timeout=10) as resp:
            return [str(ipaddress.ip_network(resp.read().decode().strip()))]
    cidrs = []
    for cidr in config.ssh_from:
        try:
            cidrs.append(str(ipaddress.ip_network(cidr.strip(), strict=False)))
        except ValueError:
            raise AwsError(f"ssh_from: {cidr!r} is not an address or CIDR block (like 203.0.113.5/32)") from None
    return cidrs


SSH_PORT = 22


def _ssh_cidr(permission: dict[str, Any], cidr: str, wanted: set[str]) -> str | None:
    """The requested CIDR this range of ``permission`` is, when the rule is exactly TCP 22 from it; else None."""
    if permission.get("IpProtocol") not in ("tcp", "6"):
        return None
    if (permission.get("FromPort"), permission.get("ToPort")) != (SSH_PORT, SSH_PORT):
        return None
    try:
        network = str(ipaddress.ip_network(cidr, strict=False))  # EC2 may spell an IPv6 block differently
    except ValueError:
        return None
    return network if network in wanted else None


def _stale_ingress(permissions: list[dict[str, Any]], wanted: set[str]) -> tuple[list[dict[str, Any]], set[str]]:
    """Split a group's ingress into rules to revoke (one source each, as RevokeSecurityGroupIngress takes
    them) and the requested CIDRs already let in. Anything but TCP 22 from a requested CIDR is stale: other
    ports or protocols, other CIDRs (IPv4 or IPv6), other groups, prefix lists."""
    stale: list[dict[str, Any]] = []
    present: set[str] = set()
    for permission in permissions:
        base: dict[str, Any] = {k: permission[k] for k in ("IpProtocol", "FromPort", "ToPort") if k in permission}
        for ranges, address in (("IpRanges", "CidrIp"), ("Ipv6Ranges", "CidrIpv6")):
            for entry in permission.get(ranges) or []:
                cidr = _ssh_cidr(permission, entry[address], wanted)
                if cidr is None:
                    stale.append({**base, ranges: [{address: entry[address]}]})
                else:
                    present.add(cidr)
        for pair in permission.get("UserIdGroupPairs") or []:
            source = {k: pair[k] for k in ("GroupId", "UserId") if k in pair} or {"GroupName": pair["GroupName"]}
            stale.append({**base, "UserIdGroupPairs": [source]})
        for prefix in permission.get("PrefixListIds") or []:
            stale.append({**base, "PrefixListIds": [{"PrefixListId": prefix["PrefixListId"]}]})
    return stale, present


def _describe_rule(permission: dict[str, Any]) -> str:
    """A rule for the log: ``tcp 80 from 0.0.0.0/0``."""
    ports = (permission.get("FromPort"), permission.get("ToPort"))
    port = "" if ports == (None, None) else f" {ports[0]}" if ports[0] == ports[1] else f" {ports[0]}-{ports[1]}"
    protocol = "all traffic" if permission["IpProtocol"] == "-1" else permission["IpProtocol"]
    sources = [
        *(r["CidrIp"] for r in permission.get("IpRanges", [])),
        *(r["CidrIpv6"] for r in permission.get("Ipv6Ranges", [])),
        *(p.get("GroupId") or p.get("GroupName", "?") for p in permission.get("UserIdGroupPairs", [])),
        *(p["PrefixListId"] for p in permission.get("PrefixListIds", [])),
    ]
    return f"{protocol}{port} from {', '.join(sources)}"


def _converge_ingress(ec2: EC2Client, group: str, permissions: list[dict[str, Any]], cidrs: list[str]) -> None:
    """Make the group's ingress exactly TCP 22 from ``cidrs``, whatever it held before.

    A reused group keeps what an earlier run (``ssh_from: [0.0.0.0/0]``, an address since given up) or a
    person added by hand; adding the requested rules alone would leave that open for ever. The missing rules
    are added before the stale ones go, so a batch still running from a requested address never loses SSH.
    Another run converging the same group at once only makes these calls find their work done (Duplicate,
    NotFound), which is not an error.
    """
    wanted = set(cidrs)
    stale, present = _stale_ingress(permissions, wanted)
    for cidr in cidrs:
        if cidr in present:
            continue
        ranges, address = ("Ipv6Ranges", "CidrIpv6") if ":" in cidr else ("IpRanges", "CidrIp")
        rule = {"IpProtocol": "tcp", "FromPort": SSH_PORT, "ToPort": SSH_PORT}
        try:  # one rule per CIDR: a rule already there (Duplicate) must not keep the others out
            ec2.authorize_security_group_ingress(
                GroupId=group, IpPermissions=[{**rule, ranges: [{address: cidr, "Description": "cloudsend client"}]}]
            )
            log.info("security group %s: let in SSH from %s", group, cidr)
        except Exception as exc:
            if _code(exc) != "InvalidPermission.Duplicate":
                raise
    for permission in stale:
        try:  # one call per rule: a rule someone else already removed must not keep the others in
            answer = ec2.revoke_security_group_ingress(GroupId=group, IpPermissions=[permission])
        except Exception as exc:
            if _code(exc) != "InvalidPermission.NotFound":
                raise
            continue
        if not answer.get("UnknownIpPermissions"):  # EC2 may answer a vanished rule with this instead of NotFound
            log.warning(
                "security group %s: revoked %s (only TCP 22 from %s is let in)",
                group,
                _describe_rule(permission),
                ", ".join(cidrs),
            )


def ensure_network(ec2: EC2Client, config: BatchConfig, inst: InstanceType) -> tuple[str, list[str]]:
    """The project's security group, converged to SSH from ``my_cidrs`` only, and the subnets to try, in order."""
    if inst.cloud_id:
        vpc = inst.cloud_id
    else:
        vpcs = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise AwsError("no default VPC in this region: set `cloud_id` to the VPC to use")
        vpc = vpcs[0]["VpcId"]
    name = f"cloudsend-{config.project}"
    groups = ec2.describe_security_groups(
        Filters=[{"Name": "group-name", "Values": [name]}, {"Name": "vpc-id", "Values": [vpc]}]
    )["SecurityGroups"]
    permissions: list[dict[str, Any]] = []
    if groups:
        group = groups[0]["GroupId"]
        permissions = list(groups[0].get("IpPermissions") or [])
    else:
        group = ec2.create_security_group(
            GroupName=name,
            Description=f"cloudsend project {config.project}: SSH from the client only",
            VpcId=vpc,
            TagSpecifications=[
                {"ResourceType": "security-group", "Tags": [{"Key": TAG_PROJECT, "Value": config.project}]}
            ],
        )["GroupId"]
    _converge_ingress(ec2, group, permissions, my_cidrs(config))
    subnets = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"]
    by_zone = {s["AvailabilityZone"]: s["SubnetId"] for s in sorted(subnets, key=lambda s: not s.get("DefaultForAz"))}
    if inst.zones:
        missing = [z for z in inst.zones if z not in by_zone]
        if missing:
            raise AwsError(f"no subnet of VPC {vpc} in zone(s) {', '.join(missing)} (zones: {', '.join(by_zone)})")
        return group, [by_zone[z] for z in inst.zones]
    if not by_zone:
        raise AwsError(f"VPC {vpc} has no subnet")
    return group, [next(iter(by_zone.values()))]


# -- images and types -----------------------------------------------------------------------------------
def resolve_image(
    ec2: EC2Client, config: BatchConfig, inst: InstanceType, region: str, *, gpus: int = 0
) -> dict[str, Any]:
    """The image to boot (given; else the latest Ubuntu LTS, with NVIDIA's driver and CUDA for a type with
    ``gpus``); a bad id lists images that would work."""
    image_id = inst.img_id
    if image_id is None:
        image_id = _latest_gpu_ubuntu(ec2, config, region) if gpus else _latest_ubuntu(ec2, config, region)
    try:
        images = ec2.describe_images(ImageIds=[image_id])["Images"]
    except Exception as exc:
        if not _code(exc).startswith("InvalidAMIID"):
            raise
        images = []
    if not images:
        usable = ec2.describe_images(
            Owners=[CANONICAL, "amazon"],
            Filters=[{"Name": "architecture", "Values": ["x86_64"]}, {"Name": "state", "Values": ["available"]}],
        )["Images"]
        usable = [i for i in usable if i.get("Platform") != "windows"]  # the host runtime needs a POSIX shell
        usable = sorted(usable, key=lambda i: i.get("CreationDate", ""), reverse=True)[:10]
        listing = "\n".join(f"  {i['ImageId']}  {i.get('Name', '')}" for i in usable)
        raise AwsError(f"image {image_id} does not exist in {region}; usable images there include:\n{listing}")
    return images[0]


def _latest_ubuntu(ec2: EC2Client, config: BatchConfig, region: str) -> str:
    return _published_image(
        ec2, config, region, UBUNTU_SSM, CANONICAL, "ubuntu/images/*ubuntu-*-24.04-amd64-server-*", "Ubuntu LTS"
    )


def _latest_gpu_ubuntu(ec2: EC2Client, config: BatchConfig, region: str) -> str:
    return _published_image(ec2, config, region, GPU_IMAGE_SSM, "amazon", GPU_IMAGE_NAME, "Deep Learning Base GPU")


def _published_image(
    ec2: EC2Client, config: BatchConfig, region: str, parameter: str, owner: str, name: str, what: str
) -> str:
    """The newest image of a kind: from the SSM public parameter its publisher keeps current, else the newest of
    the publisher's images by that name (an account without SSM access)."""
    import boto3

    try:
        ssm = boto3.Session(profile_name=config.profile).client("ssm", region_name=region)
        return str(ssm.get_parameter(Name=parameter)["Parameter"]["Value"])
    except Exception:
        images = ec2.describe_images(Owners=[owner], Filters=[{"Name": "name", "Values": [name]}])["Images"]
        if not images:
            raise AwsError(f"cannot find the latest {what} image in {region}: set `img_id`") from None
        return str(max(images, key=lambda i: i.get("CreationDate", ""))["ImageId"])


# The login user an image's own cloud-init creates, found by a word of the image's name or description (the
# first that matches): what `img_username` defaults to, so an image of any of these needs no setting.
IMAGE_USERS = (
    ("ubuntu", "ubuntu"),
    ("debian", "admin"),
    ("al2023", "ec2-user"),
    ("amzn", "ec2-user"),
    ("amazon linux", "ec2-user"),
    ("rhel", "ec2-user"),
    ("red hat", "ec2-user"),
    ("suse", "ec2-user"),
    ("almalinux", "ec2-user"),
    ("centos", "centos"),
    ("fedora", "fedora"),
    ("rocky", "rocky"),
)
DEFAULT_USER = "ubuntu"  # the default image's, and the guess for an image none of the words names
_image_users: dict[tuple[str, str], str] = {}  # (region, image id) -> login user, looked up once per process


def login_user(image: dict[str, Any]) -> str:
    """The login user of ``image`` (a ``describe_images`` entry): ubuntu, admin (Debian), ec2-user (Amazon Linux,
    RHEL, SUSE)..., else ``DEFAULT_USER``."""
    text = f"{image.get('Name', '')} {image.get('Description', '')}".lower()
    return next((user for word, user in IMAGE_USERS if word in text), DEFAULT_USER)


def _image_user(config: BatchConfig, inst: InstanceType, region: str, image_id: str | None) -> str:
    """The login user of the image an instance was booted from (its id is all the instance says of it)."""
    if not image_id:
        return DEFAULT_USER
    if (region, image_id) not in _image_users:
        try:
            images = _config_client(config, inst.region).describe_images(ImageIds=[image_id])["Images"]
        except Exception as exc:  # an image deregistered since: its instances keep running
            if not _code(exc).startswith("InvalidAMIID"):
                raise
            images = []
        _image_users[(region, image_id)] = login_user(images[0]) if images else DEFAULT_USER
    return _image_users[(region, image_id)]


@dataclass(frozen=True)
class _Shape:
    vcpus: int
    gpus: int


def shape_of(ec2: EC2Client, instance_type: str) -> _Shape:
    """A type's vCPUs and GPUs, as EC2 describes it."""
    try:
        info = ec2.describe_instance_types(InstanceTypes=[instance_type])["InstanceTypes"][0]
    except Exception as exc:
        raise AwsError(f"unknown instance type {instance_type!r}: {exc}") from None
    gpus = sum(int(gpu.get("Count", 0)) for gpu in info.get("GpuInfo", {}).get("Gpus", []))
    return _Shape(int(info["VCpuInfo"]["DefaultVCpus"]), gpus)


# -- instances ------------------------------------------------------------------------------------------
@dataclass
class _Want:
    rank: str
    cpus: int
    gpus: int = 0
    name: str | None = None  # the host's name, when not the one its rank gives (a replacement's)


def _wanted(inst: InstanceType, index: int, vcpus: int, gpus: int = 0) -> list[_Want]:
    """Ranks, CPUs and GPUs: `number` copies, each split over several instances when `explode` asks for it
    (each of them with all the type's GPUs, or the instance type's `gpus`)."""
    cpus = inst.cpus or vcpus
    parts = math.ceil(cpus / vcpus) if inst.explode and cpus > vcpus else 1
    wants = []
    for copy in range(inst.number):
        left = cpus
        for part in range(parts):
            share = min(vcpus, left) if parts > 1 else cpus
            left -= share
            rank = str(index) + (f".{copy}" if inst.number > 1 else "") + (f".{part}" if parts > 1 else "")
            wants.append(_Want(rank, share, gpus if inst.gpus is None else inst.gpus))
    return wants


def cluster_hash(inst: InstanceType, region: str) -> str:
    """What the machine is: instances differing in any of this are never reused for each other."""
    fields = ("type", "img_id", "disk_size", "disk_type", "eco", "max_bid", "cloud_id")
    # "gpu": the retired key, always None now, kept in the digest so that existing hashes are unchanged
    return digest({"region": region, **{f: getattr(inst, f) for f in fields}, "gpu": None})[:12]


DEADMAN = files("cloudsend_prefect.providers").joinpath("deadman.sh").read_text()  # see deadman.sh
DEADMAN_UNIT = "cloudsend-deadman.service"


def idle_seconds(config: BatchConfig) -> int:
    """``idle_minutes`` as the dead-man switch takes it: whole seconds, at least one."""
    return max(1, round(config.idle_minutes * 60))


def _user_data(config: BatchConfig, busy: str | None = None) -> str:
    """cloud-init's instructions for a new instance: install the dead-man switch (deadman.sh) as a systemd
    service and enable it, so that it runs from every boot on. User data runs on the first boot only; an
    instance stopped at a batch's end and started by the next run must still power itself off if that run's
    client dies. ``busy``: a shell command that, while it succeeds, also keeps the instance up (a controller's
    running flow runs)."""
    limit = idle_seconds(config)
    # systemd's quoting: the whole assignment in double quotes, the command's own quotes escaped.
    check = "" if busy is None else 'Environment="CLOUDSEND_DEADMAN_BUSY=' + busy.replace('"', '\\"') + '"\n'
    unit = f"""[Unit]
Description=cloudsend dead-man switch: power off after {limit}s without a running job or a client

[Service]
{check}ExecStart=/usr/local/bin/cloudsend-deadman {limit}
Restart=always
RestartSec=30

[Install]
WantedBy=multi-user.target
"""
    cloud_config = {
        "write_files": [
            {"path": "/usr/local/bin/cloudsend-deadman", "permissions": "0755", "content": DEADMAN},
            {"path": f"/etc/systemd/system/{DEADMAN_UNIT}", "permissions": "0644", "content": unit},
        ],
        # --no-block: cloud-init's own unit is still starting; waiting for another unit from it could deadlock
        "runcmd": [["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", "--no-block", DEADMAN_UNIT]],
    }
    return "#cloud-config\n" + yaml.dump(cloud_config, Dumper=_Literal, sort_keys=False, width=1000)


class _Literal(yaml.SafeDumper):
    """YAML with multi-line strings as literal blocks: the user data stays readable on the instance
    (/var/lib/cloud/instance/user-data.txt)."""


def _text(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_Literal.add_representer(str, _text)


PROVISIONED_IOPS = ("io1", "io2")


def _root_volume(mapped: dict[str, Any], size: int | None, volume_type: str | None) -> dict[str, Any]:
    """The image's root EBS settings with the size and type asked for; io1/io2 get the IOPS EC2 requires."""
    root: dict[str, Any] = {k: v for k, v in mapped.items() if k in ("SnapshotId", "VolumeSize", "VolumeType")}
    kind = volume_type or root.get("VolumeType")
    if kind == mapped.get("VolumeType"):  # the image's IOPS and throughput belong to its own volume type
        if kind in (*PROVISIONED_IOPS, "gp3") and "Iops" in mapped:
            root["Iops"] = mapped["Iops"]
        if kind == "gp3" and "Throughput" in mapped:
            root["Throughput"] = mapped["Throughput"]
    root["DeleteOnTermination"] = True
    if size:
        root["VolumeSize"] = size
    if volume_type:
        root["VolumeType"] = volume_type
    if kind in PROVISIONED_IOPS and "Iops" not in root:
        # EC2 refuses io1/io2 without Iops: gp3's baseline, within io1's limit of 50 IOPS per GiB.
        root["Iops"] = max(100, min(3000, 50 * int(root.get("VolumeSize") or 8)))
    return root


def _run_params(
    config: BatchConfig, inst: InstanceType, image: dict[str, Any], key: str, group: str, want: _Want, cluster: str
) -> dict[str, Any]:
    root_name = image.get("RootDeviceName", "/dev/sda1")
    # The image's own root volume (snapshot, size), resized or retyped as asked, on its real device name.
    mappings = image.get("BlockDeviceMappings", [])
    mapped: dict[str, Any] = next((m.get("Ebs", {}) for m in mappings if m["DeviceName"] == root_name), {})
    root = _root_volume(mapped, inst.disk_size, inst.disk_type)
    tags = [
        {"Key": "Name", "Value": f"cloudsend-{config.project}-{want.rank}"},
        {"Key": TAG_PROJECT, "Value": config.project},
        {"Key": TAG_CLUSTER, "Value": cluster},
        {"Key": TAG_RANK, "Value": want.rank},
    ]
    params: dict[str, Any] = {
        "ImageId": image["ImageId"],
        "MinCount": 1,
        "MaxCount": 1,
        "KeyName": key,
        "SecurityGroupIds": [group],
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
        "InstanceInitiatedShutdownBehavior": "terminate" if config.auto_stop == "terminate" or inst.eco else "stop",
        "UserData": _user_data(config),
        "TagSpecifications": [{"ResourceType": "instance", "Tags": tags}, {"ResourceType": "volume", "Tags": tags}],
    }
    if inst.disk_size or inst.disk_type:
        params["BlockDeviceMappings"] = [{"DeviceName": root_name, "Ebs": root}]
    if inst.eco:
        spot: dict[str, Any] = {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}
        if inst.max_bid:
            spot["MaxPrice"] = f"{inst.max_bid:g}"
        params["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": spot}
    return params


@dataclass
class _Launches:
    """What one ``provision`` call asked EC2 for, so that its failure can take all of it back."""

    created: list[tuple[EC2Client, str]] = field(default_factory=list)
    # (client, cluster hash, client token) of every run_instances sent, answered or not
    requested: list[tuple[EC2Client, str, str]] = field(default_factory=list)
    contacted: list[HostInfo] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def undo(self, project: str) -> None:
        """Terminate every instance this call created, including any whose run_instances answer was lost
        (a timeout, a dropped connection): those are found by their tags and client token."""
        from cloudsend_prefect.providers import disconnect

        # Connections are cached by host name for the process: none may outlive its instance and be handed
        # to the next run's host of the same name.
        disconnect(self.contacted)
        doomed: dict[int, tuple[EC2Client, set[str]]] = {}
        for ec2, instance_id in self.created:
            doomed.setdefault(id(ec2), (ec2, set()))[1].add(instance_id)
        searches: dict[tuple[int, str], tuple[EC2Client, set[str]]] = {}
        for ec2, cluster, token in self.requested:
            searches.setdefault((id(ec2), cluster), (ec2, set()))[1].add(token)
        for (_, cluster), (ec2, tokens) in searches.items():
            try:
                for instance in _find(ec2, project, cluster):
                    if instance.get("ClientToken") in tokens:
                        doomed.setdefault(id(ec2), (ec2, set()))[1].add(instance["InstanceId"])
            except Exception as exc:  # the original error matters more; the instances' idle timer remains
                log.warning("could not look for instances of unanswered launch requests: %s", exc)
        for ec2, ids in doomed.values():
            try:
                ec2.terminate_instances(InstanceIds=sorted(ids))
                log.error("provisioning failed: terminated the instance(s) it had created: %s", ", ".join(sorted(ids)))
            except Exception as exc:
                log.error(
                    "provisioning failed and %s could not be terminated (%s): remove them with `cloudsend down`",
                    ", ".join(sorted(ids)),
                    exc,
                )


def _create(
    ec2: EC2Client, params: dict[str, Any], types: list[str], subnets: list[str], launches: _Launches, cluster: str
) -> dict[str, Any]:
    """run_instances over (type, subnet) choices in order until one has capacity."""
    tried = []
    for instance_type in types:
        for subnet in subnets:
            # Our own idempotency token: retries of one request make one instance, and an instance whose
            # answer never arrived can still be found (and removed) by it.
            token = f"cloudsend-{uuid.uuid4().hex}"
            with launches.lock:
                launches.requested.append((ec2, cluster, token))
            try:
                return ec2.run_instances(**params, InstanceType=instance_type, SubnetId=subnet, ClientToken=token)[
                    "Instances"
                ][0]
            except Exception as exc:
                if _code(exc) not in CAPACITY_ERRORS:
                    raise
                tried.append(f"{instance_type} in {subnet}: {_code(exc)}")
                log.warning("no capacity for %s in %s (%s); trying the next choice", instance_type, subnet, _code(exc))
    raise AwsError(
        "no capacity or quota left for any choice:\n  " + "\n  ".join(tried) + "\nadd `fallback_types` "
        "or `zones`, or ask AWS for a higher quota"
    )


def _find(ec2: EC2Client, project: str, cluster: str | None = None) -> Iterator[dict[str, Any]]:
    filters = [{"Name": f"tag:{TAG_PROJECT}", "Values": [project]}, {"Name": "instance-state-name", "Values": ALIVE}]
    if cluster:
        filters.append({"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster]})
    for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
        for reservation in page["Reservations"]:
            yield from reservation["Instances"]


def _tag(instance: dict[str, Any], key: str) -> str | None:
    return next((t["Value"] for t in instance.get("Tags", []) if t["Key"] == key), None)


def provision(config: BatchConfig, instances: list[tuple[int, InstanceType]], *, create: bool = True) -> list[HostInfo]:
    hosts: list[HostInfo] = []
    launches = _Launches()
    try:
        for index, inst in instances:
            hosts += _provision_type(config, index, inst, create, launches)
    except BaseException:
        launches.undo(config.project)  # nothing this call created outlives its failure
        raise
    return hosts


def _provision_type(
    config: BatchConfig,
    index: int,
    inst: InstanceType,
    create: bool,
    launches: _Launches,
    only: _Want | None = None,
) -> list[HostInfo]:
    """The hosts of one instance type (``only``: just this one of them)."""
    if not inst.type:
        raise AwsError(f"instances[{index}].type: required for the aws provider (e.g. t3.large)")
    ec2 = _config_client(config, inst.region)
    region = ec2.meta.region_name
    cluster = cluster_hash(inst, region)
    shapes = {inst.type: shape_of(ec2, inst.type)}
    wants = [only] if only is not None else _wanted(inst, index, shapes[inst.type].vcpus, shapes[inst.type].gpus)

    def fitted(want: _Want, instance: dict[str, Any]) -> _Want:
        """An instance of a fallback type offers that type's vCPUs and GPUs (unless `cpus`, `gpus` say)."""
        kind = instance.get("InstanceType") or inst.type or ""
        if kind == inst.type:
            return want
        if kind not in shapes:
            shapes[kind] = shape_of(ec2, kind)
        cpus = want.cpus if inst.cpus is not None else shapes[kind].vcpus
        return dataclasses.replace(want, cpus=cpus, gpus=want.gpus if inst.gpus is not None else shapes[kind].gpus)

    existing = {_tag(i, TAG_RANK): i for i in _find(ec2, config.project, cluster)}
    if not create:
        return [
            _host(config, inst, index, fitted(w, existing[w.rank]), existing[w.rank], region)
            for w in wants
            if w.rank in existing
        ]
    key, _ = ensure_key(ec2, config, region)
    group, subnets = ensure_network(ec2, config, inst)
    image = resolve_image(ec2, config, inst, region, gpus=shapes[inst.type].gpus)
    # A pending one is waited for below with the new ones; only stopping or stopped ones need a start.
    stopped = [
        i["InstanceId"] for w in wants if (i := existing.get(w.rank)) and i["State"]["Name"] in ("stopping", "stopped")
    ]
    if stopped:
        _start(ec2, stopped)

    def one(want: _Want) -> dict[str, Any]:
        if want.rank in existing:
            log.info("reusing %s for rank %s", existing[want.rank]["InstanceId"], want.rank)
            return existing[want.rank]
        params = _run_params(config, inst, image, key, group, want, cluster)
        instance = _create(ec2, params, [inst.type or "", *inst.fallback_types], subnets, launches, cluster)
        with launches.lock:
            launches.created.append((ec2, instance["InstanceId"]))
        log.info("created %s (%s) for rank %s", instance["InstanceId"], instance["InstanceType"], want.rank)
        return instance

    with ThreadPoolExecutor(max_workers=min(16, len(wants))) as pool:
        launched = list(pool.map(one, wants))
    ids = [i["InstanceId"] for i in launched]
    ec2.get_waiter("instance_running").wait(InstanceIds=ids, WaiterConfig={"Delay": 5, "MaxAttempts": 120})
    described = {
        i["InstanceId"]: i for r in ec2.describe_instances(InstanceIds=ids)["Reservations"] for i in r["Instances"]
    }
    fresh = {instance_id for _, instance_id in launches.created}
    hosts = [
        _host(config, inst, index, fitted(w, i), described[i["InstanceId"]], region, i["InstanceId"] in fresh)
        for w, i in zip(wants, launched, strict=True)
    ]
    launches.contacted += hosts
    with ThreadPoolExecutor(max_workers=min(16, len(hosts))) as pool:
        list(pool.map(_wait_for_ssh, hosts))
    return hosts


def replace(config: BatchConfig, lost: HostInfo, name: str) -> HostInfo:
    """A new instance, host ``name``, in place of a lost one: the same instance type of the config, so the
    same image, disk, market, key, security group and tags, its rank included (a later run finds it as that
    rank). The lost instance, if EC2 still has it (stopped, or running but unreachable), is terminated first:
    one instance per rank, and none billing for a host the batch gave up. Whatever fails, the instance this
    call created is terminated before the error is raised."""
    ec2 = _client_for(lost)
    found = _describe(ec2, [lost.instance_id or ""])
    rank = _tag(found[0], TAG_RANK) if found else None
    index = int(rank.split(".")[0]) if rank and rank.split(".")[0].isdigit() else -1
    if rank is None or not 0 <= index < len(config.instances):
        raise AwsError(f"cannot replace {lost.name}: EC2 has no instance {lost.instance_id} of this config's any more")
    if found[0]["State"]["Name"] in ALIVE:
        ec2.terminate_instances(InstanceIds=[found[0]["InstanceId"]])
        log.info("terminated %s (host %s, lost) to replace it", found[0]["InstanceId"], lost.name)
    launches = _Launches()
    try:
        (host,) = _provision_type(
            config, index, config.instances[index], True, launches, only=_Want(rank, lost.cpus, lost.gpus, name=name)
        )
    except BaseException:
        launches.undo(config.project)
        raise
    return host


def _wait_for_ssh(host: HostInfo, timeout: float = 600) -> None:
    """Running is not reachable: sshd starts a while after the instance does."""
    from cloudsend_prefect.providers import connect
    from cloudsend_prefect.transport import TransportError

    deadline = time.monotonic() + timeout
    while True:
        try:
            connect(host).run("true", timeout=30)
            return
        except (TransportError, TimeoutError, OSError) as exc:
            if time.monotonic() > deadline:
                msg = f"{host.name} ({host.instance_id}) runs but SSH did not answer in {timeout:.0f}s: {exc}"
                raise AwsError(msg) from exc
            time.sleep(3)


def _start(ec2: EC2Client, ids: list[str]) -> None:
    ec2.get_waiter("instance_stopped").wait(InstanceIds=ids, WaiterConfig={"Delay": 5, "MaxAttempts": 120})
    ec2.start_instances(InstanceIds=ids)


def _host(
    config: BatchConfig,
    inst: InstanceType,
    index: int,
    want: _Want,
    instance: dict[str, Any],
    region: str,
    created: bool = False,
) -> HostInfo:
    resolver = ADDRESS_RESOLVERS.get(inst.address)
    if resolver is None:
        raise AwsError(f"instances[{index}].address: unknown {inst.address!r} (known: {', '.join(ADDRESS_RESOLVERS)})")
    endpoint = resolver(instance)
    known_hosts = config_dir() / "known_hosts" / instance["InstanceId"]
    known_hosts.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    spot = instance.get("InstanceLifecycle") == "spot"
    return HostInfo(
        name=want.name or f"{inst.name or 'aws'}-{want.rank}",
        provider="aws",
        cpus=want.cpus,
        gpus=want.gpus,
        base_dir=REMOTE_DIR,
        address=endpoint.host,
        port=endpoint.port,
        user=endpoint.user or inst.img_username or _image_user(config, inst, region, instance.get("ImageId")),
        key_file=endpoint.key_file or str(key_path(config, region)),
        # A new instance's key is trusted on first contact and pinned per instance id from then on
        # (addresses are recycled between instances, so they cannot key the pin).
        known_hosts=str(known_hosts),
        accept_new_host_key=True,
        instance_id=instance["InstanceId"],
        instance_type=instance.get("InstanceType"),
        spot=spot,
        idle_seconds=idle_seconds(config),
        imds=IMDS if spot else None,
        region=region,
        aws_credentials=config.aws_credentials,
        aws_profile=config.profile,
        created=created,
    )


# -- status and teardown --------------------------------------------------------------------------------
def _by_region(hosts: list[HostInfo]) -> dict[str | None, list[HostInfo]]:
    groups: dict[str | None, list[HostInfo]] = {}
    for host in hosts:
        if host.instance_id:
            groups.setdefault(host.region, []).append(host)
    return groups


def _client_for(host: HostInfo) -> EC2Client:
    return ec2_client(host.region, credentials=host.aws_credentials, profile=host.aws_profile)


def _describe(ec2: EC2Client, ids: list[str]) -> list[dict[str, Any]]:
    """The instances among ``ids`` that EC2 still knows. By filter, not by id: an id EC2 has forgotten (long
    terminated) is simply absent instead of failing the whole call."""
    found: list[dict[str, Any]] = []
    for start in range(0, len(ids), 100):  # EC2 takes at most 200 values per filter
        chunk = ids[start : start + 100]
        pages = ec2.get_paginator("describe_instances").paginate(Filters=[{"Name": "instance-id", "Values": chunk}])
        found += [i for page in pages for r in page["Reservations"] for i in r["Instances"]]
    return found


def status(hosts: list[HostInfo]) -> dict[str, HostHealth]:
    """Each instance's state from the EC2 API (the evidence that decides whether a host is lost)."""
    health: dict[str, HostHealth] = {}
    for group in _by_region(hosts).values():
        ec2 = _client_for(group[0])
        states = {i["InstanceId"]: i["State"]["Name"] for i in _describe(ec2, [h.instance_id or "" for h in group])}
        for host in group:
            state = states.get(host.instance_id or "", "terminated")
            health[host.name] = (
                "running"
                if state in ("pending", "running")
                else "stopped"
                if state in ("stopping", "stopped")
                else "terminated"
            )
    return health


def teardown(hosts: list[HostInfo], *, terminate: bool = False) -> None:
    """Stop (or terminate) the batch's instances: nothing keeps billing compute once the batch is over.

    Instances already gone (terminated, shutting down, forgotten by EC2) or already stopped are left alone;
    a failure in one region or for one kind of instance does not keep the others running.
    """
    failures = []
    for region, group in _by_region(hosts).items():
        try:
            _teardown_region(_client_for(group[0]), [h.instance_id or "" for h in group], terminate)
        except Exception as exc:
            ids = ", ".join(h.instance_id or "" for h in group)
            failures.append(f"{region or 'default region'} ({ids}): {exc}")
    if failures:
        raise AwsError(
            "could not stop or terminate every instance; remove them with `cloudsend down CONFIG`:\n  "
            + "\n  ".join(failures)
        )


def _teardown_region(ec2: EC2Client, ids: list[str], terminate: bool) -> None:
    live = [i for i in _describe(ec2, ids) if i["State"]["Name"] in ALIVE]
    # A one-time spot instance cannot be stopped: it is terminated.
    doomed = [i["InstanceId"] for i in live if terminate or i.get("InstanceLifecycle") == "spot"]
    pending = [i["InstanceId"] for i in live if i["InstanceId"] not in doomed and i["State"]["Name"] == "pending"]
    stoppable = [
        i["InstanceId"] for i in live if i["InstanceId"] not in doomed and i["State"]["Name"] in ("pending", "running")
    ]
    errors = []
    if doomed:
        try:
            ec2.terminate_instances(InstanceIds=doomed)
            log.info("terminated %s", ", ".join(doomed))
        except Exception as exc:
            errors.append(f"terminate {', '.join(doomed)}: {exc}")
    if stoppable:
        try:
            if pending:  # EC2 cannot stop an instance that is still starting
                ec2.get_waiter("instance_running").wait(
                    InstanceIds=pending, WaiterConfig={"Delay": 5, "MaxAttempts": 60}
                )
            ec2.stop_instances(InstanceIds=stoppable)
            log.info("stopped %s (their disks remain, at EBS prices)", ", ".join(stoppable))
        except Exception as exc:
            errors.append(f"stop {', '.join(stoppable)}: {exc}")
    if errors:
        raise AwsError("; ".join(errors))


def down(config: BatchConfig, regions: list[str | None]) -> list[str]:
    """Remove everything the project created in these regions, found by its tags: instances (terminated and
    waited for), then its security group and key pairs. Returns what was removed."""
    removed = []
    for region in regions:
        ec2 = _config_client(config, region)
        ids = [i["InstanceId"] for i in _find(ec2, config.project)]
        if ids:
            ec2.terminate_instances(InstanceIds=ids)
            ec2.get_waiter("instance_terminated").wait(InstanceIds=ids, WaiterConfig={"Delay": 5, "MaxAttempts": 120})
            removed += [f"instance {i}" for i in ids]
        project_filter = [{"Name": f"tag:{TAG_PROJECT}", "Values": [config.project]}]
        for group in ec2.describe_security_groups(Filters=project_filter)["SecurityGroups"]:
            ec2.delete_security_group(GroupId=group["GroupId"])
            removed.append(f"security group {group['GroupId']} ({group['GroupName']})")
        for pair in ec2.describe_key_pairs(Filters=project_filter)["KeyPairs"]:
            ec2.delete_key_pair(KeyName=pair["KeyName"])
            removed.append(f"key pair {pair['KeyName']}")
        key_path(config, ec2.meta.region_name).unlink(missing_ok=True)
    return removed


# -- the fleet as the CLI shows it: `cloudsend instances`, `stop`, `start` -----------------------------------
@dataclass
class InstanceView:
    """One of a project's instances as EC2 describes it now."""

    instance_id: str
    region: str
    instance_type: str
    state: str  # pending, running, stopping, stopped
    address: str | None  # public address, else private; None when stopped
    launched: float | None  # epoch seconds of its last start (EC2's LaunchTime)
    spot: bool
    rank: str | None  # which copy of its instance type (the tag cloudsend gave it)


def list_instances(config: BatchConfig, regions: list[str | None]) -> list[InstanceView]:
    """The project's instances in these regions, found by its tag (pending, running, stopping or stopped)."""
    views = []
    for region in regions:
        ec2 = _config_client(config, region)
        views += [_view(instance, ec2.meta.region_name) for instance in _find(ec2, config.project)]
    return views


def _view(instance: dict[str, Any], region: str) -> InstanceView:
    launched = instance.get("LaunchTime")
    return InstanceView(
        instance_id=instance["InstanceId"],
        region=region,
        instance_type=instance.get("InstanceType", "?"),
        state=instance["State"]["Name"],
        address=instance.get("PublicIpAddress") or instance.get("PrivateIpAddress"),
        launched=launched.timestamp() if launched is not None else None,
        spot=instance.get("InstanceLifecycle") == "spot",
        rank=_tag(instance, TAG_RANK),
    )


def set_running(
    config: BatchConfig, regions: list[str | None], *, running: bool, ids: list[str] | None = None
) -> list[str]:
    """Start (``running``) or stop the project's instances in these regions, all of them or only ``ids``;
    a spot instance cannot be stopped and start again (one-time requests): it is left to ``down``. Returns the
    ids asked to change (already in that state: not counted)."""
    changed = []
    for region in regions:
        ec2 = _config_client(config, region)
        found = [i for i in _find(ec2, config.project) if ids is None or i["InstanceId"] in ids]
        wanted = ("stopped",) if running else ("pending", "running")  # (a stopping one cannot start yet)
        todo = [i["InstanceId"] for i in found if i["State"]["Name"] in wanted and i.get("InstanceLifecycle") != "spot"]
        if todo:
            (ec2.start_instances if running else ec2.stop_instances)(InstanceIds=todo)
            changed += todo
    return changed


# -- the controller instance (`cloudsend controller`, see controller.py) ------------------------------------
CONTROLLER_RANK = "controller"  # its rank tag: one controller per project and region


def _controller(ec2: EC2Client, project: str) -> dict[str, Any] | None:
    """The project's controller instance in any live state, whatever its type: a changed type in the settings
    never leaves a second controller billing beside the first."""
    return next((i for i in _find(ec2, project) if _tag(i, TAG_RANK) == CONTROLLER_RANK), None)


def _controller_want(config: BatchConfig, ec2: EC2Client, instance_type: str) -> _Want:
    return _Want(CONTROLLER_RANK, shape_of(ec2, instance_type).vcpus, name=f"{config.project}-controller")


def ensure_controller(config: BatchConfig, busy: str) -> tuple[HostInfo, bool]:
    """The project's controller instance (its config's only instance type), running and answering SSH, and
    whether this call created it. An existing one is reused (started when stopped); a new one is on-demand, with
    the project's key, its security group converged to SSH from the caller only, tags, and the dead-man switch,
    which also counts ``busy`` (a shell command) succeeding as use. Whatever fails, an instance this call
    created is terminated before the error is raised."""
    inst = config.instances[0]
    ec2 = _config_client(config, inst.region)
    region = ec2.meta.region_name
    launches = _Launches()
    try:
        key, _ = ensure_key(ec2, config, region)
        group, subnets = ensure_network(ec2, config, inst)  # the caller's address may have changed since
        instance = _controller(ec2, config.project)
        created = instance is None
        if instance is None:
            image = resolve_image(ec2, config, inst, region)
            cluster = cluster_hash(inst, region)
            want = _controller_want(config, ec2, inst.type or "")
            params = {
                **_run_params(config, inst, image, key, group, want, cluster),
                "UserData": _user_data(config, busy),
            }
            params.pop("InstanceMarketOptions", None)  # on-demand: a controller preempted mid-batch helps no one
            instance = _create(ec2, params, [inst.type or "", *inst.fallback_types], subnets, launches, cluster)
            launches.created.append((ec2, instance["InstanceId"]))
            log.info("created controller %s (%s)", instance["InstanceId"], instance["InstanceType"])
        elif instance["State"]["Name"] in ("stopping", "stopped"):
            _start(ec2, [instance["InstanceId"]])
            log.info("starting controller %s", instance["InstanceId"])
        instance_id = instance["InstanceId"]
        ec2.get_waiter("instance_running").wait(
            InstanceIds=[instance_id], WaiterConfig={"Delay": 5, "MaxAttempts": 120}
        )
        (instance,) = _describe(ec2, [instance_id])
        want = _controller_want(config, ec2, instance.get("InstanceType") or inst.type or "")
        host = _host(config, inst, 0, want, instance, region, created)
        launches.contacted.append(host)
        _wait_for_ssh(host)
    except BaseException:
        launches.undo(config.project)
        raise
    return host, created


def controller_view(config: BatchConfig) -> InstanceView | None:
    """The project's controller instance as EC2 describes it now, if it has one."""
    ec2 = _config_client(config, config.instances[0].region)
    instance = _controller(ec2, config.project)
    return None if instance is None else _view(instance, ec2.meta.region_name)


def controller_host(config: BatchConfig) -> HostInfo | None:
    """How to reach the project's controller instance over SSH when it is running (else None)."""
    inst = config.instances[0]
    ec2 = _config_client(config, inst.region)
    instance = _controller(ec2, config.project)
    if instance is None or instance["State"]["Name"] != "running":
        return None
    want = _controller_want(config, ec2, instance.get("InstanceType") or inst.type or "")
    return _host(config, inst, 0, want, instance, ec2.meta.region_name)


def remove_controller(config: BatchConfig, *, terminate: bool) -> str | None:
    """Stop (its disk, and so its results, kept) or terminate the project's controller; its id, or None
    when it has none."""
    ec2 = _config_client(config, config.instances[0].region)
    instance = _controller(ec2, config.project)
    if instance is None:
        return None
    _teardown_region(ec2, [instance["InstanceId"]], terminate)
    return str(instance["InstanceId"])
