"""Online placement of jobs on hosts, and watching them, at one round trip per host per poll.

Each host has one thread. It takes waiting jobs that fit its window (its CPUs plus a prefetch that grows
with how fast it finishes jobs) and stages them in one ``host.sh stage`` call; once per poll interval it
reads the state of the jobs it watches in one ``host.sh status`` call and wakes the task threads whose jobs
ended. The host itself starts queued jobs the moment CPUs free up, so a job never waits for the client's
next poll to start.

A poll is one round trip: it stages the jobs taken since the last one and reads the states of the staged
ones (``host.sh tick``). The window is wide enough (two poll intervals of finishing jobs) that a host rarely
runs short before the next poll; between polls a host thread stages only when it may (no more staged than
it has CPUs), and since tasks submit jobs one by one, it first waits a moment (``GATHER``) for more to
arrive. Fetching a job's outputs and logs costs round trips of its own, per job.

The fleet can change while the batch runs: a host can join (``add_host`` then ``join``: a lost instance's
replacement), and a cloud host with no work left that could reach it is handed to ``on_idle`` (to be stopped
at once) once every job of the batch is accounted for (``expect``/``settle``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cloudsend_prefect import providers
from cloudsend_prefect.placement import Amount, can_host, fits
from cloudsend_prefect.protocol import RERUN_ANY, RERUN_FAILED, JobStatus
from cloudsend_prefect.providers import Connections, HostInfo
from cloudsend_prefect.runtime import HostRuntime
from cloudsend_prefect.specs import JobSpec

log = logging.getLogger("cloudsend.dispatch")

LOST_AFTER = 120.0  # default seconds of failed round trips before a host's unfinished jobs are aborted
CLOUD_CHECK = 15.0  # seconds between two looks at a cloud instance's state (the API's word decides loss at once)
GATHER = 0.02  # seconds a host thread with room waits for more submissions before staging (at most poll/4)
LIVE_AFTER = 10.0  # seconds a job runs before its logs are read while it runs (short jobs cost nothing extra)
LIVE_EVERY = 5.0  # seconds between two reads of a running job's logs
LIVE_JOBS = 8  # running jobs whose logs a host thread reads per poll, at most (two round trips each)
LIVE_BYTES = 64 * 1024  # bytes of each log read per look, at most
STOPPED = "the batch stopped watching it before it ended (it may still run on its host; a rerun re-attaches)"


class BatchCancelled(RuntimeError):
    """The batch was cancelled before this job was placed on a host: it never ran."""


@dataclass
class _Ticket:
    job: JobSpec
    rerun: int = 0  # RERUN_FAILED or RERUN_ANY when staged: what ended record of it the host may replace
    host: str | None = None
    status: JobStatus | None = None
    done: threading.Event = field(default_factory=threading.Event)
    wake: Callable[[], None] | None = None  # an awaiting coroutine's wake-up, called from a host thread
    output: Callable[[str, str], None] | None = None  # (stream, new complete lines) while it runs: live logs
    offsets: dict[str, int] = field(default_factory=lambda: {"stdout": 0, "stderr": 0})
    partial: dict[str, bytes] = field(default_factory=dict)  # a line begun, not ended yet
    next_look: float | None = None  # when its logs are read next (monotonic), once it is seen running

    def end(self) -> None:
        self.done.set()
        if self.wake is not None:
            self.wake()


@dataclass
class _HostState:
    info: HostInfo
    runtime: HostRuntime
    tickets: dict[str, _Ticket] = field(default_factory=dict)
    unstaged: list[_Ticket] = field(default_factory=list)  # taken, not yet confirmed staged (re-sent)
    committed: int = 0  # CPUs of the jobs taken and not seen ending
    gpus_committed: int = 0  # ... and their GPUs
    window: int = 0
    failing_since: float | None = None
    next_cloud_check: float = 0.0
    lost: str | None = None
    unclaimed: set[str] = field(default_factory=set)  # queued or running from an earlier run, no task yet
    released: bool = False  # handed to on_idle: no work left could reach it; it takes no more

    @property
    def live(self) -> bool:
        return self.lost is None and not self.released


class Dispatcher:
    """Runs jobs of one batch on a set of hosts; ``run(job)`` blocks the calling task until the job ends."""

    def __init__(
        self,
        batch: str,
        hosts: list[HostInfo],
        connections: Connections,
        poll_interval: float = 1.0,
        *,
        rerun: bool = False,
        lost_after: float = LOST_AFTER,
    ) -> None:
        self.batch = batch
        self.lost_after = lost_after
        # A host runs the batch's queued jobs only while this lease, renewed at every poll, runs: shorter than
        # lost_after, so a host cut off, or declared lost and back, starts nothing handed to another host.
        self.lease = max(1, int(lost_after // 2))
        self.rerun = rerun  # run again jobs that already ended done on a host
        self.poll_interval = poll_interval
        self.connections = connections  # the flow run's: one connection per host, shared by every task thread
        self.hosts = {h.name: _HostState(h, HostRuntime.for_host(h, connections), window=2 * h.cpus) for h in hosts}
        self._pending: deque[_Ticket] = deque()
        self._known: dict[str, tuple[str, JobStatus]] = {}
        self._ended: dict[str, tuple[str, JobStatus]] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.cancelled: str | None = None  # why the batch was cancelled, once it is
        # The fleet's hooks, called from a host thread: a host was lost (its jobs already handed back); a cloud
        # host has no work left that could reach it (True: it was let go and takes no more jobs).
        self.on_lost: Callable[[HostInfo], None] | None = None
        self.on_idle: Callable[[HostInfo], bool] | None = None
        # Whether a host, were it lost now, would be replaced (the fleet's word; without a fleet: never).
        self.replaceable: Callable[[HostInfo], bool] = lambda info: False
        self._open: set[str] | None = None  # keys of the batch's jobs without a final result (None: not told)

    def runtime(self, host: str) -> HostRuntime:
        """The runtime of the host named ``host`` the dispatcher watches it with (its spot and idle settings set), for
        the tasks that build environments and fetch outputs there."""
        return self.hosts[host].runtime

    def start(self) -> None:
        """Install the runtime and learn what each host already holds of this batch (to re-attach to it)."""
        for state in self.hosts.values():
            state.runtime.install()
            for key, status in state.runtime.status(self.batch, lease=self.lease).items():
                # A job known to several hosts (run again elsewhere after its host was lost, which then came
                # back): its done record wins, then a live one; the other is a duplicate, never delivered.
                earlier = self._known.get(key)
                if earlier is None or _rank(status) > _rank(earlier[1]):
                    self._known[key] = (state.info.name, status)
        for key, (host, status) in self._known.items():
            if not status.final:
                self.hosts[host].unclaimed.add(key)
        for name in self.hosts:
            self._spawn(name)

    def _spawn(self, name: str) -> None:
        thread = threading.Thread(target=self._loop, args=(name,), name=f"cloudsend-{name}", daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        """Stop watching; a task still waiting for its job gets it back ``aborted`` instead of waiting forever."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)
        with self._cond:
            for ticket in self._pending:  # never placed: _outcome raises
                ticket.end()
            self._pending.clear()
            for state in self.hosts.values():
                for ticket in list(state.tickets.values()):
                    self._finish(state, ticket, JobStatus(key=ticket.job.key, state="aborted", reason=STOPPED))
                state.unstaged = []

    def cancel(self, reason: str) -> list[str]:
        """Cancel the batch: jobs not placed yet end now (never run), and every host drops the batch's queued
        jobs and kills its running ones (one round trip each, in parallel); their tasks see them end
        ``aborted: cancelled`` at the next poll. Returns the keys the hosts cancelled."""
        with self._cond:
            self.cancelled = reason
            for ticket in self._pending:  # never placed: _outcome raises BatchCancelled
                ticket.end()
            self._pending.clear()
            self._cond.notify_all()
            live = [state for state in self.hosts.values() if state.live]

        def cancel_on(state: _HostState) -> list[str]:
            try:
                return state.runtime.cancel(self.batch)
            except Exception as exc:  # an unreachable host's jobs end with it (its lease runs out, fencing them)
                log.warning("%s: could not cancel the batch's jobs: %s", state.info.name, exc)
                return []

        with ThreadPoolExecutor(max(1, min(16, len(live)))) as pool:
            return [key for keys in pool.map(cancel_on, live) for key in keys]

    def run(self, job: JobSpec, *, rerun: bool = False) -> tuple[str, JobStatus]:
        """Start the job (or re-attach to it) and wait for its end; returns the host name and final status.

        A job that ended done on a host is not run again (not even by a retry: a retry after a failed fetch
        fetches again); one that ended otherwise is run again, as is a job known from an earlier run when the
        whole batch is rerun. A job still queued or running on its host is watched, not started again.
        """
        ticket = _Ticket(job, rerun=RERUN_FAILED if rerun else 0)
        adopted = self._enter(ticket)
        if adopted is not None:
            return adopted
        ticket.done.wait()  # outside the lock: host threads need it to report the end
        return self._outcome(ticket)

    async def run_async(
        self, job: JobSpec, *, rerun: bool = False, output: Callable[[str, str], None] | None = None
    ) -> tuple[str, JobStatus]:
        """``run`` for a coroutine: waiting holds no thread, so thousands of jobs can wait at once. ``output``
        is called from a host thread with the lines the job writes (``stdout``/``stderr``, a few KiB at a
        time, from ``LIVE_AFTER`` seconds into its run, every ``LIVE_EVERY`` seconds)."""
        loop = asyncio.get_running_loop()
        ended = loop.create_future()

        def settle() -> None:
            if not ended.done():
                ended.set_result(None)

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(settle)

        ticket = _Ticket(job, rerun=RERUN_FAILED if rerun else 0, wake=wake, output=output)
        adopted = self._enter(ticket)
        if adopted is not None:
            return adopted
        await ended
        return self._outcome(ticket)

    def _enter(self, ticket: _Ticket) -> tuple[str, JobStatus] | None:
        """Hand the ticket to the hosts: the job's done record when it needs no run, else None (then its
        ticket ends when the job does)."""
        job = ticket.job
        with self._cond:
            if self.cancelled is not None:
                raise BatchCancelled(f"not started: {self.cancelled}")
            ended = self._ended.get(job.key)  # from this run: a retry of the same task
            known = self._known.pop(job.key, None)  # from an earlier run, found on the hosts at start
            if known is not None:
                self.hosts[known[0]].unclaimed.discard(job.key)
            for record, rerun_done in ((ended, False), (known, self.rerun)):
                if record is None or record[0] not in self.hosts or not self.hosts[record[0]].live:
                    continue
                host, status = record
                if status.state == "done" and not rerun_done:
                    self._ended[job.key] = record  # its outputs are fetched from there: a retry fetches again
                    return host, status
                if not status.final:  # still queued or running there: watch it
                    ticket.host = host
                    self.hosts[host].tickets[job.key] = ticket
                    _hold(self.hosts[host], job)
                    return None
                ticket.rerun = RERUN_ANY if status.state == "done" else max(ticket.rerun, RERUN_FAILED)
            self._pending.append(ticket)
            self._cond.notify_all()
        return None

    def _outcome(self, ticket: _Ticket) -> tuple[str, JobStatus]:
        if ticket.host is None and self.cancelled is not None:
            raise BatchCancelled(f"not started: {self.cancelled}")
        if ticket.host is None or ticket.status is None:
            raise RuntimeError(f"{ticket.job.name}: the batch stopped before the job was placed on a host")
        return ticket.host, ticket.status

    def _fits(self, state: _HostState, job: JobSpec, window: Amount) -> bool:
        """Whether the job may be taken by this host now: one it can run, that fits its ``window`` (its CPUs
        plus a prefetch, and twice its GPUs) beside what it holds."""
        return can_host(state.info, job) and fits(job, window, state.committed, state.gpus_committed)

    def _window(self, state: _HostState) -> Amount:
        """What the host may hold queued and running at once: ``state.window`` CPUs and twice its GPUs."""
        return Amount(state.window, 2 * state.info.gpus)

    def _can_take(self, state: _HostState) -> bool:
        """Whether a waiting job fits this host's window now (the caller holds the condition)."""
        if state.committed >= state.window:
            return False
        window = self._window(state)
        return any(self._fits(state, ticket.job, window) for ticket in self._pending)

    def _take(self, state: _HostState) -> None:
        """Waiting jobs this host should take now: first fit, in submission order, within its window."""
        window = self._window(state)
        for ticket in list(self._pending):
            if state.committed >= state.window:
                break
            if self._fits(state, ticket.job, window):
                self._pending.remove(ticket)
                ticket.host = state.info.name
                state.tickets[ticket.job.key] = ticket
                _hold(state, ticket.job)
                state.unstaged.append(ticket)

    def _loop(self, name: str) -> None:
        state = self.hosts[name]
        next_poll = 0.0
        gather = min(GATHER, self.poll_interval / 4)
        while not self._stop.is_set():
            poll = time.monotonic() >= next_poll
            if poll:
                next_poll = time.monotonic() + self.poll_interval
            try:
                self._tick(state, poll=poll)
            except Exception as exc:
                self._failed_tick(state, exc)
                if state.lost:
                    return
                continue
            if state.runtime.interruption is not None:
                self._evacuate(state)
                return
            if poll and (verdict := self._cloud_verdict(state)):
                self._lose(state, verdict)
                return
            if poll and self._release_idle(state):
                return
            # Until the next poll, wake only when the host may run short of queued jobs and there are jobs
            # for it; then let a few more submissions arrive, to stage them together.
            with self._cond:
                while not self._stop.is_set():
                    left = next_poll - time.monotonic()
                    if left <= 0:
                        break
                    if self._short(state) and (state.unstaged or self._can_take(state)):
                        self._cond.wait(min(gather, left))
                        break
                    self._cond.wait(left)

    def _short(self, state: _HostState) -> bool:
        """Whether the jobs staged on the host (and not seen ending) no longer exceed its CPUs: it may have
        nothing queued, so jobs for it are staged now rather than at the next poll."""
        return state.committed - sum(t.job.cpus for t in state.unstaged) <= state.info.cpus

    def _tick(self, state: _HostState, *, poll: bool = True) -> None:
        """Take what fits the host's window; at a poll, stage it and read the states of the staged jobs in
        one round trip; between polls, stage only when the host is short of queued jobs."""
        with self._cond:
            self._take(state)
        if poll:
            self._poll(state)
        elif state.unstaged and self._short(state):
            self._stage(state)

    def _stage(self, state: _HostState, watch: list[str] | None = None) -> dict[str, JobStatus]:
        """Stage the jobs taken since the last call (sent again if that call failed), and read the records
        of ``watch``: one round trip. Each call renews the batch's lease on the host."""
        rerun = {t.job.key: t.rerun for t in state.unstaged if t.rerun}
        jobs = [t.job for t in state.unstaged]
        statuses = state.runtime.stage(self.batch, jobs, rerun, lease=self.lease, watch=watch or [])
        state.unstaged = []
        state.failing_since = None
        return statuses

    def _poll(self, state: _HostState) -> None:
        unstaged = {t.job.key for t in state.unstaged}
        keys = [key for key in state.tickets if key not in unstaged]
        if not keys and not unstaged:
            if state.unclaimed:  # jobs of an earlier run wait there for their tasks: keep them startable
                state.runtime.renew(self.batch, self.lease)
                state.failing_since = None
            return
        statuses = self._stage(state, keys)
        finished = 0
        with self._cond:
            for key, ticket in list(state.tickets.items()):
                status = statuses.get(key)
                if status is not None and status.fenced:  # its lease ran out between two polls: queue it again
                    self._requeue(state, ticket)
                elif status is not None and status.final:
                    finished += 1
                    self._finish(state, ticket, status)
            due = self._live_due(state, statuses)
            # Keep enough queued on the host to cover two poll intervals of finishing jobs, beyond the ones
            # that ended unseen while the next poll's jobs were taken (what the next poll stages, it takes
            # before it sees what ended since this one).
            state.window = state.info.cpus + max(state.info.cpus, 3 * finished)
            if finished:
                self._cond.notify_all()
        for ticket in due:
            self._show_output(state, ticket)

    def _live_due(self, state: _HostState, statuses: dict[str, JobStatus]) -> list[_Ticket]:
        """The running jobs whose logs are to be read now: at most ``LIVE_JOBS``, longest waiting first (the
        caller holds the condition)."""
        now = time.monotonic()
        due = []
        for key, ticket in state.tickets.items():
            status = statuses.get(key)
            if ticket.output is None or status is None or status.state != "running":
                continue
            if ticket.next_look is None:
                ticket.next_look = now + LIVE_AFTER
            elif ticket.next_look <= now:
                due.append(ticket)
        due.sort(key=lambda t: t.next_look or 0.0)
        return due[:LIVE_JOBS]

    def _show_output(self, state: _HostState, ticket: _Ticket) -> None:
        """Read what a running job wrote since the last look and hand its complete lines to its task."""
        assert ticket.output is not None
        ticket.next_look = time.monotonic() + LIVE_EVERY
        for stream in ("stdout", "stderr"):
            try:
                data = state.runtime.read_log(self.batch, ticket.job.key, stream, ticket.offsets[stream], LIVE_BYTES)
            except Exception as exc:  # live logs are a courtesy: the files are fetched when the job ends
                log.debug("%s: reading the %s of %s: %s", state.info.name, stream, ticket.job.name, exc)
                continue
            ticket.offsets[stream] += len(data)
            text = ticket.partial.pop(stream, b"") + data
            cut = text.rfind(b"\n") + 1
            if cut == 0 and len(text) < LIVE_BYTES:  # no line ended yet: wait for its end
                ticket.partial[stream] = text
                continue
            if cut:
                text, ticket.partial[stream] = text[:cut], text[cut:]
            if text:
                ticket.output(stream, text.decode(errors="replace").rstrip("\n"))

    def _requeue(self, state: _HostState, ticket: _Ticket) -> None:
        """Hand a job its host did not start back to the waiting line, first, to be staged again (the caller
        holds the condition)."""
        state.tickets.pop(ticket.job.key, None)
        _release(state, ticket.job)
        ticket.host = None
        ticket.rerun = max(ticket.rerun, RERUN_FAILED)  # never started: replaced unless another client ran it
        self._pending.appendleft(ticket)
        self._cond.notify_all()

    def _finish(self, state: _HostState, ticket: _Ticket, status: JobStatus) -> None:
        if not status.lost:
            self._ended[ticket.job.key] = (state.info.name, status)
        state.tickets.pop(ticket.job.key, None)
        _release(state, ticket.job)
        ticket.status = status
        ticket.end()

    def _cloud_verdict(self, state: _HostState) -> str | None:
        """The cloud API's word on a host's instance, at most every CLOUD_CHECK seconds: a reason when it is
        stopped or gone; None while it runs, when unknown, and for hosts no cloud made."""
        now = time.monotonic()
        if not state.info.billed or now < state.next_cloud_check:
            return None
        state.next_cloud_check = now + CLOUD_CHECK
        try:
            health = providers.status(state.info, self.connections)
        except Exception as exc:  # the API being unreachable is no evidence either way
            log.warning("%s: cannot ask the cloud API about %s: %s", state.info.name, state.info.machine_id, exc)
            return None
        if health in ("stopped", "terminated"):
            return f"instance {state.info.machine_id} of host {state.info.name} is {health}"
        return None

    def _failed_tick(self, state: _HostState, exc: Exception) -> None:
        """One failed round trip is no evidence: a host is lost when the cloud API says its instance stopped,
        or when it has answered nothing for ``lost_after`` seconds."""
        now = time.monotonic()
        state.failing_since = state.failing_since or now
        log.warning("%s: %s (retrying)", state.info.name, exc)
        verdict = self._cloud_verdict(state)
        if verdict is None and now - state.failing_since >= self.lost_after:
            verdict = f"host {state.info.name} answered nothing for {self.lost_after:g}s ({exc})"
        if verdict is None:
            time.sleep(min(self.poll_interval, 1.0))
            return
        self._lose(state, verdict)

    def _evacuate(self, state: _HostState) -> None:
        """Leave a spot instance EC2 announced it takes back (two minutes' notice, read by the host's ticks)
        without waiting for it to go: its jobs are cancelled there while it still answers, then those not done
        by then are lost, placed again elsewhere at once. A job that ended done meanwhile keeps its record (its
        outputs are fetched from there): none runs twice."""
        reason = (
            f"spot instance {state.info.machine_id} of host {state.info.name} is being interrupted by EC2 "
            f"({state.runtime.interruption})"
        )
        with self._cond:
            keys = list(state.tickets)
        ended: dict[str, JobStatus] = {}
        if keys:
            try:
                state.runtime.cancel(self.batch, keys)
                ended = state.runtime.status(self.batch, keys)
            except Exception as exc:  # gone already: every job of it is lost
                log.warning("%s: could not cancel its jobs before its interruption: %s", state.info.name, exc)
        with self._cond:
            for key, status in ended.items():
                ticket = state.tickets.get(key)
                if ticket is not None and status.state == "done":
                    self._finish(state, ticket, status)
        self._lose(state, reason)

    def _lose(self, state: _HostState, reason: str) -> None:
        """Give the host's jobs back: unstaged ones to other hosts now, the others as aborted and lost (their
        tasks retry them elsewhere). A host that still answers is asked to kill them, so none runs twice."""
        state.lost = reason
        log.error("%s lost: %s", state.info.name, reason)
        with self._cond:
            for ticket in state.unstaged:  # never reached the host: another host can take them
                state.tickets.pop(ticket.job.key, None)
                ticket.host = None
                self._pending.appendleft(ticket)
            state.unstaged = []
            keys = list(state.tickets)
            for ticket in list(state.tickets.values()):
                self._finish(state, ticket, JobStatus(key=ticket.job.key, state="aborted", reason=reason, lost=True))
            self._cond.notify_all()
        if self.on_lost is not None and not self._stop.is_set():  # first: a replacement starts at once
            try:
                self.on_lost(state.info)
            except Exception as exc:  # the fleet's business: the batch goes on with the hosts it has
                log.error("%s: handling its loss failed: %s", state.info.name, exc)
        if not keys:
            return
        try:
            state.runtime.cancel(self.batch, keys)
        except Exception as exc:
            log.info("%s: could not cancel its jobs (%s); expected when the host is gone", state.info.name, exc)

    # -- the fleet: hosts joining a running batch, and hosts let go once no work can reach them -------------
    def expect(self, keys: list[str]) -> None:
        """Name every job of the batch: until each is ``settle``d, its key counts as work that could still
        reach any host (not entered yet, waiting, between a failure and its retry...)."""
        with self._cond:
            self._open = set(keys)

    def settle(self, key: str) -> None:
        """The job has its final result (outputs delivered, no retry to come): it will never reach a host."""
        with self._cond:
            if self._open is not None:
                self._open.discard(key)

    def add_host(self, info: HostInfo) -> None:
        """Make a new host known (its runtime installed), taking no job until ``join``: in between, its
        environments are built through ``runtime(name)``."""
        state = _HostState(info, HostRuntime.for_host(info, self.connections), window=2 * info.cpus)
        state.runtime.install()
        with self._cond:
            if info.name in self.hosts:
                raise ValueError(f"host {info.name} is already in batch {self.batch}")
            self.hosts[info.name] = state

    def join(self, name: str) -> None:
        """Let an added host take the batch's waiting jobs."""
        with self._cond:
            if not self._stop.is_set():
                self._spawn(name)

    def wants_host(self) -> bool:
        """Whether some job could still use another host: one not held by a live host (waiting, not entered
        yet, handed back by a lost host, failed and due for a retry). True when the batch's jobs are unknown;
        never once it is cancelled or stopped."""
        with self._cond:
            if self.cancelled is not None or self._stop.is_set():
                return False
            return self._open is None or any(not self._held(key, None) for key in self._open)

    def _held(self, key: str, besides: _HostState | None) -> bool:
        """Whether a live host other than ``besides`` holds the job: staged or running there, or ended done
        there (its outputs are fetched from there; it never runs again). The caller holds the condition."""
        for state in self.hosts.values():
            if state is besides or not state.live or state.failing_since is not None:  # not answering: unsure
                continue
            if key in state.tickets or key in state.unclaimed:
                return True
        record = self._ended.get(key) or self._known.get(key)
        if record is None or record[1].state != "done" or record[0] not in self.hosts:
            return False
        owner = self.hosts[record[0]]
        return owner is not besides and owner.live

    def _idle(self, state: _HostState) -> bool:
        """Whether no work could reach this cloud host any more: it holds nothing (no job staged, running or
        ended and not yet fetched) and every job still without a final result is held by another live host,
        so no job waits, and none is between a failure and its retry. A job handed back later (its host lost)
        goes to the hosts still live, or to a replacement. The caller holds the condition."""
        if self._open is None or not self._open or not state.info.billed or not state.live:
            return False
        if state.tickets or state.unstaged or state.unclaimed or self._pending:
            return False
        if not all(self._held(key, state) for key in self._open):
            return False
        # A job handed back later (its host lost) needs a live host: a replacement of the lost one, else one
        # kept up as a standby (one holding nothing: it is the last of the idle ones to go).
        others = [h for h in self.hosts.values() if h is not state and h.live]
        holders = [h for h in others if h.tickets or h.unclaimed]
        if all(self.replaceable(h.info) for h in holders):
            return True
        return any(not (h.tickets or h.unclaimed) for h in others)

    def _release_idle(self, state: _HostState) -> bool:
        """Offer the host to ``on_idle`` when no work can reach it; True if it was let go (it takes no more
        jobs). Marked released meanwhile, so that no job is routed to it while the fleet decides."""
        if self.on_idle is None:
            return False
        with self._cond:
            if self._stop.is_set() or not self._idle(state):
                return False
            state.released = True
        try:
            if self.on_idle(state.info):
                return True
        except Exception as exc:  # teardown at the batch's end stops it
            log.error("%s: releasing it failed: %s", state.info.name, exc)
            return True
        with self._cond:
            state.released = False
        return False


def _hold(state: _HostState, job: JobSpec) -> None:
    state.committed += job.cpus
    state.gpus_committed += job.gpus


def _release(state: _HostState, job: JobSpec) -> None:
    state.committed -= job.cpus
    state.gpus_committed -= job.gpus


def _rank(status: JobStatus) -> int:
    """Which of two records of the same job counts: done, then still live, then any other end."""
    return 2 if status.state == "done" else 0 if status.final else 1
