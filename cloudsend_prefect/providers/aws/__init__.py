"""The ``aws`` provider: EC2 instances cloudsend creates, finds again by their tags, and stops or terminates.

This module holds the provider interface only (see ``providers.base``); each job is done in a module of its own:
``session`` (the one adaptor to boto3 and prefect-aws, imported lazily), ``keys``, ``network`` (security group,
caller CIDRs), ``images`` (AMI lookup, login user, type shapes), ``launch`` (run parameters, EBS, capacity
fallback, rollback), ``provisioning``, ``instances`` (status, stop, terminate, ``down``, listing), ``boot`` (user
data, the dead-man switch), ``pricing`` (catalog, spot prices), ``controller`` (the controller instance),
``spot`` (the metadata service), ``addresses`` (how the client reaches an instance), ``hosts`` (what the
provider keeps of a host). Whatever fails while instances are being created, the ones the call created are
terminated before the error is raised.
"""

from __future__ import annotations

from typing import Any

from cloudsend_prefect.config import MAX_GPUS, BatchConfig, InstanceType
from cloudsend_prefect.providers.aws import instances, pricing, provisioning
from cloudsend_prefect.providers.aws.addresses import ADDRESS_RESOLVERS
from cloudsend_prefect.providers.aws.hosts import AwsHost, aws_data
from cloudsend_prefect.providers.aws.launch import wanted
from cloudsend_prefect.providers.connections import Connections
from cloudsend_prefect.providers.costs import Quote
from cloudsend_prefect.providers.models import HostHealth, HostInfo, PlannedHost, Upkeep

__all__ = [
    "ADDRESS_RESOLVERS",
    "CREATES_HOSTS",
    "down",
    "kept_hint",
    "machines",
    "places",
    "plan",
    "provision",
    "quote",
    "replace",
    "set_running",
    "shape",
    "status",
    "teardown",
    "upkeep",
    "validate",
]

CREATES_HOSTS = True


def validate(config: BatchConfig, index: int, inst: InstanceType) -> None:
    """What would only fail after creating something: no instance type, an unknown address kind."""
    if not inst.type:
        raise ValueError(f"instances[{index}].type: required for the aws provider (e.g. c6i.xlarge)")
    if inst.address not in ADDRESS_RESOLVERS:
        known = ", ".join(ADDRESS_RESOLVERS)
        raise ValueError(f"instances[{index}].address: unknown {inst.address!r} (known: {known})")


def shape(config: BatchConfig, inst: InstanceType) -> tuple[int, int]:
    """``cpus`` (else unknown until EC2 is asked) and GPUs: ``gpus``, else the catalog's count for the type (a
    type missing from it is taken to have what a job asks, and checked at provisioning)."""
    info = pricing.instance_info(inst.type)
    gpus = inst.gpus if inst.gpus is not None else info.gpus if info is not None else MAX_GPUS  # (unknown type)
    return config.instance_cpus(inst), gpus


def plan(config: BatchConfig, index: int, inst: InstanceType) -> list[PlannedHost]:
    """``number`` copies, each split by ``explode`` as ``provision`` splits them, with the catalog's vCPUs
    instead of EC2's (a type missing from it: 1 CPU, unless ``cpus`` says)."""
    info = pricing.instance_info(inst.type)
    vcpus = info.vcpus if info else inst.cpus or 1
    gpus = info.gpus if info else inst.gpus or 0
    data = AwsHost(
        region=inst.region,
        aws_credentials=config.aws_credentials,
        aws_profile=config.profile,
        instance_type=inst.type,
        spot=inst.eco,
        max_bid=inst.max_bid,
    )
    return [
        PlannedHost(
            name=want.name,
            provider="aws",
            index=index,
            cpus=want.cpus,
            gpus=want.gpus,
            cpus_known=info is not None or inst.cpus is not None,
            kind=inst.type,
            provider_data=data.model_dump(),
        )
        for want in wanted(inst, index, vcpus, gpus)
    ]


def provision(
    config: BatchConfig, instances: list[tuple[int, InstanceType]], connections: Connections, *, create: bool = True
) -> list[HostInfo]:
    """The instance types' hosts: existing instances reused by their tags (started when stopped), missing ones
    launched; each waited for until SSH answers. With ``create=False``: the existing ones only."""
    return provisioning.provision(config, instances, connections, create=create)


def status(hosts: list[HostInfo], connections: Connections) -> dict[str, HostHealth]:
    """Each instance's state from the EC2 API (the evidence that decides whether a host is lost)."""
    return instances.status(hosts)


def teardown(hosts: list[HostInfo], *, terminate: bool = False) -> None:
    """Stop (or terminate) the batch's instances: nothing keeps billing compute once the batch is over."""
    instances.teardown(hosts, terminate=terminate)


def replace(config: BatchConfig, lost: HostInfo, name: str, connections: Connections) -> HostInfo:
    """A new instance of the lost host's instance type, with its rank, the lost one terminated first."""
    return provisioning.replace(config, lost, name, connections)


def quote(hosts: list[Any], *, live: bool) -> tuple[dict[str, Quote], list[str]]:
    """Catalog prices (us-east-1 list prices), spot hosts at ``max_bid`` or the on-demand price as an upper
    bound, or at EC2's current spot price when ``live`` and EC2 answers."""
    return pricing.quote(hosts, live=live)


def upkeep(host: HostInfo) -> Upkeep:
    """The dead-man switch's limit to re-arm, and for a spot instance the metadata service's address."""
    data = aws_data(host)
    return Upkeep(idle_seconds=data.idle_seconds, notices=data.imds)


def places(config: BatchConfig, asked: list[str] | None) -> list[str | None]:
    """The regions to look in: those asked for, else the config's aws instance types' (else the default)."""
    return instances.regions_of(config, asked)


def machines(config: BatchConfig, asked: list[str] | None) -> list[dict[str, Any]]:
    """The project's instances (found by its tag), with their uptime since their last start and its cost at the
    catalog's us-east-1 on-demand price (an upper bound)."""
    return instances.machine_rows(config, instances.regions_of(config, asked))


def set_running(config: BatchConfig, asked: list[str] | None, *, running: bool, ids: list[str] | None) -> list[str]:
    """Start or stop the project's instances (spot ones are left to ``down``); the ids asked to change."""
    return instances.set_running(config, instances.regions_of(config, asked), running=running, ids=ids)


def down(config: BatchConfig, asked: list[str] | None) -> list[str]:
    """Terminate the project's instances, then remove its security group and key pairs, found by its tags."""
    return instances.down(config, instances.regions_of(config, asked))


def kept_hint(config: BatchConfig, hosts: list[HostInfo]) -> str:
    """``cloudsend down`` with the project and the kept instances' regions."""
    regions = sorted({r for h in hosts if (r := aws_data(h).region)})
    return " ".join([f"cloudsend down --project {config.project}", *(f"--region {r}" for r in regions)])
