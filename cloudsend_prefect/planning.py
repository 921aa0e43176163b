"""A preview of where and when jobs will run: the same first-fit rule the dispatcher applies online (by CPUs,
on a host with the GPUs a job needs), simulated with each job's ``expected_duration`` (1 s when unknown).
Nothing is started."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from cloudsend_prefect.catalog import instance_info
from cloudsend_prefect.config import BatchConfig, InstanceType
from cloudsend_prefect.placement import Slots, can_host, fits
from cloudsend_prefect.providers.base import host_names
from cloudsend_prefect.specs import JobSpec


class Placement(BaseModel):
    job: str
    host: str
    cpus: int
    gpus: int = 0
    start: float
    end: float


class PlannedHost(BaseModel):
    """A host the config asks for, as known before it exists (aws: vCPUs from the instance-type catalog)."""

    name: str
    provider: str
    index: int  # of its instance type in the config
    cpus: int
    gpus: int = 0
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
                PlannedHost(name=name, provider=provider, index=i, cpus=config.instance_cpus(inst), gpus=inst.gpus or 0)
                for name in host_names(inst, i, provider)
            ]
    return hosts


def _planned_aws(inst: InstanceType, index: int) -> list[PlannedHost]:
    from cloudsend_prefect.providers.aws import _wanted  # the provider's own split: same ranks, same CPUs

    info = instance_info(inst.type)
    vcpus = info.vcpus if info else inst.cpus or 1
    gpus = info.gpus if info else inst.gpus or 0
    return [
        PlannedHost(
            name=f"{inst.name or 'aws'}-{want.rank}",  # as providers/aws.py::_host names it
            provider="aws",
            index=index,
            cpus=want.cpus,
            gpus=want.gpus,
            cpus_known=info is not None or inst.cpus is not None,
            instance_type=inst.type,
            spot=inst.eco,
            max_bid=inst.max_bid,
            region=inst.region,
        )
        for want in _wanted(inst, index, vcpus, gpus)
    ]


def planned_hosts(config: BatchConfig) -> dict[str, int]:
    """CPUs by host name of the hosts the config asks for, without creating or contacting any."""
    return {host.name: host.cpus for host in planned(config)}


def plan(jobs: list[JobSpec], hosts: Sequence[Slots]) -> list[Placement]:
    """Simulate jobs in order, each on the host where its CPUs and GPUs free up first, among those with as many
    GPUs as it needs. Starts never go back in time (like the hosts' queues, served in order), except that a job
    waiting for GPUs holds back no job that needs none: a host starts whatever fits."""
    running: dict[str, list[tuple[float, int, int]]] = {h.name: [] for h in hosts}  # (end, cpus, gpus) running
    floor = {False: 0.0, True: 0.0}  # the latest start so far, of jobs without GPUs and with
    placements = []
    for job in jobs:
        now = floor[job.gpus > 0]
        start, name = min(
            (_earliest([r for r in running[h.name] if r[0] > now], h, job, now), h.name)
            for h in hosts
            if can_host(h, job)
        )
        floor[job.gpus > 0] = start
        oldest = min(floor.values())
        for heap in running.values():
            heap[:] = [r for r in heap if r[0] > oldest]
        end = start + (job.expected_duration or 1.0)
        running[name].append((end, job.cpus, job.gpus))
        placements.append(Placement(job=job.name, host=name, cpus=job.cpus, gpus=job.gpus, start=start, end=end))
    return placements


def _earliest(running: list[tuple[float, int, int]], host: Slots, job: JobSpec, now: float) -> float:
    """When the job fits the host (``placement.fits``), as its running jobs end."""
    busy_cpus = busy_gpus = 0
    for _, used, held in running:
        busy_cpus, busy_gpus = busy_cpus + used, busy_gpus + held
    at = now
    for end, used, held in sorted(running):
        if fits(job, host, busy_cpus, busy_gpus):
            break
        busy_cpus, busy_gpus = busy_cpus - used, busy_gpus - held
        at = max(now, end)
    return at
