"""The ``cloudsend`` flow: provision → bootstrap environments → plan → run jobs (fetching outputs) → teardown."""

# No `from __future__ import annotations`: served flows are cloudpickled by value; list[Job] must not be a string.

import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.events import emit_event
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run
from prefect.states import State
from prefect.task_runners import ThreadPoolTaskRunner

from cloudsend_prefect.catalog import cost_line, cost_report
from cloudsend_prefect.config import BatchConfig, Job
from cloudsend_prefect.dispatch import Dispatcher
from cloudsend_prefect.loading import ConfigError, load_config, parse_config
from cloudsend_prefect.paths import cloudsend_home
from cloudsend_prefect.providers import HostInfo, connect
from cloudsend_prefect.results import BatchSummary, JobResult, deliver
from cloudsend_prefect.specs import JobSpec, expand_jobs
from cloudsend_prefect.tasks import LOSS_RETRIES, bootstrap, plan_batch, provision, retry_policy, run_job, teardown

# Task threads mostly wait on the dispatcher; the bound keeps thousands of jobs from becoming thousands of threads.
MAX_WORKERS = int(os.environ.get("CLOUDSEND_MAX_WORKERS", "64"))

# Called in the flow's process with each job's result as it ends (the CLI's progress bar listens here).
job_listeners: list[Callable[[JobResult, int], None]] = []


def _run_name() -> str:
    params = flow_run.parameters
    return str(params.get("batch") or Path(str(params.get("config") or params.get("cluster") or "batch")).stem)


def batch_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "batch"


def resolve_config(
    config: str | None,
    cluster: str | None,
    jobs: list[Job] | None,
    base_dir: str | None,
    exec_python_config: bool = False,
) -> tuple[BatchConfig, list[JobSpec]]:
    """The batch to run, fully validated (files included) before anything is created."""
    if bool(config) == bool(cluster):
        raise ConfigError("give either a config file (config) or a saved cluster block (cluster), not both")
    if config:
        cfg = load_config(config, allow_exec=exec_python_config)
        if jobs:
            data = {**cfg.model_dump(exclude_unset=True), "jobs": [j.model_dump(exclude_unset=True) for j in jobs]}
            cfg = parse_config(data, source=cfg.source, base_dir=cfg.base_dir)
    else:
        from cloudsend_prefect.block import CloudSendCluster

        if not jobs:
            raise ConfigError(f"cluster {cluster!r}: give the jobs to run as the `jobs` parameter")
        block = CloudSendCluster.load(str(cluster))
        assert isinstance(block, CloudSendCluster)  # the sync API, as this flow is sync
        cfg = block.to_config(jobs, Path(base_dir or Path.cwd()), source=f"block cloudsend-cluster/{cluster}")
    return cfg, expand_jobs(cfg, jobs)


@flow(
    name="cloudsend",
    flow_run_name=_run_name,
    task_runner=ThreadPoolTaskRunner(max_workers=MAX_WORKERS),  # type: ignore[arg-type]
    validate_parameters=True,
)
def cloudsend(
    config: str | None = None,
    cluster: str | None = None,
    jobs: list[Job] | None = None,
    batch: str | None = None,
    results_dir: str = "cloudsend-results",
    base_dir: str | None = None,
    rerun: bool = False,
    exec_python_config: bool = False,
) -> BatchSummary:
    """Run a batch of jobs on the cluster's hosts and bring their outputs back.

    Args:
        config: A config file (YAML, JSON, TOML or the predecessor's .py) with instances, environments, jobs.
        cluster: Instead of a file, the name of a saved `cloudsend-cluster` block; then `jobs` are required.
        jobs: Jobs to run (replacing the file's jobs, if any).
        batch: Names the batch (its results folder, its runs on the hosts); defaults to the project.
        results_dir: Outputs land in `<results_dir>/<batch>/<job>/`.
        base_dir: With a block, the directory relative job paths start from (default: working directory).
        rerun: Run every job again, even those that finished in an earlier run.
        exec_python_config: Run a .py config as Python (it may do anything) instead of reading its literal.
    """
    logger = get_run_logger()
    cfg, specs = resolve_config(config, cluster, jobs, base_dir, exec_python_config)
    for note in cfg.notes:
        logger.warning("%s: %s", cfg.source, note)
    name = batch_slug(batch or cfg.project)
    dest = Path(results_dir) / name
    provisioning = time.time()  # billed time of every aws host runs from here to teardown (an upper bound)
    hosts = provision(cfg)
    refresh = rerun or not cfg.recover
    results: dict[str, JobResult] = {}
    dispatcher: Dispatcher | None = None
    try:  # from here on, whatever happens, teardown runs
        dispatcher = Dispatcher(name, hosts, cfg.poll_interval, rerun=refresh, lost_after=cfg.lost_after)
        dispatcher.start()
        envs = {job.env.key: job.env for job in specs if job.env}
        boots = [
            bootstrap.with_options(task_run_name=f"bootstrap-{env.name}-{host.name}").submit(host, env, dispatcher)
            for host in hosts
            for env in envs.values()
        ]
        plan_batch(specs, hosts, name)
        results = _run_jobs(specs, name, dispatcher, dest, refresh=refresh)
        for boot in boots:
            boot.wait()
    finally:
        if dispatcher is not None:
            dispatcher.stop()
        trips = {host.name: connect(host).round_trips for host in hosts}
        teardown(hosts, cfg)
        cost = _report_cost(name, hosts, time.time() - provisioning, kept=not cfg.auto_stop)
    summary = BatchSummary(
        batch=name, results_dir=str(dest), jobs=[results[job.key] for job in specs], round_trips=trips, cost=cost
    )
    create_table_artifact(
        key=f"{name}-jobs",
        table=[r.model_dump(exclude={"store"}) for r in summary.jobs],
        description=f"Jobs of batch {name}: " + ", ".join(f"{n} {s}" for s, n in sorted(summary.counts.items())),
    )
    logger.info(
        "batch %s: %s; results in %s; %d round trips to hosts for %d jobs",
        name,
        summary.counts,
        dest,
        sum(trips.values()),
        len(specs),
    )
    return summary


def _report_cost(batch: str, hosts: list[HostInfo], seconds: float, *, kept: bool) -> float | None:
    """The aws instances' billed hours and cost as the `<batch>-cost` table artifact and a log line; the total,
    or None without aws hosts. Never raises: a failed report must not hide the batch's own outcome."""
    logger = get_run_logger()
    try:
        report = cost_report(hosts, seconds)
        if report is None:
            return None
        still = " Instances were kept running (auto_stop: false): they are still billing." if kept else ""
        create_table_artifact(
            key=f"{batch}-cost",
            table=report.table(),
            description=f"Cost of batch {batch}'s EC2 instances in USD: billed time, upper bound: from provisioning "
            "to teardown, per second with a 60 s minimum; on-demand prices from cloudsend's catalog (us-east-1 list "
            "prices; other regions differ), spot prices from EC2 when it answered. EBS disks and data transfer "
            "are not included." + still,
        )
        logger.info("batch %s %s%s", batch, cost_line(report, seconds), still)
        return report.total
    except Exception as exc:
        logger.warning("batch %s: no cost report: %s: %s", batch, type(exc).__name__, exc)
        return None


def _run_jobs(
    specs: list[JobSpec], batch: str, dispatcher: Dispatcher, dest: Path, *, refresh: bool
) -> dict[str, JobResult]:
    """Submit one task per job and deliver each job's outputs as it ends (a cached job's from the store)."""
    logger = get_run_logger()
    progress = create_progress_artifact(progress=0.0, key=f"{batch}-progress", description=f"jobs of {batch} ended")
    assert isinstance(progress, UUID)
    results: dict[str, JobResult] = {}
    last_update = 0.0

    def submit(job: JobSpec, refresh_cache: bool) -> PrefectFuture[JobResult | State[JobResult]]:
        options = run_job.with_options(
            task_run_name=job.name,
            retries=job.max_retries + LOSS_RETRIES,
            retry_condition_fn=retry_policy(job.max_retries),
            retry_delay_seconds=1,
            refresh_cache=refresh_cache,
            result_storage=cloudsend_home() / "results",
        )
        return options.submit(job, batch, dispatcher)

    by_future = {submit(job, refresh): job for job in specs}
    while by_future:
        again: dict[PrefectFuture[JobResult | State[JobResult]], JobSpec] = {}
        for future in as_completed(list(by_future)):
            job = by_future[future]
            result = _outcome(future, job)
            if result.ok and not deliver(result, dest / job.name):
                logger.warning("%s: cached outputs are gone from %s; running it again", job.name, result.store)
                again[submit(job, True)] = job
                continue
            if not result.ok and result.store:
                deliver(result, dest / job.name)
            results[job.key] = result
            for listener in job_listeners:
                listener(result, len(specs))
            emit_event(
                event=f"cloudsend.job.{result.state}",
                resource={"prefect.resource.id": f"cloudsend.job.{batch}.{job.key}", "prefect.resource.name": job.name},
                payload={"batch": batch, "exit_code": result.exit_code, "reason": result.reason, "host": result.host},
            )
            if time.monotonic() - last_update > 1.0 or len(results) == len(specs):
                last_update = time.monotonic()
                update_progress_artifact(artifact_id=progress, progress=100.0 * len(results) / len(specs))
        by_future = again
    return results


def _outcome(future: PrefectFuture[JobResult | State[JobResult]], job: JobSpec) -> JobResult:
    value = future.result(raise_on_failure=False)
    if isinstance(value, JobResult):
        return value
    return JobResult(name=job.name, key=job.key, state="aborted", reason=f"{type(value).__name__}: {value}")
