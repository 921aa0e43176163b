"""Placement rules: which hosts may run a job, and whether it fits a host now. Planning (``planning.plan``, a
preview) and the dispatcher (``dispatch.Dispatcher``, online) both decide with these functions.

- GPUs decide eligibility: a job gets the GPUs it asks for to itself, so a host with fewer never runs it
  (``can_host``).
- CPUs never do: a job asking more CPUs than a host has claims the whole host (``claim``) and runs there
  alone, when nothing else runs on it.
- A job fits when its claim fits the CPUs not in use and its GPUs the GPUs not in use (``fits``).

The host applies the same rule when it starts queued jobs (``dispatch_pass`` in runtime/host.sh): it alone
knows what runs on it across batches and clients, so it decides with the capacity and usage it holds rather
than with a claim the client computed from an older view; host.sh aborts a job asking more GPUs than it has
(a guard: the client never sends one), and tests/test_host_sh.py checks its decisions against ``fits`` case
by case.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol


class Needs(Protocol):
    """CPUs and GPUs: what a job asks for, or what a host has."""

    @property
    def cpus(self) -> int:
        """CPUs asked for (a job's ``cpus_req``) or CPU slots had (a host's)."""
        ...

    @property
    def gpus(self) -> int:
        """GPUs asked for, each to the job alone, or GPUs had (0: no GPU job may run there)."""
        ...


class Slots(Needs, Protocol):
    """A host as placement sees it (a planned host, or a provisioned one)."""

    @property
    def name(self) -> str:
        """The host's name, as its provider names it."""
        ...


class Amount(NamedTuple):
    """CPUs and GPUs counted together: a window of a host (the dispatcher's), or what a job asks for."""

    cpus: int
    gpus: int


def can_host(host: Needs, job: Needs) -> bool:
    """Whether the host may ever run the job: it has the GPUs the job asks for (CPUs never stop a job).

    Args:
        host: the host's CPUs and GPUs.
        job: what the job asks for.
    """
    return job.gpus <= host.gpus


def claim(cpus: int, capacity: int) -> int:
    """The CPUs a job asking ``cpus`` holds on a host of ``capacity``: what it asks, or the whole host when it
    asks more (it then runs there alone)."""
    return min(cpus, capacity)


def fits(job: Needs, capacity: Needs, used_cpus: int, used_gpus: int) -> bool:
    """Whether the job starts now: its claim fits the CPUs not in use, and its GPUs (if any) those not in use.

    A job bigger than the host fits only when nothing is in use.

    Args:
        job: what the job asks for.
        capacity: what the host holds at most, or a window of it (the dispatcher keeps more jobs queued on a
            host than it has CPUs).
        used_cpus: the CPUs its running (or committed) jobs hold.
        used_gpus: and their GPUs.
    """
    if used_cpus + claim(job.cpus, capacity.cpus) > capacity.cpus:
        return False
    return job.gpus == 0 or used_gpus + job.gpus <= capacity.gpus
