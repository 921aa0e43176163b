"""The Prefect tasks of the ``cloudsend`` flow: provision, bootstrap, plan, run job, teardown."""

from __future__ import annotations

import asyncio
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE, CachePolicy
from prefect.context import TaskRunContext
from prefect.runtime import task_run
from prefect.states import Cancelled, Failed, State

from cloudsend_prefect.config import BatchConfig
from cloudsend_prefect.dispatch import BatchCancelled, Dispatcher
from cloudsend_prefect.planning import Placement, plan
from cloudsend_prefect.protocol import BUILDING, READY
from cloudsend_prefect.providers import Connections, HostInfo, kept_hint, provision_all, release
from cloudsend_prefect.reporting import plan_description, plan_table
from cloudsend_prefect.results import JobResult, store_dir, store_lock, tail_lines
from cloudsend_prefect.runtime import HostRuntime, JobStatus
from cloudsend_prefect.specs import EnvSpec, JobSpec
from cloudsend_prefect.transport import FileRefused, TransportError


class BootstrapFailed(RuntimeError):
    """An environment did not build on a host: the bootstrap task fails with the end of the build's log in it."""


@task(name="provision", cache_policy=NO_CACHE)
def provision(config: BatchConfig, connections: Connections) -> list[HostInfo]:
    """Create, start or reuse the config's hosts (``providers.provision_all``, through the flow run's
    connections), and log each one as it is.

    Not cached: hosts are looked up again at every run, so a rerun finds what is there now.
    """
    hosts = provision_all(config, connections)
    logger = get_run_logger()
    for host in hosts:
        logger.info("host %s (%s): %d CPUs, runtime in %s", host.name, host.provider, host.cpus, host.base_dir)
    return hosts


@task(name="bootstrap", cache_policy=NO_CACHE)
def bootstrap(host: HostInfo, env: EnvSpec, dispatcher: Dispatcher) -> str:
    """Build an environment on a host in the background and wait for it; a no-op when it is already there."""
    runtime = dispatcher.runtime(host.name)
    state = runtime.ensure_env(env)
    logger = get_run_logger()
    if state == READY:
        logger.info("environment %s (%s) already on %s: reused", env.name, env.key, host.name)
        return "reused"
    started = time.monotonic()
    while state == BUILDING:
        time.sleep(dispatcher.poll_interval)
        state = runtime.env_state(env)
    if state != READY:
        tail = runtime.env_log_tail(env)
        raise BootstrapFailed(f"environment {env.name} failed to build on {host.name}; end of its log:\n{tail}")
    logger.info("environment %s built on %s in %.1fs", env.name, host.name, time.monotonic() - started)
    return "built"


@task(name="plan", cache_policy=NO_CACHE)
def plan_batch(jobs: list[JobSpec], hosts: list[HostInfo], batch: str) -> list[Placement]:
    """Where and when jobs are expected to run, as the ``<batch>-plan`` table: per host, not per job."""
    placements = plan(jobs, hosts)
    create_table_artifact(
        key=f"{batch}-plan",
        table=plan_table(placements, hosts),
        description=plan_description(batch, placements, hosts),
    )
    return placements


@dataclass
class JobCachePolicy(CachePolicy):
    """Jobs are cached per batch by content (command, env, files) and occurrence, never by run: a rerun of the
    batch skips them.

    The batch (default: the project) is part of the key: a job is reused only by the batch that ran it, as its
    record on the hosts (``jobs/<batch>/``) is. Reuse across projects would hand one project a result (name,
    host, outputs) made for another and tie their caches, prunes and reruns together, for the saving of a job
    that two projects happen to share.

    Prefect 3 computes a task's cache key but leaves the task run's own ``cache_key`` empty, so the UI's
    "Cache Key" would say None; the key is set on the task run as it is computed (before its first state
    after Pending), which the server records with the run.
    """

    def compute_key(
        self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str:
        """The key ``cloudsend-job-<batch>-<job key>``, also set on the task run so the UI shows it."""
        key = f"cloudsend-job-{inputs['batch']}-{inputs['job'].key}"
        task_ctx.task_run.cache_key = key
        return key


LOSS_RETRIES = 3  # runs elsewhere of a job whose host was lost (or unreachable to fetch from): not its own retries


# No tags: a task run with tags asks the server for tag concurrency slots, one API call per job.
@task(name="run-job", task_run_name="{job.name}", cache_policy=JobCachePolicy(), persist_result=True)
async def run_job(job: JobSpec, batch: str, dispatcher: Dispatcher) -> JobResult | State[JobResult]:
    """Run one job to its end on whichever host has room, then keep its outputs and logs client-side.

    A coroutine: waiting for the job holds no thread, so every CPU slot of the fleet can be busy at once; the
    transfers, which block, run in worker threads. A job whose host is lost under it runs again elsewhere
    within this task run, up to ``LOSS_RETRIES`` times: the task's Prefect retries are the job's own
    ``max_retries``, for failures of its own.
    """
    logger = get_run_logger()

    def show(stream: str, lines: str) -> None:  # from a host thread: the logger sends it to this task run
        logger.info("%s:\n%s", stream, lines)

    rerun = task_run.run_count > 1  # a retry after a failure of its own: run it again, even where it ended
    for attempt in range(1, LOSS_RETRIES + 2):
        try:
            host, status = await dispatcher.run_async(job, rerun=rerun, output=show)
        except BatchCancelled as exc:  # Cancelled, not Failed: never retried
            return Cancelled(message=str(exc), data=never_started(job))
        runtime = dispatcher.runtime(host)
        store = store_dir(batch, job.key)
        try:
            if status.lost and attempt <= LOSS_RETRIES:
                raise HostLost(status.reason)
            status, fetched = await asyncio.to_thread(_collect, runtime, batch, job, status, store)
            break
        except (HostLost, TransportError) as exc:
            if attempt > LOSS_RETRIES:
                raise
            logger.warning("%s: %s; placing it again (%d of %d)", host, exc, attempt, LOSS_RETRIES)
            rerun = isinstance(exc, HostLost)  # a fetch that failed adopts the job's record again
    result = JobResult(
        name=job.name,
        key=job.key,
        state=status.state,
        reason=status.reason,
        exit_code=status.exit,
        duration=status.duration,
        started=status.start,
        ended=status.end,
        host=host,
        lost=status.lost,
        outputs=fetched,
        store=str(store),
    )
    if status.state != "done":
        detail = tail_lines(store / "stderr.log")
        if status.env_failed and job.env is not None:
            detail = (await asyncio.to_thread(runtime.env_log_tail, job.env)).splitlines()
        logger.error("%s on %s: %s\n%s", status.state, host, status.reason, "\n".join(detail))
        if status.cancelled:  # by the batch's cancellation or `cloudsend cancel`: not to be retried
            return Cancelled(message=f"{status.state}: {status.reason}", data=result)
        # A returned Failed state (not an exception): retried per max_retries, never cached, no traceback.
        return Failed(message=f"{status.state}: {status.reason}", data=result)
    logger.info("done on %s in %.2fs; outputs: %s", host, status.duration or 0, ", ".join(fetched) or "none")
    return result


def never_started(job: JobSpec) -> JobResult:
    """The result of a job its batch was cancelled before starting."""
    return JobResult(name=job.name, key=job.key, state="aborted", reason="cancelled before it started")


class HostLost(RuntimeError):
    """The job's host was lost before the job ended there: it is placed again, on another host."""


def _collect(
    runtime: HostRuntime, batch: str, job: JobSpec, status: JobStatus, store: Path
) -> tuple[JobStatus, list[str]]:
    """Replace the job's client-side store with what its run left: its outputs when done, its logs always
    (nothing from a lost host). Returns the status (aborted if an output was refused) and the outputs kept."""
    fetched = job.outputs if status.state == "done" else []
    with store_lock(store):
        shutil.rmtree(store, ignore_errors=True)
        if status.lost:  # a lost host has nothing to give back
            return status, fetched
        try:
            _fetch(runtime, batch, job, status, fetched, store)
        except FileRefused as exc:  # changed on the host after it ended: nothing of it is kept
            shutil.rmtree(store, ignore_errors=True)
            status = status.model_copy(update={"state": "aborted", "reason": f"output refused: {exc}"})
            fetched = []
            _fetch(runtime, batch, job, status, fetched, store)  # its logs, still worth having
    return status, fetched


def _fetch(runtime: HostRuntime, batch: str, job: JobSpec, status: JobStatus, outputs: list[str], store: Path) -> None:
    """Fetch, trying again while the connection comes back: a failed transfer is never a reason to run a
    finished job again (if it keeps failing, the task's retry adopts the done job and fetches once more)."""
    logs = status.logs if status.start is not None else None  # a job never started has no logs to make
    for delay in (1.0, 2.0, 4.0, None):
        try:
            runtime.fetch(batch, job.key, outputs, store, job.max_output_bytes, logs)
            return
        except TransportError as exc:
            if delay is None:
                raise
            get_run_logger().warning("fetching %s: %s; trying again in %gs", job.name, exc, delay)
            time.sleep(delay)


@task(name="teardown", cache_policy=NO_CACHE)
def teardown(hosts: list[HostInfo], config: BatchConfig, connections: Connections) -> None:
    """Stop or terminate the batch's cloud instances; when asked to keep them, say so and how to remove them."""
    kept = release(config, hosts, connections)
    if kept:
        get_run_logger().warning(
            "auto_stop is false: %s kept running (and billing); remove them with `%s`",
            ", ".join(f"{h.name} ({h.machine_id})" for h in kept),
            kept_hint(config, kept),
        )
