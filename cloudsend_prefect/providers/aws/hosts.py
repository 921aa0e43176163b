"""The aws provider's part of a ``HostInfo``: what only this provider reads (region, credentials, market...),
kept in the host's opaque ``provider_data``, and the building of a host from an EC2 instance."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from cloudsend_prefect.config import BatchConfig, InstanceType
from cloudsend_prefect.providers.aws import session, spot
from cloudsend_prefect.providers.aws.addresses import ADDRESS_RESOLVERS
from cloudsend_prefect.providers.aws.boot import idle_seconds
from cloudsend_prefect.providers.aws.images import image_user
from cloudsend_prefect.providers.aws.keys import key_path
from cloudsend_prefect.providers.aws.launch import Want
from cloudsend_prefect.providers.aws.session import EC2Client, config_dir
from cloudsend_prefect.providers.models import REMOTE_BASE_DIR, HostInfo


class AwsHost(BaseModel):
    """What the aws provider keeps of an instance in its host's ``provider_data``."""

    region: str | None = None
    aws_credentials: str | None = Field(None, description="AwsCredentials block name the instance was made with.")
    aws_profile: str | None = None
    instance_type: str | None = None
    spot: bool = False
    idle_seconds: int | None = Field(
        None, description="The instance's dead-man switch limit, re-armed by the batch's client as it connects."
    )
    imds: str | None = Field(
        None, description="spot: the instance's metadata service, where EC2 announces an interruption."
    )
    max_bid: float | None = Field(None, description="A planned spot host's bid: its price's upper bound.")


def aws_data(host: HostInfo) -> AwsHost:
    """The aws part of a host (an aws host's ``provider_data``, read back)."""
    return AwsHost.model_validate(host.provider_data)


def host_client(host: HostInfo) -> EC2Client:
    """An EC2 client for the host's region, with the credentials its instance was made with."""
    return data_client(aws_data(host))


def data_client(data: AwsHost) -> EC2Client:
    """An EC2 client for a host's region and credentials, as its ``AwsHost`` gives them."""
    return session.ec2_client(data.region, credentials=data.aws_credentials, profile=data.aws_profile)


def by_region(hosts: list[HostInfo]) -> dict[str | None, list[HostInfo]]:
    """The hosts that are EC2 instances, by region (one client, one call per region)."""
    groups: dict[str | None, list[HostInfo]] = {}
    for host in hosts:
        if host.machine_id:
            groups.setdefault(aws_data(host).region, []).append(host)
    return groups


def host_info(
    ec2: EC2Client,
    config: BatchConfig,
    inst: InstanceType,
    want: Want,
    instance: dict[str, Any],
    region: str,
    created: bool = False,
) -> HostInfo:
    """The host of an EC2 instance (a ``describe_instances`` entry, from ``ec2``) for ``want`` (its name, CPUs
    and GPUs). The instance type's ``address`` kind is known (``validate`` checked it)."""
    endpoint = ADDRESS_RESOLVERS[inst.address](instance)
    known_hosts = config_dir() / "known_hosts" / instance["InstanceId"]
    known_hosts.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    is_spot = instance.get("InstanceLifecycle") == "spot"
    data = AwsHost(
        region=region,
        aws_credentials=config.aws_credentials,
        aws_profile=config.profile,
        instance_type=instance.get("InstanceType"),
        spot=is_spot,
        idle_seconds=idle_seconds(config),
        imds=spot.IMDS if is_spot else None,
    )
    return HostInfo(
        name=want.name,
        provider="aws",
        cpus=want.cpus,
        gpus=want.gpus,
        base_dir=REMOTE_BASE_DIR,
        address=endpoint.host,
        port=endpoint.port,
        user=endpoint.user or inst.img_username or image_user(ec2, region, instance.get("ImageId")),
        key_file=endpoint.key_file or str(key_path(config, region)),
        # A new instance's key is trusted on first contact and pinned per instance id from then on
        # (addresses are recycled between instances, so they cannot key the pin).
        known_hosts=str(known_hosts),
        accept_new_host_key=True,
        machine_id=instance["InstanceId"],
        created=created,
        provider_data=data.model_dump(),
    )
