"""Fault injection for the recovery tests: jobs that count their completed runs, a client killed with SIGKILL,
and sshd hosts whose connections drop, that die with their jobs, or that answer slowly.

"Done exactly once" is read from side effects outside cloudsend: each job appends a line to its own counter
file (an absolute path, outside its run directory) as its very last step, after sleeping long enough for a
fault to land while it runs. A job killed before completing never writes its line; a job run twice writes two.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cloudsend_prefect.results import BatchSummary
from tests.sshd import SshdHost

CLOUDSEND = Path(sys.executable).with_name("cloudsend")


# -- counting jobs --------------------------------------------------------------------------------------
def job_name(i: int, prefix: str = "j") -> str:
    return f"{prefix}{i:02d}"


def expected_output(i: int) -> str:
    return f"job {i}: {i} squared is {i * i}\n"


def counted_jobs(
    counters: Path,
    count: int,
    seconds: float | Sequence[float],
    prefix: str = "j",
    gates: dict[int, Path] | None = None,
    **extra: Any,
) -> list[dict[str, Any]]:
    """Jobs that sleep (``seconds``, or ``seconds[i]`` for job i), write ``out.txt`` from their argument, then
    (last) append ``done`` to their counter file. A job with a gate (``gates[i]``) then also waits for that
    file to exist before it completes: the test decides when it ends."""
    counters.mkdir(parents=True, exist_ok=True)
    jobs = []
    for i in range(count):
        name = job_name(i, prefix)
        counter = shlex.quote(str(counters / name))
        sleep = seconds if isinstance(seconds, int | float) else seconds[i]
        wait = ""
        if gates and i in gates:
            wait = f"while [ ! -e {shlex.quote(str(gates[i]))} ]; do sleep 0.05; done; "
        command = (
            f'sleep {sleep:g}; {wait}echo "job {i}: {i} squared is $(( {i} * {i} ))" > out.txt; echo done >> {counter}'
        )
        jobs.append({"name": name, "run_command": command, "output_files": ["out.txt"], **extra})
    return jobs


def completed(counters: Path) -> dict[str, int]:
    """Completed runs per job name, from the counter files."""
    return {p.name: len(p.read_text().split()) for p in counters.iterdir() if p.is_file()} if counters.is_dir() else {}


def assert_done_once(summary: BatchSummary, counters: Path, results: Path, count: int, prefix: str = "j") -> None:
    """Every job ended done, ran to completion exactly once, and its correct output is in the results folder."""
    problems = [f"{j.name}: {j.state} ({j.reason})" for j in summary.jobs if j.state != "done"]
    runs = completed(counters)
    for i in range(count):
        name = job_name(i, prefix)
        if runs.get(name, 0) != 1:
            problems.append(f"{name}: completed {runs.get(name, 0)} times")
        out = results / name / "out.txt"
        if not out.is_file():
            problems.append(f"{name}: no {out}")
        elif out.read_text() != expected_output(i):
            problems.append(f"{name}: wrong output {out.read_text()!r}")
    extra = set(runs) - {job_name(i, prefix) for i in range(count)}
    if extra:
        problems.append(f"unexpected counters: {sorted(extra)}")
    assert not problems, "\n".join(problems)


def write_config(root: Path, config: dict[str, Any], files: dict[str, str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for rel, text in (files or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    path = root / "batch.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def ssh_instances(hosts: list[SshdHost], cpus: int, remote_dir: str) -> list[dict[str, Any]]:
    return [
        {
            "provider": "ssh",
            "name": h.name,
            "host": h.host,
            "port": h.port,
            "user": h.user,
            "key_file": str(h.key_file),
            "host_key": h.host_public_key,
            "cpus": cpus,
            "remote_dir": f"{h.home}/{remote_dir}",
        }
        for h in hosts
    ]


# -- what the hosts hold --------------------------------------------------------------------------------
def host_statuses(jobs_dir: Path) -> dict[str, dict[str, Any]]:
    """The status record of every job of a batch on a host, by key, read from its ``jobs/<batch>`` directory."""
    found: dict[str, dict[str, Any]] = {}
    if not jobs_dir.is_dir():
        return found
    for status in jobs_dir.glob("*/status"):
        try:
            found[status.parent.name] = json.loads(status.read_text())
        except (OSError, ValueError):  # being replaced right now
            continue
    return found


def states(jobs_dir: Path) -> dict[str, str]:
    return {key: record["state"] for key, record in host_statuses(jobs_dir).items()}


def wait_for(
    check: Callable[[], Any], timeout: float, what: str, *, client: Client | None = None, interval: float = 0.05
) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` s (or when the client exits)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if client is not None and client.proc.poll() is not None:
            raise AssertionError(f"the client exited ({client.proc.returncode}) before {what}:\n{client.output()}")
        if time.monotonic() > deadline:
            extra = f"\nclient output:\n{client.output()}" if client is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(interval)


# -- a client process to kill ----------------------------------------------------------------------------
@dataclass
class Client:
    """A `cloudsend run` in its own process, pointed at the test harness's Prefect server (not an ephemeral
    one, which a SIGKILL would orphan)."""

    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def kill(self) -> None:
        """``kill -9``: nothing in the client gets to clean up."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill()


def client_env(home: Path, **extra: str) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    assert api, "the Prefect test harness should have set PREFECT_API_URL"
    return {
        **os.environ,
        "PREFECT_API_URL": str(api),
        "CLOUDSEND_HOME": str(home),
        "PREFECT_HOME": str(home.parent / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # its log file shows what it did (`cloudsend run` in-process, as test_cli does, lowers this in os.environ)
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "INFO",
        **extra,
    }


def start_client(args: list[str], log: Path, home: Path, **env: str) -> Client:
    """Start ``args`` (a `cloudsend` command line, or a Python driver) as the client of a batch."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=client_env(home, **env), cwd=REPO
        )
    return Client(proc, log)


@contextlib.contextmanager
def client_process(args: list[str], log: Path, home: Path, **env: str) -> Iterator[Client]:
    client = start_client(args, log, home, **env)
    try:
        yield client
    finally:
        client.stop()


# -- faults on sshd hosts ---------------------------------------------------------------------------------
def kill_host(host: SshdHost) -> None:
    """The host dies: sshd, every session and every process under its directory (detached jobs included).
    Repeated, since a job wrapper ending during the sweep may have started the next job after it."""
    for _ in range(3):
        host.stop(kill_jobs=True)
        time.sleep(0.2)


@contextlib.contextmanager
def slow_host(host: SshdHost, seconds: float) -> Iterator[None]:
    """Every command on the host takes ``seconds`` more to answer: its shell start-up (BASH_ENV) sleeps first.
    File transfers (internal-sftp) are not slowed. The file is restored afterwards (the hosts are shared)."""
    env_file = host.base_dir / "etc" / "bash_env.sh"
    original = env_file.read_text()
    if "BASH_ENV" not in original:
        raise AssertionError(f"{host.name} does not start commands through BASH_ENV: cannot slow it down")
    env_file.write_text(f"sleep {seconds:g}\n" + original)
    try:
        yield
    finally:
        env_file.write_text(original)


def forget_batch(base: Path, batch: str) -> None:
    """Remove a batch's queue entries and CPU reservations left in a host's shared runtime directory by jobs
    killed with their host, so that later tests using the same directory are not held up by them."""
    for entry in (base / "queue").glob("*"):
        with contextlib.suppress(OSError):
            if entry.read_text().split()[:1] == [batch]:
                entry.unlink()
    for entry in (base / "running").glob(f"{batch}__*"):
        entry.unlink(missing_ok=True)


@dataclass
class Fault:
    """A fault injected from a thread while the flow runs in the test's own thread.

    ``action`` waits for its moment (polling what the hosts hold), injects the fault and records what it saw;
    its exception, if any, is raised again by ``check``.
    """

    action: Callable[[Fault], None]
    seen: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None
    fired: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Fault:
        def target() -> None:
            try:
                self.action(self)
            except BaseException as exc:  # reported by check()
                self.error = exc

        self.thread = threading.Thread(target=target, name="fault", daemon=True)
        self.thread.start()
        return self

    def check(self, timeout: float = 60) -> None:
        assert self.thread is not None
        self.thread.join(timeout)
        if self.error is not None:
            raise self.error
        assert not self.thread.is_alive(), "the fault thread is still running"
        assert self.fired.is_set(), "the fault never fired: the batch ended before it could land"


# -- the batch run again, in a process of its own ----------------------------------------------------------
REPO = Path(__file__).resolve().parent.parent


def driver_args(
    config: Path,
    results: Path,
    summary: Path,
    *,
    loopback: dict[str, Any] | None = None,
    hang: Path | None = None,
    started: Path | None = None,
) -> list[str]:
    """A client process calling the flow and saving its summary (``python -m tests.faults``, below)."""
    args = [sys.executable, "-m", "tests.faults", str(config), str(results), str(summary)]
    if loopback is not None:
        args += ["--loopback", json.dumps(loopback)]
    if hang is not None:
        args += ["--hang-in-provisioning", str(hang)]
    if started is not None:
        args += ["--dispatcher-started", str(started)]
    return args


def run_client(
    args: list[str],
    log: Path,
    home: Path,
    summary: Path,
    timeout: float,
    *,
    settled: Callable[[], bool] | None = None,
    grace: float = 15,
    during: Callable[[Client], None] | None = None,
) -> BatchSummary:
    """Run a client to its end and return the batch summary it saved. A client that does not end within
    ``timeout``, or within ``grace`` seconds once ``settled()`` (e.g. every job ended on the hosts), is hung:
    it is killed and the test fails. A hung batch must never hang the test session. ``during(client)`` is
    called at every look while it runs (to open gates, say)."""
    client = start_client(args, log, home)
    deadline = time.monotonic() + timeout
    settled_at: float | None = None
    while client.proc.poll() is None:
        if during is not None:
            during(client)
        now = time.monotonic()
        if settled_at is None and settled is not None and settled():
            settled_at = now
        if now > deadline or (settled_at is not None and now - settled_at > grace):
            client.kill()
            why = f"{grace:g}s after every job had ended on the hosts" if settled_at is not None else f"{timeout:g}s"
            raise AssertionError(f"the client did not end within {why}: it hung. Its output:\n{client.output()}")
        time.sleep(0.2)
    if client.proc.returncode != 0 or not summary.is_file():
        raise AssertionError(f"the client failed ({client.proc.returncode}):\n{client.output()}")
    return BatchSummary.model_validate_json(summary.read_text())


def _main(argv: list[str]) -> None:
    """The driver: ``python -m tests.faults CONFIG RESULTS SUMMARY [--loopback JSON] [--hang-in-provisioning F]``.

    ``--loopback`` registers the tests' ``loopback`` address resolver of the aws provider in this process
    (``{"ranks": {rank: port}, "user": ..., "key_file": ...}``: each instance reaches an sshd host by its rank);
    ``--hang-in-provisioning F`` makes that resolver touch F and block, once EC2 has made every instance;
    ``--dispatcher-started F`` touches F once the dispatcher has read what the hosts hold of the batch.
    """
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("results")
    parser.add_argument("summary")
    parser.add_argument("--loopback")
    parser.add_argument("--hang-in-provisioning")
    parser.add_argument("--dispatcher-started")
    opts = parser.parse_args(argv)
    if opts.dispatcher_started:
        from cloudsend_prefect.dispatch import Dispatcher

        start = Dispatcher.start

        def signalled(self: Dispatcher) -> None:
            start(self)
            Path(opts.dispatcher_started).touch()

        Dispatcher.start = signalled  # type: ignore[method-assign]
    if opts.loopback:
        from cloudsend_prefect.providers import aws
        from cloudsend_prefect.providers.aws import addresses as aws_addresses

        spec = json.loads(opts.loopback)

        def resolve(instance: dict[str, Any]) -> aws_addresses.Endpoint:
            rank = next(t["Value"] for t in instance.get("Tags", []) if t["Key"] == "cloudsend:rank")
            if opts.hang_in_provisioning:
                Path(opts.hang_in_provisioning).touch()
                time.sleep(3600)
            return aws_addresses.Endpoint("127.0.0.1", spec["ranks"][rank], spec["user"], spec["key_file"])

        aws.ADDRESS_RESOLVERS["loopback"] = resolve
    from cloudsend_prefect.flow import run_batch

    summary = run_batch(config=opts.config, results_dir=opts.results)
    Path(opts.summary).write_text(summary.model_dump_json())


if __name__ == "__main__":
    _main(sys.argv[1:])
