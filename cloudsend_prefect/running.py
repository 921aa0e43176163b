"""Running a batch's jobs as Prefect task runs: one per job, all waiting at once on one event loop.

A job's task run is a coroutine that awaits the dispatcher: waiting holds no thread, so the only limit on
how many jobs run at once is the hosts' CPU slots. Task runs are started in a window (a few times the
fleet's slots) rather than all at once, and new ones wait while the Prefect server lags behind in recording
the ended ones: a burst of events beyond its queue would be dropped, and the UI would miss task runs. What
the server still misses at the batch's end (an event its messaging lost) is set through its API.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

from prefect import Task, get_run_logger
from prefect.artifacts import acreate_progress_artifact, aupdate_progress_artifact
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    TaskRunFilter,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import TaskRunSort
from prefect.context import AsyncClientContext, FlowRunContext
from prefect.events import emit_event
from prefect.runtime import flow_run
from prefect.states import State
from prefect.task_engine import run_task_async
from prefect.utilities.engine import emit_task_run_state_change_event

from cloudsend_prefect.dispatch import Dispatcher
from cloudsend_prefect.paths import cloudsend_home
from cloudsend_prefect.results import JobResult, deliver
from cloudsend_prefect.specs import JobSpec
from cloudsend_prefect.tasks import never_started, run_job

MAX_BACKLOG = 800  # task runs the server may be behind in recording (about 4 events each; its queue holds 10,000)
LAG_CHECK = 0.5  # seconds between two looks at the server's records while it lags
DRAIN_TIMEOUT = 120.0  # seconds the batch waits at its end for the server to record its last task runs
STALL = 15.0  # seconds without progress in the server's records, after which the missing states are set directly
PROGRESS_EVERY = 1.0  # seconds between two updates of the progress artifact
FINAL = [StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED]
UNENDED = [state for state in StateType if state not in FINAL]
PAGE = 200  # task runs read per request while reconciling

Ended = dict[UUID, tuple[StateType, str | None, str | None]]  # task run → its final state here: type, name, message

_T = TypeVar("_T")
Listener = Callable[[JobResult, int], None]


def run_coroutine(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine to its end from sync code (the flow), keeping the caller's context (the flow run):
    in this thread, or in a new one when this thread already runs an event loop (a notebook, say)."""
    try:
        asyncio.get_running_loop()
        in_loop = True
    except RuntimeError:  # not in a loop (the usual case); run outside this block, or every error chains to it
        in_loop = False
    if not in_loop:
        return asyncio.run(coroutine)
    context = contextvars.copy_context()
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(context.run, asyncio.run, coroutine).result()


def wait_until_recorded(others: int, jobs: Ended, timeout: float = DRAIN_TIMEOUT) -> None:
    """Wait (at most ``timeout`` s) until the server holds every ended task run of this flow run (``others``
    besides the jobs' ``jobs``): an ephemeral server stops with this process, and what it had not recorded by
    then would be missing. When its records stop moving short of that, the jobs' final states it misses are
    set through its API: its event messaging can lose an event (prefect-redis 0.3.0 trims a stream past what a
    lagging consumer has read when stream ids share a millisecond), and the task run would show Running for ever.
    """

    async def drain() -> None:
        async with get_client() as client:
            recorder = _Recorder(client, flow_run.id, others + len(jobs))
            if not await recorder.drain(timeout, jobs):
                get_run_logger().warning(
                    "the Prefect server has recorded %d of this flow run's %d task runs so far; the rest may be "
                    "missing from the UI (results and outputs are complete)",
                    recorder.recorded,
                    recorder.ended,
                )

    run_coroutine(drain())


def cancel_requested() -> bool:
    """Whether this flow run is being (or was) cancelled, asked of the server now."""

    async def ask() -> bool:
        async with get_client() as client:
            return await _cancel_requested(client, flow_run.id)

    return run_coroutine(ask())


class _Recorder:
    """How far the Prefect server is behind this flow run in recording its task runs.

    The server records task runs from their events (about four each: pending, running, an end state, the
    job's own event), queued in memory on the ephemeral server, which drops what overflows 10,000. The
    backlog is estimated from what the server shows: task runs begun here that it has no record of yet, and
    task runs ended here that it does not show ended yet. Counting uses a client of its own, so it is never
    stuck behind the task runs' own requests; a failed count leaves the estimate as it was (held back).
    """

    def __init__(self, client: PrefectClient, flow_run_id: str | None, ended_before: int = 0) -> None:
        self.client = client
        self.flow_run_id = flow_run_id
        self.started = ended_before  # task runs of the flow run begun here
        self.ended = ended_before  # ... that reached a final state here
        self.seen = 0  # task runs the server has a record of
        self.recorded = 0  # ... in a final state
        self._checked = 0.0
        self._counting = asyncio.Lock()  # one count at a time, however many task runs wait to begin

    @property
    def backlog(self) -> int:
        return max(0, self.started - self.seen) + max(0, self.ended - self.recorded)

    async def _count(self, final: bool) -> int:
        assert self.flow_run_id is not None
        runs = TaskRunFilter(state=dict(type=TaskRunFilterStateType(any_=FINAL))) if final else TaskRunFilter()
        body = {
            "flow_runs": FlowRunFilter(id=FlowRunFilterId(any_=[UUID(self.flow_run_id)])).model_dump(
                mode="json", exclude_unset=True
            ),
            "task_runs": runs.model_dump(mode="json", exclude_unset=True),
        }
        response = await self.client.request("POST", "/task_runs/count", json=body)
        response.raise_for_status()
        return int(response.json())

    async def refresh(self) -> None:
        if self.flow_run_id is None:  # not in a flow run (tests calling the function): nothing to wait for
            self.seen, self.recorded = self.started, self.ended
            return
        try:
            self.seen, self.recorded = await self._count(final=False), await self._count(final=True)
        except Exception as exc:  # a busy server: the estimate stays as it was, and is asked again soon
            get_run_logger().debug("cannot count the recorded task runs yet: %r", exc)
        self._checked = time.monotonic()

    async def admit(self) -> None:
        """Return once the server's backlog for this flow run is below ``MAX_BACKLOG``; counts the start."""
        while self.backlog >= MAX_BACKLOG:
            async with self._counting:  # the waiters behind the one counting take its figures
                if self.backlog >= MAX_BACKLOG and time.monotonic() - self._checked >= LAG_CHECK:
                    await self.refresh()
            if self.backlog >= MAX_BACKLOG:
                await asyncio.sleep(LAG_CHECK)
        self.started += 1

    async def drain(self, timeout: float, jobs: Ended) -> bool:
        """Wait (at most ``timeout`` s) until the server has recorded every ended task run; each time its
        records stand still for ``STALL`` s, set the final states it misses among ``jobs``."""
        deadline = time.monotonic() + timeout
        last, still_since = (-1, -1), time.monotonic()
        while True:
            await self.refresh()
            now = time.monotonic()
            if self.recorded >= self.ended or now >= deadline:
                return self.recorded >= self.ended
            if (self.seen, self.recorded) != last:
                last, still_since = (self.seen, self.recorded), now
            elif now - still_since >= STALL and self.flow_run_id is not None:
                fixed = await _reconcile(self.client, UUID(self.flow_run_id), jobs)
                get_run_logger().warning(
                    "the Prefect server's records of this flow run stood still %d task runs short of its %d ended "
                    "ones; %d final states it had missed were set through its API",
                    self.ended - self.recorded,
                    self.ended,
                    fixed,
                )
                still_since = time.monotonic()
            await asyncio.sleep(LAG_CHECK)


async def _reconcile(client: PrefectClient, flow_run_id: UUID, jobs: Ended) -> int:
    """Set, through the server's API, the final state of each job task run that ended here but that the server
    shows unended (its event was lost); returns how many. A late event cannot undo it: the server keeps a task
    run's newest state. Task runs it has no record of at all are left as they are (and counted as missing)."""
    flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    unended = TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=UNENDED)))
    fixed = skipped = 0
    while True:
        try:
            page = await client.read_task_runs(
                flow_run_filter=flow_runs, task_run_filter=unended, sort=TaskRunSort.ID_DESC, limit=PAGE, offset=skipped
            )
        except Exception as exc:  # a busy server: asked again at the next stall
            get_run_logger().debug("cannot read the unended task runs: %r", exc)
            return fixed
        for run in page:
            final = jobs.get(run.id)
            if final is None:  # not a job's, or not ended here: not ours to end; stays in the filter
                skipped += 1
                continue
            kind, name, message = final
            try:
                await client.set_task_run_state(run.id, State(type=kind, name=name, message=message), force=True)
                fixed += 1
            except Exception:
                skipped += 1  # refused: stays in the filter, stepped over
        if len(page) < PAGE:
            return fixed


async def run_jobs(
    specs: list[JobSpec],
    batch: str,
    dispatcher: Dispatcher,
    dest: Path,
    *,
    refresh: bool,
    window: int,
    listeners: list[Listener],
    ended_before: int = 0,
) -> tuple[dict[str, JobResult], Ended]:
    """Run every job as its own task run and deliver each one's outputs to ``dest/<job>`` as it ends (a
    cached job's from the client-side store). ``ended_before``: task runs of the flow run that ended before
    (they count in the server's records). Returns the results by job key, and the final state of each task
    run made (a job whose cached outputs were gone has two); the flow, which is sync, runs it with
    ``run_coroutine``."""
    logger = get_run_logger()
    # One API client for every task run, another for counting what the server recorded.
    async with AsyncClientContext.get_or_create(), get_client() as counter:
        recorder = _Recorder(counter, flow_run.id, ended_before)
        progress = await acreate_progress_artifact(
            progress=0.0, key=f"{batch}-progress", description=f"jobs of {batch} ended"
        )
        results: dict[str, JobResult] = {}
        ended: Ended = {}
        earlier = _run_results()
        kept = set(earlier) if earlier is not None else set()
        variants: dict[tuple[int, bool], Task[Any, Any]] = {}

        def task_for(job: JobSpec, refresh_cache: bool) -> Task[Any, Any]:
            """The task with this job's retry policy (one variant per policy, not per job)."""
            key = (job.max_retries, refresh_cache)
            if key not in variants:
                variants[key] = run_job.with_options(
                    retries=job.max_retries,  # the job's own: a lost host is dealt with inside the task run
                    retry_delay_seconds=1,
                    refresh_cache=refresh_cache,
                    result_storage=cloudsend_home() / "results",
                )
            return variants[key]

        async def one(job: JobSpec) -> None:
            refresh_cache = refresh
            while True:
                if dispatcher.cancelled is not None:  # no task run for a job the batch will never start
                    result = never_started(job)
                    break
                await recorder.admit()
                run_id, state = await _run_named(task_for(job, refresh_cache), job, batch, dispatcher)
                ended[run_id] = (state.type, state.name, state.message)
                recorder.ended += 1
                result = await _outcome(state, job)
                if result.ok and not await asyncio.to_thread(deliver, result, dest / job.name):
                    logger.warning("%s: cached outputs are gone from %s; running it again", job.name, result.store)
                    refresh_cache = True
                    continue
                break
            if not result.ok and result.store:
                await asyncio.to_thread(deliver, result, dest / job.name)
            results[job.key] = result
            for listener in listeners:
                listener(result, len(specs))
            emit_event(
                event=f"cloudsend.job.{result.state}",
                resource={"prefect.resource.id": f"cloudsend.job.{batch}.{job.key}", "prefect.resource.name": job.name},
                payload={"batch": batch, "exit_code": result.exit_code, "reason": result.reason, "host": result.host},
            )

        async def watch() -> None:
            """Once a second while jobs run: the progress artifact (one writer: updates stay in order), and
            whether the flow run is being cancelled (from the UI, `prefect flow-run cancel` or the API): then
            the batch's jobs are cancelled on their hosts, and their task runs end Cancelled."""
            shown = -1
            while True:
                _forget_results(kept)
                if isinstance(progress, UUID) and len(results) != shown:
                    shown = len(results)
                    await aupdate_progress_artifact(artifact_id=progress, progress=100.0 * shown / (len(specs) or 1))
                if len(results) == len(specs):
                    return
                if dispatcher.cancelled is None and await _cancel_requested(counter, flow_run.id):
                    logger.warning("the flow run is being cancelled: cancelling the batch's jobs on their hosts")
                    keys = await asyncio.to_thread(dispatcher.cancel, "the flow run was cancelled")
                    logger.warning(
                        "%d jobs cancelled on the hosts (running ones killed, queued ones dropped)", len(keys)
                    )
                await asyncio.sleep(PROGRESS_EVERY)

        waiting = iter(specs)

        async def worker() -> None:  # a window of these, not a coroutine per job: memory stays flat in N
            for job in waiting:
                await one(job)

        reporter = asyncio.create_task(watch())
        try:
            await asyncio.gather(*(worker() for _ in range(min(window, len(specs)))))
            await reporter
        finally:
            reporter.cancel()
            _forget_results(kept)
    return results, ended


def _run_results() -> dict[int, Any] | None:
    """Prefect's record of every task result of the flow run (to draw data dependencies between tasks)."""
    context = FlowRunContext.get()
    return context.run_results if context is not None else None


def _forget_results(kept: set[int]) -> None:
    """Drop the job task runs' entries from Prefect's record of task results: no task takes a job's result
    as input, and kept, they grow the flow's memory by a few KiB per job (hundreds of MB at 50,000)."""
    records = _run_results()
    if records is not None:
        for key in [key for key in records if key not in kept]:
            del records[key]


async def _run_named(task: Task[Any, Any], job: JobSpec, batch: str, dispatcher: Dispatcher) -> tuple[UUID, State[Any]]:
    """Run the job's task, its task run named after the job from its first state. Prefect 3.9 applies a
    ``task_run_name`` only as the run starts, after its Pending state went out under a generic name
    (``run-job-1a2``, which the UI shows until then): here the run is made and named first, its Pending
    state sent, and the engine takes it from there."""
    parameters = {"job": job, "batch": batch, "dispatcher": dispatcher}
    run = await task.create_local_run(parameters=parameters)
    run.name = job.name
    assert run.state is not None  # Pending, as made
    emit_task_run_state_change_event(task_run=run, initial_state=None, validated_state=run.state)
    state = await run_task_async(task, task_run=run, parameters=parameters, return_type="state")
    assert isinstance(state, State)
    return run.id, state


async def _cancel_requested(client: PrefectClient, flow_run_id: str | None) -> bool:
    """Whether this flow run is being (or was) cancelled; False outside a flow run, or when the server does
    not answer (asked again a second later)."""
    if flow_run_id is None:
        return False
    try:
        run = await client.read_flow_run(UUID(flow_run_id))
    except Exception:
        return False
    return run.state is not None and run.state.type in (StateType.CANCELLING, StateType.CANCELLED)


async def _outcome(state: State[Any], job: JobSpec) -> JobResult:
    """The job's result from its task run's final state (a cached one is marked so)."""
    value = await state.aresult(raise_on_failure=False)
    if isinstance(value, JobResult):
        # a cached result keeps the name the job has now (it may have been renamed since, its content the same)
        return value.model_copy(update={"cached": True, "name": job.name}) if state.name == "Cached" else value
    return JobResult(name=job.name, key=job.key, state="aborted", reason=f"{type(value).__name__}: {value}")
