"""Batches run by the controller: submitted as runs of the ``cloudsend/batch`` deployment, found again by their
batch name through the Prefect API (status, logs, cancel), their results fetched from the controller's disk."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from cloudsend_prefect.bundle import Bundle
from cloudsend_prefect.controller import (
    DEPLOYMENT_FLOW,
    DEPLOYMENT_NAME,
    ControllerError,
    ControllerSettings,
    layout_of,
)
from cloudsend_prefect.transport import Transport

DEPLOYMENT = f"{DEPLOYMENT_FLOW}/{DEPLOYMENT_NAME}"
PAGE = 200  # rows per API read: the server's default and largest page (PREFECT_API_DEFAULT_LIMIT)

T = TypeVar("T")


def paged(read: Callable[[int, int], list[T]]) -> list[T]:
    """Every row of an API listing, read a page at a time (``read(limit, offset)``) until a short page: one read
    returns at most ``PAGE`` rows, so a batch of thousands of jobs needs several."""
    rows: list[T] = []
    while True:
        page = read(PAGE, len(rows))
        rows += page
        if len(page) < PAGE:
            return rows


def submit(bundle: Bundle, batch: str, *, rerun: bool, bucket: str | None, exec_python_config: bool) -> Any:
    """A run of the deployment carrying the batch (returns at once: the controller's worker picks it up)."""
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    parameters = {"bundle": bundle.model_dump(), "batch": batch, "rerun": rerun}
    if exec_python_config:
        parameters["exec_python_config"] = True
    if bucket:
        parameters["results_bucket"] = bucket
    try:
        return run_deployment(DEPLOYMENT, parameters=parameters, timeout=0, flow_run_name=batch)
    except ObjectNotFound:
        msg = f"no deployment {DEPLOYMENT}: start the controller first (`cloudsend controller up`)"
        raise ControllerError(msg) from None


def flow_run_of(batch: str) -> Any:
    """The newest run of the deployment for this batch (its run is named after it)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterName,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[DEPLOYMENT_FLOW])),
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[batch])),
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[DEPLOYMENT_NAME])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=10,
        )
    if not runs:
        raise ControllerError(f"no run of {DEPLOYMENT} for batch {batch} in the Prefect API")
    return max(runs, key=lambda r: r.created.timestamp() if r.created else 0.0)


def flow_run(flow_run_id: Any) -> Any:
    """A flow run as the API has it now (its state among the rest)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


@dataclass
class JobRun:
    """A job's newest task run in a remote batch's flow run: what ``status --remote`` shows and ``logs
    --remote`` reads the lines of (by ``id``).
    """

    name: str
    state: str
    id: Any


def job_runs(flow_run_id: Any, job_names: set[str]) -> list[JobRun]:
    """The jobs' task runs of a flow run (its other tasks, provision or plan, left out), by job name; a few jobs
    are looked for by name on the server, a whole batch read page by page."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName
    from prefect.client.schemas.sorting import TaskRunSort

    of_run = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    named = TaskRunFilter(name=TaskRunFilterName(any_=sorted(job_names))) if len(job_names) <= PAGE else None
    with get_client(sync_client=True) as client:
        runs = paged(
            lambda limit, offset: client.read_task_runs(
                flow_run_filter=of_run, task_run_filter=named, sort=TaskRunSort.ID_DESC, limit=limit, offset=offset
            )
        )
    newest: dict[str, Any] = {}
    for run in runs:
        if run.name in job_names and (run.name not in newest or run.created > newest[run.name].created):
            newest[run.name] = run
    return [JobRun(name, r.state.name if r.state else "?", r.id) for name, r in sorted(newest.items())]


def log_lines(task_run_id: Any) -> list[str]:
    """What the job's task run logged (its live output lines among them), oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId
    from prefect.client.schemas.sorting import LogSort

    of_run = LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run_id]))
    with get_client(sync_client=True) as client:
        logs = paged(
            lambda limit, offset: client.read_logs(
                log_filter=of_run, limit=limit, offset=offset, sort=LogSort.TIMESTAMP_ASC
            )
        )
    return [log.message for log in logs]


def cancel(flow_run_id: Any) -> None:
    """Ask for the flow run's cancellation: the worker stops it, and the flow cancels the batch's jobs."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Cancelling(message="cancelled with `cloudsend cancel`"), force=True)


def fetch(settings: ControllerSettings, batch: str, dest: Path) -> list[Path]:
    """Copy the batch's results folder from the controller's disk to ``dest/<batch>/`` (over SSH through the
    aws provider); the files copied."""
    from cloudsend_prefect.providers import Connections
    from cloudsend_prefect.providers.aws.controller import controller_host

    host = controller_host(settings.batch_config())
    if host is None:
        raise ControllerError(
            f"controller of {settings.project} is not running: `cloudsend controller up` starts it again"
        )
    with Connections() as connections:
        return _copy(connections.get(host), batch, dest)


def _copy(transport: Transport, batch: str, dest: Path) -> list[Path]:
    """Copy the batch's results folder from the controller over ``transport``; the files copied."""
    source = layout_of(transport).results(batch)
    listing = transport.run(f"cd {shlex.quote(source)} && find . -type f -print0")
    if listing.exit_code != 0:
        raise ControllerError(f"no results of batch {batch} on the controller ({source})")
    copied = []
    for rel in filter(None, listing.stdout.split("\0")):
        parts = PurePosixPath(rel).parts  # ./a/b: the "." is dropped
        if not parts or ".." in parts:
            continue
        local = dest.joinpath(batch, *parts)
        transport.get(f"{source}/{'/'.join(parts)}", local)
        copied.append(local)
    return copied
