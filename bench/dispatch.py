"""Benchmark: many short jobs across real sshd hosts, through the `cloudsend` flow and through GNU parallel.

Run from the repository root:

    .venv/bin/python bench/dispatch.py                               # both workloads below
    .venv/bin/python bench/dispatch.py --jobs 600 --sleep 0.5        # 600 x `sleep 0.5`
    .venv/bin/python bench/dispatch.py --jobs 2000 --command true    # 2000 x `true`
    .venv/bin/python bench/dispatch.py --hosts 3 --slots 4 --poll-interval 0.2 --parallel cm,plain

It starts its own sshd hosts on loopback ports (``tests/sshd.py``: one home per host, so root's
``.bashrc`` is not sourced) in a temporary directory, runs a one-job warm-up flow (Prefect's temporary
server start-up, reported apart), then each workload through the real ``cloudsend`` flow (ssh provider,
``cpus: SLOTS`` per host), then the same commands with GNU parallel ``--sshlogin SLOTS/ssh ...`` on the
same hosts, with a pre-opened ControlMaster connection per host (``cm``) and without (``plain``).

Times: the job phase is read from the jobs' own start/end timestamps on the hosts (loopback hosts share
this machine's clock); the flow wall time is the ``cloudsend(...)`` call; the gap before the first job
starts is the flow's fixed start-up (flow run, provisioning, runtime install, plan, first staging).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BARE_THREADS = 64  # threads of the without-Prefect baseline (enough for the hosts' slots here)
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `tests.sshd` lives in the repository, not in the package


@dataclass
class Workload:
    jobs: int
    command: str
    nominal: float | None  # seconds of work per job when known (`sleep S`), else calibrated (see calibrate)
    work: float = 0.0  # seconds of work per job used for the ideal

    @property
    def label(self) -> str:
        return f"{self.jobs} x {self.command}"


@dataclass
class FlowRun:
    wall: float = 0.0  # the cloudsend() call
    startup: float = 0.0  # call -> first job start
    phase: float = 0.0  # first job start -> last job end (host clock)
    tail: float = 0.0  # last job end -> call returns
    work: float = 0.0  # sum of job durations measured on the hosts
    round_trips: int = 0
    rss_mb: float = 0.0  # this process's peak RSS during the call
    cpu_flow: float = 0.0  # CPU seconds (user + system) of this process during the call
    cpu_server: float = 0.0  # of Prefect's temporary server
    cpu_machine: float = 0.0  # of the whole machine: hosts (sshd, host.sh, jobs) and anything else running
    drain: float = 0.0  # seconds Prefect's server kept working on this run's events after the call returned
    states: dict[str, int] = field(default_factory=dict)


@dataclass
class Result:
    workload: Workload
    slots: int
    flow: FlowRun
    parallel: dict[str, float] = field(default_factory=dict)  # mode -> wall seconds
    floor: FlowRun | None = None  # the same flow with jobs that end at once (no hosts): Prefect's own cost
    bare: FlowRun | None = None  # the dispatcher and host runtime without Prefect (threads calling run + fetch)
    alone: FlowRun | None = None  # as many task runs doing nothing, no cloudsend code: Prefect's own cost

    @property
    def ideal(self) -> float:
        return self.workload.jobs * self.workload.work / self.slots


def vm_hwm_mb() -> float:
    """Peak resident set size of this process (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so each run reports its own peak."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def machine_cpu() -> float:
    """CPU seconds the whole machine has been busy (all cores), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def self_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def children(pattern: str) -> list[int]:
    """This process's children whose command line contains ``pattern``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid() and pattern in cmd:
            found.append(int(entry))
    return found


def pids_cpu(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def wait_quiet(pids: list[int], limit: float = 180.0) -> float:
    """Wait until these processes use under 10% of a CPU (Prefect's server works through its backlog of
    events after a flow returns); returns the seconds waited. Keeps one run's work out of the next one's."""
    t0 = time.monotonic()
    last = pids_cpu(pids)
    while time.monotonic() - t0 < limit:
        time.sleep(0.5)
        now = pids_cpu(pids)
        if now - last < 0.05:
            break
        last = now
    return time.monotonic() - t0


def child_rss_mb(pattern: str) -> float:
    """Summed peak RSS of this process's children whose command line contains ``pattern``."""
    total = 0.0
    for pid in children(pattern):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) / 1024
    return total


def calibrate(root: Path, command: str, runs: int = 50) -> float:
    """Seconds one job's own work takes here, run as the host runs it (`bash cmd.sh`), without orchestration."""
    script = root / "calibrate.sh"
    script.write_text(command + "\n")
    loop = f"for i in $(seq {runs}); do bash {shlex.quote(str(script))}; done"
    t0 = time.perf_counter()
    subprocess.run(["sh", "-c", loop], check=True, capture_output=True)
    return (time.perf_counter() - t0) / runs


# -- cloudsend ---------------------------------------------------------------------------------------


def write_config(root: Path, name: str, hosts: list[Any], slots: int, poll: float, wl: Workload) -> Path:
    import yaml

    project = root / "projects" / name
    project.mkdir(parents=True, exist_ok=True)
    config = {
        "project": name,
        "poll_interval": poll,
        "instances": [
            {
                "provider": "ssh",
                "name": h.name,
                "host": "127.0.0.1",
                "port": h.port,
                "user": h.user,
                "key_file": str(h.key_file),
                "host_key": h.host_public_key,
                "cpus": slots,
                "remote_dir": f"{h.home}/cloudsend",
            }
            for h in hosts
        ],
        "jobs": [{"run_command": wl.command, "name": "job", "repeat": wl.jobs}],
    }
    path = project / "batch.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_flow(root: Path, name: str, hosts: list[Any], slots: int, poll: float, wl: Workload) -> FlowRun:
    from cloudsend_prefect.flow import run_batch

    config = write_config(root, name, hosts, slots, poll, wl)
    os.environ["CLOUDSEND_HOME"] = str(root / "cloudsend-home" / name)  # nothing cached from an earlier run
    reset_peak_rss()
    servers = children("prefect.server")
    cpu0 = (self_cpu(), pids_cpu(servers), machine_cpu())
    t0 = time.time()
    summary = run_batch(config=str(config), results_dir=str(root / "results"))
    t1 = time.time()
    servers = servers or children("prefect.server")  # started by this (first) call
    rss = vm_hwm_mb()
    drain = wait_quiet(servers)  # the server's work on this run's events counts for this run
    cpu1 = (self_cpu(), pids_cpu(servers), machine_cpu())
    run = FlowRun(wall=t1 - t0, rss_mb=rss, states=summary.counts, drain=drain)
    run.cpu_flow, run.cpu_server, run.cpu_machine = (b - a for a, b in zip(cpu0, cpu1, strict=True))
    starts = [j.started for j in summary.jobs if j.started is not None]
    ends = [j.ended for j in summary.jobs if j.ended is not None]
    if starts and ends:
        run.startup = min(starts) - t0
        run.phase = max(ends) - min(starts)
        run.tail = t1 - max(ends)
    run.work = sum(j.duration or 0.0 for j in summary.jobs)
    run.round_trips = sum(summary.round_trips.values())
    return run


@contextlib.contextmanager
def jobs_end_at_once() -> Iterator[None]:
    """Patch the dispatcher so every job "ends done" the moment its task asks to run it: no host is reached.

    What is left is the flow's own cost per job: one Prefect task run (engine, state events, logs, persisted
    result, cache lookup), the flow's per-job event and delivery. The floor under the flow's overhead.
    """
    from cloudsend_prefect.dispatch import Dispatcher
    from cloudsend_prefect.runtime import HostRuntime, JobStatus

    saved = (Dispatcher.start, Dispatcher.run_async, HostRuntime.fetch)

    async def run_async(self: Any, job: Any, *, rerun: bool = False, **kw: Any) -> tuple[str, Any]:
        now = time.time()
        return next(iter(self.hosts)), JobStatus(key=job.key, state="done", start=now, end=now, exit=0)

    def fetch(self: Any, batch: str, key: str, outputs: list[str], dest: Path, *args: Any, **kw: Any) -> list[Path]:
        dest.mkdir(parents=True, exist_ok=True)
        return []

    Dispatcher.start = lambda self: None  # type: ignore[method-assign]
    Dispatcher.run_async = run_async  # type: ignore[method-assign]
    HostRuntime.fetch = fetch  # type: ignore[method-assign]
    try:
        yield
    finally:
        Dispatcher.start, Dispatcher.run_async, HostRuntime.fetch = saved  # type: ignore[method-assign]


def run_prefect_alone(n: int) -> FlowRun:
    """N task runs that do nothing (no cloudsend code: no cache key, no persisted result, no log line) in one
    flow run, 64 at a time, timed until Prefect's server has recorded them all Completed: what one task run
    costs this machine's client and server, below anything cloudsend does."""
    import asyncio

    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    @task(name="nothing", task_run_name="nothing-{i}", cache_policy=NO_CACHE, persist_result=False)
    async def nothing(i: int) -> int:
        return i

    @flow(name="prefect-alone")
    async def alone(n: int) -> str:
        gate = asyncio.Semaphore(64)

        async def one(i: int) -> None:
            async with gate:
                await nothing(i, return_state=True)  # type: ignore[misc]  # a coroutine, as the task is

        await asyncio.gather(*(one(i) for i in range(n)))
        return str(flow_run.id)

    async def completed(run_id: str) -> int:
        body = {"flow_runs": {"id": {"any_": [run_id]}}, "task_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}
        async with get_client() as client:
            return int((await client.request("POST", "/task_runs/count", json=body)).json())

    servers = children("prefect.server")
    cpu0 = (self_cpu(), pids_cpu(servers))
    t0 = time.time()
    run_id = asyncio.run(alone(n))
    wall = time.time() - t0
    while asyncio.run(completed(run_id)) < n and time.time() - t0 < 600:
        time.sleep(0.2)
    run = FlowRun(wall=wall, phase=time.time() - t0)
    run.cpu_flow, run.cpu_server = self_cpu() - cpu0[0], pids_cpu(servers) - cpu0[1]
    return run


def run_dispatcher_only(root: Path, name: str, hosts: list[Any], slots: int, poll: float, wl: Workload) -> FlowRun:
    """The same jobs through the same Dispatcher, host runtime and transport, without Prefect: BARE_THREADS
    threads, each doing what the `run-job` task does (run, then fetch logs/outputs)."""
    from concurrent.futures import ThreadPoolExecutor

    from cloudsend_prefect.dispatch import Dispatcher
    from cloudsend_prefect.providers import Connections, provision_all
    from cloudsend_prefect.resolve import load_config
    from cloudsend_prefect.results import store_dir
    from cloudsend_prefect.specs import expand_jobs

    config = load_config(write_config(root, name, hosts, slots, poll, wl))
    os.environ["CLOUDSEND_HOME"] = str(root / "cloudsend-home" / name)
    specs = expand_jobs(config)
    connections = Connections()
    infos = provision_all(config, connections)
    dispatcher = Dispatcher(name, infos, connections, poll)
    reset_peak_rss()
    cpu0 = (self_cpu(), machine_cpu())
    t0 = time.time()

    def one(job: Any) -> Any:
        host, status = dispatcher.run(job)
        dispatcher.runtime(host).fetch(
            name, job.key, job.outputs if status.state == "done" else [], store_dir(name, job.key)
        )
        return status

    try:
        dispatcher.start()
        with ThreadPoolExecutor(BARE_THREADS) as pool:
            statuses = list(pool.map(one, specs))
    finally:
        dispatcher.stop()
        trips = sum(connections.get(h).round_trips for h in infos)
        connections.close_all()
    t1 = time.time()
    cpu1 = (self_cpu(), machine_cpu())
    states: dict[str, int] = {}
    for st in statuses:
        states[st.state] = states.get(st.state, 0) + 1
    run = FlowRun(wall=t1 - t0, rss_mb=vm_hwm_mb(), states=states, round_trips=trips)
    run.cpu_flow, run.cpu_machine = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    starts = [st.start for st in statuses if st.start is not None]
    ends = [st.end for st in statuses if st.end is not None]
    if starts and ends:
        run.startup, run.phase, run.tail = min(starts) - t0, max(ends) - min(starts), t1 - max(ends)
    run.work = sum(st.duration or 0.0 for st in statuses)
    return run


# -- GNU parallel -------------------------------------------------------------------------------------


def ssh_command(h: Any, extra: str = "") -> str:
    return (
        f"ssh -p {h.port} -i {h.key_file} -o UserKnownHostsFile={h.known_hosts_file} "
        f"-o StrictHostKeyChecking=yes -o BatchMode=yes {extra}{h.user}@127.0.0.1"
    )


@contextlib.contextmanager
def control_masters(root: Path, hosts: list[Any]) -> Iterator[list[str]]:
    """One ControlMaster connection per host, opened before timing; yields the ssh command per host."""
    paths = [str(root / f"cm-{i}") for i in range(len(hosts))]
    opened = []
    try:
        for h, path in zip(hosts, paths, strict=True):
            base = ssh_command(h).split()
            subprocess.run(
                [base[0], "-MNf", "-o", "ControlPersist=yes", "-o", f"ControlPath={path}", *base[1:]],
                check=True,
                timeout=30,
            )
            opened.append((h, path))
        yield [ssh_command(h, f"-o ControlMaster=no -o ControlPath={p} ") for h, p in zip(hosts, paths, strict=True)]
    finally:
        for h, path in opened:
            base = ssh_command(h).split()
            subprocess.run(
                [base[0], "-o", f"ControlPath={path}", "-O", "exit", *base[1:]],
                capture_output=True,
                timeout=30,
                check=False,
            )


def run_parallel(logins: list[str], slots: int, wl: Workload) -> float:
    args = ["parallel", "-N0", "--halt", "now,fail=1"]
    for login in logins:
        args += ["--sshlogin", f"{slots}/{login}"]
    args.append(wl.command)
    feed = "".join(f"{i}\n" for i in range(wl.jobs))
    t0 = time.time()
    proc = subprocess.run(args, input=feed, capture_output=True, text=True, check=False)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"GNU parallel exited {proc.returncode}: {proc.stderr[-2000:]}")
    return wall


# -- main ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--jobs", type=int, help="number of jobs (default: both standard workloads)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--sleep", type=float, help="each job runs `sleep SLEEP`")
    g.add_argument("--command", help="each job runs this command line")
    p.add_argument("--hosts", type=int, default=3, help="sshd hosts (default 3)")
    p.add_argument("--slots", type=int, default=4, help="job slots per host (`cpus`, parallel's N/) (default 4)")
    p.add_argument(
        "--poll-interval",
        type=float,
        help="cloudsend poll_interval (default: about one job's length, within 0.2-0.5 s: 0.5 for `sleep 0.5`,"
        " 0.2 for `true`)",
    )
    p.add_argument(
        "--parallel",
        default="cm,plain",
        help="GNU parallel modes, comma-separated: cm (ControlMaster), plain; 'none' skips it (default cm,plain)",
    )
    p.add_argument("--no-warmup", action="store_true", help="skip the one-job warm-up flow run")
    p.add_argument(
        "--prefect-floor",
        action="store_true",
        help="also run each workload's flow with jobs that end at once (no hosts): Prefect's own cost per job",
    )
    p.add_argument(
        "--dispatcher-only",
        action="store_true",
        help="also run each workload through the dispatcher and host runtime without Prefect (run + fetch per job)",
    )
    p.add_argument(
        "--prefect-alone",
        action="store_true",
        help="also time as many Prefect task runs that do nothing (no cloudsend code) until the server recorded them",
    )
    p.add_argument(
        "--breakdown", action="store_true", help="--prefect-floor, --prefect-alone and --dispatcher-only together"
    )
    p.add_argument("--prefect-home", help="PREFECT_HOME (default: a fresh one in the temporary directory)")
    p.add_argument("-v", "--verbose", action="store_true", help="show Prefect's logs")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    if args.breakdown:
        args.prefect_floor = args.prefect_alone = args.dispatcher_only = True
    if args.sleep is not None or args.command is not None or args.jobs is not None:
        jobs = args.jobs or 600
        if args.command is not None:
            args.workloads = [Workload(jobs, args.command, None)]
        else:
            sleep = 0.5 if args.sleep is None else args.sleep
            args.workloads = [Workload(jobs, f"sleep {sleep:g}", sleep)]
    else:
        args.workloads = [Workload(600, "sleep 0.5", 0.5), Workload(2000, "true", None)]
    args.modes = [] if args.parallel == "none" else [m.strip() for m in args.parallel.split(",") if m.strip()]
    if set(args.modes) - {"cm", "plain"}:
        p.error("--parallel takes cm, plain or none")
    return args


def fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "-"


def report(result: Result, modes: list[str]) -> list[str]:
    wl, f = result.workload, result.flow
    ideal = result.ideal
    n = wl.jobs
    lines = [
        f"== {wl.label} on {result.slots} slots in all",
        f"  cloudsend states        {f.states}",
        f"  ideal (work / slots)    {ideal:8.2f} s   ({1000 * wl.work:.1f} ms of work per job"
        + (")" if wl.nominal is not None else ": `bash cmd.sh` timed here, without orchestration)"),
        f"  job durations on hosts  {1000 * f.work / n:8.1f} ms mean (start to end as host.sh records them)",
        f"  job phase (host clock)  {f.phase:8.2f} s   = {fmt_ratio(f.phase, ideal)} ideal",
        f"  flow wall               {f.wall:8.2f} s   = start-up {f.startup:.2f} + job phase {f.phase:.2f}"
        f" + tail {f.tail:.2f}",
        f"  round trips             {f.round_trips} = {f.round_trips / n:.2f} per job",
        f"  flow process peak RSS   {f.rss_mb:8.1f} MiB",
        f"  CPU during the flow     flow process {f.cpu_flow:.1f} s ({1000 * f.cpu_flow / n:.1f} ms/job),"
        f" Prefect server {f.cpu_server:.1f} s ({1000 * f.cpu_server / n:.1f} ms/job),"
        f" hosts and the rest {f.cpu_machine - f.cpu_flow - f.cpu_server:.1f} s"
        f" ({1000 * (f.cpu_machine - f.cpu_flow - f.cpu_server) / n:.1f} ms/job);"
        f" machine {100 * f.cpu_machine / (f.wall + f.drain) / (os.cpu_count() or 1):.0f}% busy"
        f" (incl. {f.drain:.1f} s for the server to finish after the flow returned)",
    ]
    if wl.nominal is None or wl.nominal == 0:
        lines.append(
            f"  overhead per job        {1000 * (f.phase - ideal) / n:8.2f} ms (job phase - ideal) / jobs;"
            f" {1000 * (f.wall - ideal) / n:.2f} ms with the flow's start-up and tail"
        )
    if result.floor is not None:
        fl = result.floor
        lines.append(
            f"  Prefect floor           {fl.phase:8.2f} s   = {1000 * fl.phase / n:.2f} ms/job: the same flow,"
            f" jobs ending at once (no hosts); CPU flow {1000 * fl.cpu_flow / n:.1f}"
            f" + server {1000 * fl.cpu_server / n:.1f} ms/job"
        )
    if result.alone is not None:
        a = result.alone
        lines.append(
            f"  Prefect alone           {a.phase:8.2f} s   = {1000 * a.phase / n:.2f} ms/job until the server recorded"
            f" as many task runs doing nothing (no cloudsend code; flow returned after {a.wall:.2f} s);"
            f" CPU flow {1000 * a.cpu_flow / n:.1f} + server {1000 * a.cpu_server / n:.1f} ms/task run"
        )
    if result.bare is not None:
        b = result.bare
        lines.append(
            f"  without Prefect         {b.phase:8.2f} s   = {fmt_ratio(b.phase, ideal)} ideal,"
            f" {1000 * (b.phase - ideal) / n:.2f} ms/job over it: dispatcher + host runtime + fetch, no task runs;"
            f" {b.round_trips / n:.2f} trips/job; CPU client {1000 * b.cpu_flow / n:.1f},"
            f" rest {1000 * (b.cpu_machine - b.cpu_flow) / n:.1f} ms/job; {b.states}"
        )
    for mode in modes:
        wall = result.parallel.get(mode)
        if wall is None:
            continue
        lines.append(
            f"  GNU parallel ({mode:5s})    {wall:8.2f} s   = {fmt_ratio(wall, ideal)} ideal"
            f" ({1000 * (wall - ideal) / n:.2f} ms/job over it);"
            f" cloudsend/parallel: job phase {fmt_ratio(f.phase, wall)}, flow wall {fmt_ratio(f.wall, wall)}"
        )
    return lines


def table(results: list[Result], modes: list[str], startup: float | None) -> list[str]:
    """One row per workload; a ratio in parentheses is cloudsend's job phase over that figure."""
    head = ["workload", "ideal s", "job phase s", "flow wall s", "trips/job", "RSS MiB", "overhead ms/job"]
    head += [f"parallel {mode} s" for mode in modes]
    head += ["Prefect floor ms/job", "Prefect alone ms/job", "no-Prefect phase s"]
    rows = [head]
    for r in results:
        f, n = r.flow, r.workload.jobs
        row = [
            r.workload.label,
            f"{r.ideal:.2f}",
            f"{f.phase:.2f} ({f.phase / r.ideal:.2f}x ideal)" if r.ideal > 0 else f"{f.phase:.2f}",
            f"{f.wall:.2f}",
            f"{f.round_trips / n:.2f}",
            f"{f.rss_mb:.0f}",
            f"{1000 * (f.phase - r.ideal) / n:.2f}",
        ]
        for mode in modes:
            wall = r.parallel.get(mode)
            row.append(f"{wall:.2f} ({fmt_ratio(f.phase, wall)})" if wall else "-")
        row.append(f"{1000 * r.floor.phase / n:.2f}" if r.floor else "-")
        row.append(f"{1000 * r.alone.phase / n:.2f}" if r.alone else "-")
        row.append(f"{r.bare.phase:.2f} ({1000 * (r.bare.phase - r.ideal) / n:.2f} ms/job)" if r.bare else "-")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    out = [" | ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    out.insert(1, "-+-".join("-" * w for w in widths))
    out.append("(x) after a GNU parallel time: cloudsend's job phase / parallel's wall time")
    if startup is not None:
        out.append(f"Prefect's one-time start-up (first flow call, temporary server, 1 job): {startup:.2f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="cloudsend-bench-", dir="/tmp"))  # short: ControlPath sockets live here
    os.environ["PREFECT_HOME"] = args.prefect_home or str(tmp / "prefect-home")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # a busy machine starts it slowly
    if not args.verbose:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "ERROR")  # as `cloudsend run` does
    from tests.sshd import start_sshd_hosts

    hosts: list[Any] = []

    # SIGTERM/SIGHUP stop the sshd hosts and their jobs at once (a flow may not unwind promptly), then exit.
    def on_signal(signum: int, frame: object) -> None:
        for h in hosts:
            h.stop(kill_jobs=True)
        for pid in children("prefect.server"):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        sys.exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    results: list[Result] = []
    startup: float | None = None
    try:
        hosts = start_sshd_hosts(tmp / "sshd", args.hosts)
        print(
            f"{len(hosts)} sshd hosts on 127.0.0.1 ports {', '.join(str(h.port) for h in hosts)};"
            f" {args.slots} slots each; temp dir {tmp}",
            flush=True,
        )
        if not args.no_warmup:
            warm = run_flow(tmp, "warmup", hosts, args.slots, 0.2, Workload(1, "true", None))
            startup = warm.wall
            print(f"warm-up: 1 job, {warm.wall:.2f} s (Prefect's temporary server start-up included)", flush=True)
        for i, wl in enumerate(args.workloads):
            wl.work = wl.nominal if wl.nominal is not None else calibrate(tmp, wl.command)
            poll = args.poll_interval or min(0.5, max(0.2, wl.work))
            load = os.getloadavg()[0]
            print(f"\ncloudsend: {wl.label}, poll_interval {poll:g} ... (load average {load:.2f})", flush=True)
            flow = run_flow(tmp, f"bench-{i}", hosts, args.slots, poll, wl)
            result = Result(wl, args.slots * len(hosts), flow)
            if args.prefect_floor:
                print(f"Prefect floor: {wl.label} ending at once ...", flush=True)
                with jobs_end_at_once():
                    result.floor = run_flow(tmp, f"floor-{i}", hosts, args.slots, poll, wl)
            if args.prefect_alone:
                print(f"Prefect alone: {wl.jobs} task runs doing nothing ...", flush=True)
                result.alone = run_prefect_alone(wl.jobs)
            if args.dispatcher_only:
                print(f"without Prefect: {wl.label} ... (load average {os.getloadavg()[0]:.2f})", flush=True)
                result.bare = run_dispatcher_only(tmp, f"bare-{i}", hosts, args.slots, poll, wl)
            for mode in args.modes:
                print(f"GNU parallel ({mode}): {wl.label} ... (load average {os.getloadavg()[0]:.2f})", flush=True)
                if mode == "cm":
                    with control_masters(tmp, hosts) as logins:
                        result.parallel[mode] = run_parallel(logins, args.slots, wl)
                else:
                    result.parallel[mode] = run_parallel([ssh_command(h) for h in hosts], args.slots, wl)
            results.append(result)
            print("\n".join(report(result, args.modes)), flush=True)
        server = child_rss_mb("prefect.server")
        print()
        print("\n".join(table(results, args.modes, startup)))
        print(
            f"{len(hosts)} hosts x {args.slots} slots; flow process peak RSS over the whole run"
            f" {vm_hwm_mb():.0f} MiB (after the last reset)"
            + (f"; Prefect's temporary server process {server:.0f} MiB" if server else "")
        )
    finally:
        for h in hosts:
            h.stop(kill_jobs=True)
        if not args.keep:
            subprocess.run(["rm", "-rf", str(tmp)], check=False)
        else:
            print(f"kept {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
