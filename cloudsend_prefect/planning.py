"""A preview of where and when jobs will run: the same first-fit rule the dispatcher applies online (by CPUs,
on a host with the GPUs a job needs), simulated with each job's ``expected_duration`` (1 s when unknown).
Nothing is started."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from cloudsend_prefect import providers
from cloudsend_prefect.config import BatchConfig
from cloudsend_prefect.placement import Slots, can_host, fits
from cloudsend_prefect.providers import PlannedHost
from cloudsend_prefect.specs import JobSpec


class Placement(BaseModel):
    """One job in the preview: the host it would run on, the CPUs and GPUs it holds there, and when it would start
    and end (seconds from the batch's start, by ``expected_duration``).
    """

    job: str
    host: str
    cpus: int
    gpus: int = 0
    start: float
    end: float


def planned(config: BatchConfig) -> list[PlannedHost]:
    """The hosts the config asks for, named as their provider will name them, without creating or contacting any
    (see ``providers.plan``)."""
    return providers.plan(config)


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
