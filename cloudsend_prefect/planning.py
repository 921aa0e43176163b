"""A preview of where and when jobs will run: the same first-fit-by-CPUs rule the dispatcher applies online,
simulated with each job's ``expected_duration`` (1 s when unknown). Nothing is started."""

from __future__ import annotations

from pydantic import BaseModel

from cloudsend_prefect.catalog import instance_info
from cloudsend_prefect.config import BatchConfig, InstanceType
from cloudsend_prefect.providers.base import host_names
from cloudsend_prefect.specs import JobSpec


class Placement(BaseModel):
    job: str
    host: str
    cpus: int
    start: float
    end: float


class PlannedHost(BaseModel):
    """A host the config asks for, as known before it exists (aws: vCPUs from the instance-type catalog)."""

    name: str
    provider: str
    index: int  # of its instance type in the config
    cpus: int
    cpus_known: bool = True  # False: an aws type missing from the catalog, without `cpus`; counted as 1
    instance_type: str | None = None
    spot: bool = False
    max_bid: float | None = None
    region: str | None = None
    instance_id: str | None = None  # never known before provisioning (a cost row shows it)


def planned(config: BatchConfig) -> list[PlannedHost]:
    """The hosts the config asks for, named as their provider will name them, without creating or contacting any.

    aws: ``number`` copies, each split by ``explode`` into instances of at most the type's vCPUs, exactly as
    the aws provider does it, with the vCPUs taken from the catalog instead of EC2.
    """
    hosts = []
    for i, inst in enumerate(config.instances):
        provider = inst.provider or config.provider
        if provider == "aws":
            hosts += _planned_aws(inst, i)
        else:
            hosts += [
                PlannedHost(name=name, provider=provider, index=i, cpus=config.instance_cpus(inst))
                for name in host_names(inst, i, provider)
            ]
    return hosts


def _planned_aws(inst: InstanceType, index: int) -> list[PlannedHost]:
    from cloudsend_prefect.providers.aws import _wanted  # the provider's own split: same ranks, same CPUs

    info = instance_info(inst.type)
    vcpus = info.vcpus if info else inst.cpus or 1
    return [
        PlannedHost(
            name=f"{inst.name or 'aws'}-{want.rank}",  # as providers/aws.py::_host names it
            provider="aws",
            index=index,
            cpus=want.cpus,
            cpus_known=info is not None or inst.cpus is not None,
            instance_type=inst.type,
            spot=inst.eco,
            max_bid=inst.max_bid,
            region=inst.region,
        )
        for want in _wanted(inst, index, vcpus)
    ]


def planned_hosts(config: BatchConfig) -> dict[str, int]:
    """CPUs by host name of the hosts the config asks for, without creating or contacting any."""
    return {host.name: host.cpus for host in planned(config)}


def plan(jobs: list[JobSpec], capacity: dict[str, int]) -> list[Placement]:
    """Simulate jobs in order (starts never go back in time, like the hosts' FIFO queues), each on the host
    where its CPUs free up first. ``capacity`` gives each host's CPUs by name."""
    running: dict[str, list[tuple[float, int]]] = {name: [] for name in capacity}  # (end, cpus) of running jobs
    now = 0.0
    placements = []
    for job in jobs:
        start, name = min((_earliest(running[n], capacity[n], job.cpus, now), n) for n in running)
        now = start
        for heap in running.values():
            heap[:] = [(e, c) for e, c in heap if e > now]
        end = start + (job.expected_duration or 1.0)
        running[name].append((end, job.cpus))
        placements.append(Placement(job=job.name, host=name, cpus=job.cpus, start=start, end=end))
    return placements


def _earliest(running: list[tuple[float, int]], capacity: int, cpus: int, now: float) -> float:
    """When ``cpus`` are free on a host (a job larger than the host waits until it is empty)."""
    free = capacity - sum(c for _, c in running)
    at = now
    for end, used in sorted(running):
        if free >= min(cpus, capacity):
            break
        free += used
        at = max(now, end)
    return at
