"""Launching instances: what each host needs (ranks, CPUs, GPUs), the run_instances parameters (image, EBS root
volume, market, tags, user data), the fallback over types and zones when one lacks capacity, and the rollback of
everything one call launched when it fails."""

from __future__ import annotations

import logging
import math
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any

from cloudsend_prefect.config import BatchConfig, InstanceType
from cloudsend_prefect.hashing import digest
from cloudsend_prefect.naming import host_name
from cloudsend_prefect.providers.aws.boot import user_data
from cloudsend_prefect.providers.aws.session import AwsError, EC2Client, error_code
from cloudsend_prefect.providers.aws.tags import TAG_CLUSTER, TAG_PROJECT, TAG_RANK, find
from cloudsend_prefect.providers.base import HostInfo
from cloudsend_prefect.providers.connections import Connections

log = logging.getLogger("cloudsend.aws")

CAPACITY_ERRORS = {
    "InsufficientInstanceCapacity",
    "InstanceLimitExceeded",
    "VcpuLimitExceeded",
    "MaxSpotInstanceCountExceeded",
    "SpotMaxPriceTooLow",
    "Unsupported",
    "InsufficientCapacity",
}


@dataclass
class Want:
    """One host to launch or reuse: its rank tag (which copy of which instance type), name, CPUs and GPUs."""

    rank: str
    cpus: int
    gpus: int
    name: str


def wanted(inst: InstanceType, index: int, vcpus: int, gpus: int = 0) -> list[Want]:
    """Ranks, names, CPUs and GPUs: `number` copies, each split over several instances when `explode` asks for
    it (each of them with all the type's GPUs, or the instance type's `gpus`)."""
    cpus = inst.cpus or vcpus
    parts = math.ceil(cpus / vcpus) if inst.explode and cpus > vcpus else 1
    wants = []
    for copy in range(inst.number):
        left = cpus
        for part in range(parts):
            share = min(vcpus, left) if parts > 1 else cpus
            left -= share
            which = copy if inst.number > 1 else None
            piece = part if parts > 1 else None
            rank = str(index) + (f".{which}" if which is not None else "") + (f".{piece}" if piece is not None else "")
            name = host_name(inst.name, "aws", index, which, piece)
            wants.append(Want(rank, share, gpus if inst.gpus is None else inst.gpus, name))
    return wants


def cluster_hash(inst: InstanceType, region: str) -> str:
    """What the machine is: instances differing in any of this are never reused for each other."""
    fields = ("type", "img_id", "disk_size", "disk_type", "eco", "max_bid", "cloud_id")
    # "gpu" (the retired Elastic GPU key) was always None: kept in the hash so existing instances keep theirs.
    return digest({"region": region, **{f: getattr(inst, f) for f in fields}, "gpu": None})[:12]


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


def run_params(
    config: BatchConfig,
    inst: InstanceType,
    image: dict[str, Any],
    key: str,
    group: str,
    rank: str,
    cluster: str,
    busy: str | None = None,
) -> dict[str, Any]:
    """The run_instances parameters of one host of an instance type: image, root volume, key, security group,
    metadata service (IMDSv2 only), shutdown behaviour, user data (``busy``: see ``boot.user_data``), tags
    (``rank`` among them) and, for spot, the market options."""
    root_name = image.get("RootDeviceName", "/dev/sda1")
    # The image's own root volume (snapshot, size), resized or retyped as asked, on its real device name.
    mappings = image.get("BlockDeviceMappings", [])
    mapped: dict[str, Any] = next((m.get("Ebs", {}) for m in mappings if m["DeviceName"] == root_name), {})
    root = _root_volume(mapped, inst.disk_size, inst.disk_type)
    tags = [
        {"Key": "Name", "Value": f"cloudsend-{config.project}-{rank}"},
        {"Key": TAG_PROJECT, "Value": config.project},
        {"Key": TAG_CLUSTER, "Value": cluster},
        {"Key": TAG_RANK, "Value": rank},
    ]
    params: dict[str, Any] = {
        "ImageId": image["ImageId"],
        "MinCount": 1,
        "MaxCount": 1,
        "KeyName": key,
        "SecurityGroupIds": [group],
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
        "InstanceInitiatedShutdownBehavior": "terminate" if config.auto_stop == "terminate" or inst.eco else "stop",
        "UserData": user_data(config, busy),
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
class Launches:
    """What one ``provision`` call asked EC2 for, so that its failure can take all of it back."""

    connections: Connections  # the run's: a contacted host's connection is closed with its instance
    created: list[tuple[EC2Client, str]] = field(default_factory=list)
    # (client, cluster hash, client token) of every run_instances sent, answered or not
    requested: list[tuple[EC2Client, str, str]] = field(default_factory=list)
    contacted: list[HostInfo] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def undo(self, project: str) -> None:
        """Terminate every instance this call created, including any whose run_instances answer was lost
        (a timeout, a dropped connection): those are found by their tags and client token."""
        # No connection may outlive its instance and be handed to a later host of the same name.
        self.connections.close(self.contacted)
        doomed: dict[int, tuple[EC2Client, set[str]]] = {}
        for ec2, instance_id in self.created:
            doomed.setdefault(id(ec2), (ec2, set()))[1].add(instance_id)
        searches: dict[tuple[int, str], tuple[EC2Client, set[str]]] = {}
        for ec2, cluster, token in self.requested:
            searches.setdefault((id(ec2), cluster), (ec2, set()))[1].add(token)
        for (_, cluster), (ec2, tokens) in searches.items():
            try:
                for instance in find(ec2, project, cluster):
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


def launch_instance(
    ec2: EC2Client, params: dict[str, Any], types: list[str], subnets: list[str], launches: Launches, cluster: str
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
                if error_code(exc) not in CAPACITY_ERRORS:
                    raise
                tried.append(f"{instance_type} in {subnet}: {error_code(exc)}")
                log.warning(
                    "no capacity for %s in %s (%s); trying the next choice", instance_type, subnet, error_code(exc)
                )
    raise AwsError(
        "no capacity or quota left for any choice:\n  " + "\n  ".join(tried) + "\nadd `fallback_types` "
        "or `zones`, or ask AWS for a higher quota"
    )


def start(ec2: EC2Client, ids: list[str]) -> None:
    """Start stopped instances (waiting first for those still stopping: EC2 cannot start them yet)."""
    ec2.get_waiter("instance_stopped").wait(InstanceIds=ids, WaiterConfig={"Delay": 5, "MaxAttempts": 120})
    ec2.start_instances(InstanceIds=ids)
