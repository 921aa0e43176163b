"""The ``cloudsend`` flow: provision → bootstrap environments → plan → run jobs (fetching outputs) → teardown."""

# No `from __future__ import annotations`: served flows are cloudpickled by value; list[Job] must not be a string.

import re
import socket
import time
from collections.abc import Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_client, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext
from prefect.runtime import flow_run
from prefect.states import Cancelled, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from cloudsend_prefect.buckets import upload
from cloudsend_prefect.bundle import Bundle, unpack
from cloudsend_prefect.config import Job
from cloudsend_prefect.dispatch import Dispatcher
from cloudsend_prefect.errors import ConfigError
from cloudsend_prefect.fleet import Fleet
from cloudsend_prefect.joblog import JobLog
from cloudsend_prefect.paths import cloudsend_home
from cloudsend_prefect.providers import Connections, HostInfo, cost_report, validate
from cloudsend_prefect.providers.costs import cost_line
from cloudsend_prefect.reporting import (
    Usage,
    cost_description,
    cost_table,
    jobs_description,
    jobs_table,
    measure,
    summary_markdown,
)
from cloudsend_prefect.resolve import Batch, resolve_batch
from cloudsend_prefect.results import BatchFailed, BatchSummary, JobResult
from cloudsend_prefect.running import Listener, cancel_requested, run_coroutine, run_jobs, wait_until_recorded
from cloudsend_prefect.tasks import plan_batch, provision, teardown

# Threads for the bootstrap tasks (jobs' task runs are coroutines: they hold no thread while they wait); read
# as each run starts (see BootstrapThreads).
MAX_WORKERS = 16
MIN_WINDOW = 64  # job task runs alive at once, at least (else twice the fleet's CPU slots)
EARLY_TASK_RUNS = 2  # provision and plan: ended before the jobs' task runs start


class BootstrapThreads(ThreadPoolTaskRunner[Any]):
    """The flow's task runner: each run gets a pool of ``MAX_WORKERS`` threads, that number read as it starts.

    Prefect duplicates the flow's task runner when a run starts; that copy, not the one made when the module
    was imported, sets the run's thread count.
    """

    def duplicate(self) -> "BootstrapThreads":
        """A fresh runner for one flow run, with the thread count the module says now."""
        return type(self)(max_workers=MAX_WORKERS)


@dataclass(frozen=True)
class _Given:
    """What ``run_batch`` hands one call of the flow besides its parameters: objects that do not serialise."""

    batch: Batch | None
    listeners: tuple[Listener, ...]


# Set by run_batch for the duration of one flow call only (a flow run's parameters are recorded by the API and
# shown in the UI: they keep the config's path, not its thousands of resolved jobs or a callback).
_given: ContextVar[_Given | None] = ContextVar("cloudsend_given", default=None)


def _handed() -> _Given:
    """What ``run_batch`` handed this call of the flow (nothing when it was not called through it). A function,
    not the variable in the flow's body: `serve()` cloudpickles the flow function by value, and a ContextVar
    does not pickle (this function goes by reference)."""
    return _given.get() or _Given(batch=None, listeners=())


def _run_name() -> str:
    params = flow_run.parameters
    return str(params.get("batch") or Path(str(params.get("config") or params.get("cluster") or "batch")).stem)


def _name_run(name: str) -> None:
    """Name the flow run after its batch once the config says what that is: until then it bears the config
    file's name, which need not be the project's, while the artifacts and the results folder bear the batch's."""
    context = FlowRunContext.get()
    if context is None or context.flow_run is None or context.flow_run.name == name:
        return
    with get_client(sync_client=True) as client:
        client.set_flow_run_name(context.flow_run.id, name)
    context.flow_run.name = name


def batch_slug(name: str) -> str:
    """A batch's name as its results folder and its runs on the hosts use it: lower case, ``[a-z0-9-]``."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "batch"


def _resolve(
    config: str | None,
    cluster: str | None,
    jobs: list[Job] | None,
    base_dir: str | None,
    exec_python_config: bool = False,
) -> Batch:
    """The batch the flow's parameters name (a config file or a saved cluster block, and jobs), resolved once,
    fully validated (files included) before anything is created."""
    if not config and not cluster:
        raise ConfigError("nothing to run: give a config file (config) or a saved cluster block (cluster) and jobs")
    if config and cluster:
        raise ConfigError("give either a config file (config) or a saved cluster block (cluster), not both")
    if config:
        return resolve_batch(config, jobs or None, allow_exec=exec_python_config)
    from cloudsend_prefect.block import CloudSendCluster

    if not jobs:
        raise ConfigError(f"cluster {cluster!r}: give the jobs to run as the `jobs` parameter")
    block = CloudSendCluster.load(str(cluster))
    assert isinstance(block, CloudSendCluster)  # the sync API, as this flow is sync
    return resolve_batch(block, jobs, base_dir=Path(base_dir or Path.cwd()), name=f"block cloudsend-cluster/{cluster}")


@flow(
    name="cloudsend",
    flow_run_name=_run_name,
    task_runner=BootstrapThreads(max_workers=MAX_WORKERS),  # type: ignore[arg-type]
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
    bundle: Bundle | None = None,
    results_bucket: str | None = None,
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
        bundle: Instead of `config`, the config and its files as content (`cloudsend run --remote` sends them).
        results_bucket: An S3Bucket block: the results folder is also uploaded there, under `<batch>/`.

    The batch is resolved once, here (``resolve.resolve_batch``), unless ``run_batch`` was handed it resolved.

    Returns:
        The batch's summary; a run with a job not done ends Failed (``BatchFailed`` carries the summary).

    Raises:
        ConfigError: The parameters name no valid batch (nothing has been created).
    """
    logger = get_run_logger()
    given = _handed()
    if given.batch is not None:  # resolved by the caller (the CLI), from these parameters
        resolved = given.batch
    else:
        if bundle is not None:
            if config or cluster:
                raise ConfigError("give either a bundle or a config file or a cluster block, not several")
            config = str(unpack(bundle, cloudsend_home() / "bundles"))
        resolved = _resolve(config, cluster, jobs, base_dir, exec_python_config)
    cfg, specs = resolved.config, resolved.jobs
    validate(cfg)
    for note in cfg.notes:
        logger.warning("%s: %s", cfg.source, note)
    name = batch_slug(batch or cfg.project)
    if not batch:
        _name_run(name)
    dest = Path(results_dir) / name
    provisioning = time.time()  # billed time of every aws host runs from here to teardown (an upper bound)
    connections = Connections()  # the run's: one per host, shared by every task thread, closed as the run ends
    try:
        hosts = provision(cfg, connections)
    except BaseException:
        connections.close_all()
        raise
    refresh = rerun or not cfg.recover
    results: dict[str, JobResult] = {}
    dispatcher: Dispatcher | None = None
    fleet: Fleet | None = None
    try:  # from here on, whatever happens, teardown runs
        dispatcher = Dispatcher(name, hosts, connections, cfg.poll_interval, rerun=refresh, lost_after=cfg.lost_after)
        fleet = Fleet(cfg, hosts, specs, dispatcher)  # replaces lost instances, stops idle ones
        dispatcher.start()
        boots = fleet.bootstrap()
        plan_batch(specs, hosts, name)
        window = max(MIN_WINDOW, 2 * sum(h.cpus for h in hosts))  # task runs alive at once
        results, job_runs = run_coroutine(
            run_jobs(
                specs,
                name,
                dispatcher,
                dest,
                refresh=refresh,
                window=window,
                listeners=[*given.listeners, fleet.settled, JobLog(name, cfg.project, dest, specs)],
                ended_before=EARLY_TASK_RUNS,
            )
        )
        for boot in boots:
            boot.wait()
        # provision and plan, the bootstraps, the jobs' task runs: all in the UI before an ephemeral server stops
        wait_until_recorded(EARLY_TASK_RUNS + len(boots), job_runs)
    except BaseException:
        # Stopped by an error, Ctrl-C or a signal (a worker cancelling the run sends SIGTERM): the jobs go on
        # for a rerun to re-attach to, unless the flow run is being cancelled: then they are cancelled too.
        if dispatcher is not None and dispatcher.cancelled is None and cancel_requested():
            dispatcher.cancel("the flow run was cancelled")
        raise
    finally:
        if fleet is not None:
            fleet.close()
            hosts = fleet.hosts  # replacements included
        if dispatcher is not None:
            dispatcher.stop()
        trips = {host.name: connections.get(host).round_trips for host in hosts}
        try:
            teardown(hosts, cfg, connections)
        finally:  # a teardown that failed leaves no connection open either
            connections.close_all()
        ended = time.time()
        usage = measure(results.values(), {job.key: job.cpus for job in specs}, hosts, ended - provisioning)
        billed = fleet.billed(provisioning, ended) if fleet is not None else {h.name: usage.seconds for h in hosts}
        cost = _report_cost(name, hosts, usage, billed, kept=not cfg.auto_stop)
    summary = BatchSummary(
        batch=name, results_dir=str(dest), jobs=[results[job.key] for job in specs], round_trips=trips, cost=cost
    )
    _report_jobs(summary, usage)
    logger.info(
        "batch %s: %s; results in %s; %d round trips to hosts for %d jobs",
        name,
        summary.counts,
        dest,
        sum(trips.values()),
        len(specs),
    )
    if results_bucket:
        try:
            logger.info("batch %s: results uploaded to %s", name, upload(results_bucket, dest, name))
        except Exception as exc:  # the results stay on this machine's disk; the run says they are not there
            message = f"results of batch {name} not uploaded to bucket {results_bucket}: {exc}; they are in {dest}"
            logger.error(message)
            if summary.ok and (dispatcher is None or dispatcher.cancelled is None):
                return Failed(message=message, data=summary)  # type: ignore[return-value]
    if dispatcher is not None and dispatcher.cancelled is not None:
        return Cancelled(message=f"cancelled: {summary.failure()}", data=BatchFailed(summary))  # type: ignore[return-value]
    if not summary.ok:  # the run is Failed (automations, `--watch`, the runs list see it); the summary rides along
        return Failed(message=summary.failure(), data=BatchFailed(summary))  # type: ignore[return-value]
    return summary


def run_batch(resolved: Batch | None = None, *, listeners: Sequence[Listener] = (), **parameters: Any) -> BatchSummary:
    """Run the ``cloudsend`` flow in this process and return the batch's summary, whether every job was done or
    not (calling the flow itself raises ``BatchFailed`` when one was not, as its run is Failed).

    Args:
        resolved: The batch ``parameters`` name, already resolved (``resolve.resolve_batch``): the flow runs it
            as it is instead of reading the config again. The flow run still records ``parameters`` (the
            config's path...), which is what its page in the UI shows.
        listeners: Called in this process with each job's result as it ends, and the number of jobs (the
            CLI's progress bar).
        **parameters: The flow's parameters (see ``cloudsend``).

    Returns:
        The batch's summary.

    Raises:
        ConfigError: Without ``resolved``, the parameters name no valid batch.
        Exception: Whatever else stops the flow itself (no host, for one).
    """
    token = _given.set(_Given(batch=resolved, listeners=tuple(listeners)))
    try:
        return summary_of(cloudsend(**parameters, return_state=True))
    finally:
        _given.reset(token)


def summary_of(state: State[Any]) -> BatchSummary:
    """The batch's summary from the final state of a ``cloudsend`` flow run, Completed or Failed."""
    value = state.result(raise_on_failure=False)
    if isinstance(value, BatchFailed):
        return value.summary
    if isinstance(value, BatchSummary):
        return value
    if isinstance(value, BaseException):
        raise value
    raise RuntimeError(f"the flow run ended {state.name} without a batch summary: {state.message}")


def _report_cost(
    batch: str, hosts: list[HostInfo], usage: Usage, billed: dict[str, float], *, kept: bool
) -> float | None:
    """The `<batch>-cost` table artifact of every batch (CPU time used against available, per host; for aws
    hosts, billed hours and USD) and its log lines; the aws total, or None without aws hosts. Never raises: a
    failed report must not hide the batch's own outcome."""
    logger = get_run_logger()
    try:
        logger.info("batch %s: %s", batch, usage.line())
        report = cost_report(hosts, billed)
        still = " Instances were kept running (auto_stop: false): they are still billing." if kept and report else ""
        description = cost_description(batch, usage, report) + still
        create_table_artifact(key=f"{batch}-cost", table=cost_table(usage, report), description=description)
        if report is None:
            return None
        logger.info("batch %s %s%s", batch, cost_line(report), still)
        return report.total
    except Exception as exc:
        logger.warning("batch %s: no cost report: %s: %s", batch, type(exc).__name__, exc)
        return None


def _report_jobs(summary: BatchSummary, usage: Usage) -> None:
    """The `<batch>-jobs` table (bounded: the jobs not done, then the slowest) and the `<batch>-summary`
    markdown, made last so that the flow run's Artifacts tab, newest first, opens on it.

    Keys are the batch's, the same for every run of it: Prefect keeps each run's artifact as a version of the
    key, and a run's page lists its own artifacts only, so no run hides another's; the Artifacts page shows one
    entry per batch and kind, the latest run's, with the history of every run behind it. A key per run would
    instead add entries there at every run (a nightly batch: over a thousand a year) and lose the history.
    Never raises: the batch's outcome matters more than its report."""
    try:
        table, description = jobs_table(summary), jobs_description(summary)
        create_table_artifact(key=f"{summary.batch}-jobs", table=table, description=description)
        create_markdown_artifact(
            key=f"{summary.batch}-summary",
            markdown=summary_markdown(summary, usage, run=str(flow_run.name), machine=socket.gethostname()),
            description=f"Batch {summary.batch}: what ran, how long, what it used and cost, where the results are",
        )
    except Exception as exc:
        get_run_logger().warning("batch %s: no job report: %s: %s", summary.batch, type(exc).__name__, exc)
