"""A preview of where and when jobs will run: the same first-fit-by-CPUs rule the dispatcher applies online,
simulated with each job's ``expected_duration`` (1 s when unknown). Nothing is started."""

from __future__ import annotations

from pydantic import BaseModel

from cloudsend_prefect.config import BatchConfig
from cloudsend_prefect.providers.base import host_names
from cloudsend_prefect.specs import JobSpec


class Placement(BaseModel):
    job: str
    host: str
    cpus: int
    start: float
    end: float


def planned_hosts(config: BatchConfig) -> dict[str, int]:
    """CPUs by host name of the hosts the config asks for, without creating or contacting any."""
    return {
        name: config.instance_cpus(inst)
        for i, inst in enumerate(config.instances)
        for name in host_names(inst, i, inst.provider or config.provider)
    }


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
