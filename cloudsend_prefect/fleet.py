"""The batch's cloud instances while it runs: a lost one is replaced (within a bound), an idle one stopped.

A lost instance (terminated, preempted, stopped or unreachable) is replaced by a new one of the same instance
type, built like the first ones (its environments bootstrapped) before it joins the running batch and takes its
waiting jobs. Only providers that create hosts can replace one (``providers.creates_hosts``: aws); a lost ssh
or local host is not replaced, its jobs run on the others. A batch replaces at most ``replace_lost`` instances
(by default ``REPLACEMENTS_PER_INSTANCE`` times as many as it started with), so that a capacity problem
(instances lost as fast as they come) never loops and bills for ever; a loss when every job left is already
placed on the other hosts is not replaced at all.

An instance no work can reach any more (see ``Dispatcher._idle``) is stopped at once, or terminated with
``auto_stop: terminate``, instead of at the batch's end; with ``auto_stop: false`` nothing is stopped early.
"""

from __future__ import annotations

import contextvars
import functools
import threading
import time
from collections import Counter

from prefect import get_run_logger
from prefect.futures import PrefectFuture

from cloudsend_prefect import providers
from cloudsend_prefect.config import BatchConfig
from cloudsend_prefect.dispatch import Dispatcher
from cloudsend_prefect.providers import HostInfo, get_provider
from cloudsend_prefect.results import JobResult
from cloudsend_prefect.specs import JobSpec
from cloudsend_prefect.tasks import bootstrap

REPLACEMENTS_PER_INSTANCE = 2  # replacements a batch may launch, per cloud instance it started with


class Fleet:
    """Keeps the batch's instances whole and lean: hooked to the dispatcher before it starts, closed before
    teardown (``hosts`` is then every host the batch had, replacements included)."""

    def __init__(self, config: BatchConfig, hosts: list[HostInfo], jobs: list[JobSpec], dispatcher: Dispatcher):
        self.config = config
        self.hosts = list(hosts)
        self.dispatcher = dispatcher
        self.envs = list({job.env.key: job.env for job in jobs if job.env}.values())
        instances = sum(1 for host in hosts if host.billed)
        limit = config.replace_lost
        self.limit = REPLACEMENTS_PER_INSTANCE * instances if limit is None else limit
        self.replaced: dict[str, str] = {}  # replacement's name → the lost host's (every launch attempted)
        self.joined: list[str] = []  # replacements that joined the batch
        self.released: dict[str, float] = {}  # host name → when it was stopped early (epoch seconds)
        self.launched: dict[str, float] = {}  # replacement's name → when its launch began (billing, at the latest)
        self.gone: dict[str, float] = {}  # lost host's name → when its replacement's launch terminated it
        self.logger = get_run_logger()
        # The flow run's context: a replacement's bootstrap task runs belong to the flow run, like the first ones.
        self._context = contextvars.copy_context()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._stems: dict[str, str] = {}  # a replacement's name → the first host's it stands for
        self._building: Counter[str] = Counter()  # environments being built, by host: not stopped meanwhile
        dispatcher.expect([job.key for job in jobs])
        dispatcher.on_lost = self.lost
        dispatcher.replaceable = self.replaceable
        if config.auto_stop:
            dispatcher.on_idle = self.release

    def bootstrap(self) -> list[PrefectFuture[str]]:
        """Build every environment on every host, in the background (task runs ``bootstrap-<env>-<host>``)."""
        boots = []
        for host in self.hosts:
            for env in self.envs:
                with self._lock:
                    self._building[host.name] += 1
                boot = bootstrap.with_options(task_run_name=f"bootstrap-{env.name}-{host.name}").submit(
                    host, env, self.dispatcher
                )
                boot.add_done_callback(functools.partial(self._built, host.name))
                boots.append(boot)
        return boots

    def _built(self, name: str, _: PrefectFuture[str]) -> None:
        with self._lock:
            self._building[name] -= 1

    def settled(self, result: JobResult, total: int) -> None:
        """A job's final result is in (a listener of ``run_jobs``): it will never need a host again."""
        self.dispatcher.settle(result.key)

    def replaceable(self, host: HostInfo) -> bool:
        """Whether the host, were it lost now, would be replaced: its provider can create hosts and the bound
        is not reached (the dispatcher keeps a standby up otherwise, rather than stop every idle host). Called
        under the dispatcher's lock, so it takes none of the fleet's (``lost`` takes them in the other order)."""
        return providers.creates_hosts(host.provider) and not self._closed and len(self.replaced) < self.limit

    def lost(self, host: HostInfo) -> None:
        """Replace a lost host in the background, if its provider can, the bound allows and a job needs it."""
        if not providers.creates_hosts(host.provider):
            self.logger.warning("%s is not replaced: the %s provider cannot create hosts", host.name, host.provider)
            return
        with self._lock:
            if self._closed:
                return
            if len(self.replaced) >= self.limit:
                self.logger.error(
                    "%s is not replaced: this batch may replace %d lost instances (replace_lost) and launched %d; "
                    "the batch goes on with the others",
                    host.name,
                    self.limit,
                    len(self.replaced),
                )
                return
            if not self.dispatcher.wants_host():
                self.logger.info("%s is not replaced: every job left is placed on the other hosts", host.name)
                return
            stem = self._stems.get(host.name, host.name)  # a replacement's replacement: aws-0.1-r2, not -r1-r2
            name = f"{stem}-r{len(self.replaced) + 1}"
            self._stems[name] = stem
            self.replaced[name] = host.name
            thread = threading.Thread(
                target=self._context.copy().run,
                args=(self._replace, host, name),
                name=f"cloudsend-replace-{name}",
                daemon=True,
            )
            self._threads.append(thread)
            thread.start()

    def _replace(self, lost: HostInfo, name: str) -> None:
        started = time.monotonic()
        self.logger.warning("%s was lost: launching %s in its place", lost.name, name)
        with self._lock:
            self.launched[name] = self.gone[lost.name] = time.time()  # replace terminates the lost one first
        try:
            host = providers.replace(self.config, lost, name, self.dispatcher.connections)
        except Exception as exc:
            self.logger.error("could not replace %s: %s; the batch goes on with the other hosts", lost.name, exc)
            return
        with self._lock:
            self.hosts.append(host)  # teardown covers it from here on, whatever happens next
            if self._closed:
                return
        try:
            self.dispatcher.add_host(host)
            for env in self.envs:
                if self._closed:  # the batch ended meanwhile: teardown stops it, nothing more to build
                    return
                bootstrap.with_options(task_run_name=f"bootstrap-{env.name}-{host.name}")(host, env, self.dispatcher)
        except Exception as exc:
            self.logger.error("%s (%s), replacing %s, is not usable: %s", host.name, host.machine_id, lost.name, exc)
            if self.config.auto_stop:
                self._stop(host, "it is not usable")
            return
        self.dispatcher.join(host.name)
        with self._lock:
            self.joined.append(host.name)
        self.logger.warning(
            "%s (%s) replaces %s: ready in %.0f s, taking jobs",
            host.name,
            host.machine_id,
            lost.name,
            time.monotonic() - started,
        )

    def release(self, host: HostInfo) -> bool:
        """The dispatcher's ``on_idle``: stop the instance now, unless it is still building an environment (a
        build cut short would fail its bootstrap task for nothing); asked again at the next poll."""
        with self._lock:
            if self._building[host.name] > 0:
                return False
        self._stop(host, "no job left could reach it")
        return True

    def _stop(self, host: HostInfo, why: str) -> None:
        """Stop (or terminate, per ``auto_stop``) an instance now rather than at the batch's end."""
        get_provider(host.provider).teardown([host], terminate=self.config.auto_stop == "terminate")
        with self._lock:
            self.released[host.name] = time.time()
        how = "terminated" if self.config.auto_stop == "terminate" else "stopped"
        self.logger.info("%s (%s) %s: %s", host.name, host.machine_id, how, why)

    def billed(self, since: float, until: float) -> dict[str, float]:
        """How long each host was up for the batch, in seconds, for its cost: from ``since`` (provisioning; a
        replacement: its launch) to its early stop, to its termination as a lost host being replaced, else to
        ``until`` (teardown)."""
        with self._lock:
            ends = {**self.gone, **self.released}
            return {
                host.name: max(0.0, ends.get(host.name, until) - self.launched.get(host.name, since))
                for host in self.hosts
            }

    def close(self) -> None:
        """No more replacements; wait for those under way (teardown must know their instances). Logs the
        instance time each early stop saved: how long before the batch's end it came."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for thread in threads:
            thread.join()
        now = time.time()
        saved = {name: now - at for name, at in self.released.items()}
        if saved:
            self.logger.info(
                "stopped early: %s; %.1f instance-minutes saved",
                ", ".join(f"{name} {seconds:.0f} s before the batch's end" for name, seconds in saved.items()),
                sum(saved.values()) / 60,
            )
        if self.joined:
            self.logger.warning(
                "lost and replaced: %s", ", ".join(f"{self.replaced[new]} by {new}" for new in self.joined)
            )
