"""Benchmark: large batches through the `cloudsend` flow, and whether Prefect's server records every job.

Run from the repository root:

    .venv/bin/python bench/scale.py                                  # 10,000 x `true` on 1,000 local slots
    .venv/bin/python bench/scale.py --jobs 10000 50000 --command true "sleep 1"
    .venv/bin/python bench/scale.py --jobs 2000 --slots 8
    .venv/bin/python bench/scale.py --jobs 10000 --hosts 8          # on 8 loopback sshd hosts x 125 slots

Each batch runs in a fresh process with a fresh ``PREFECT_HOME`` (Prefect's ephemeral server, on a new
SQLite database) and ``CLOUDSEND_HOME``, on the ``local`` provider with one host of ``--slots`` CPU slots, or
with ``--hosts N`` on the ``ssh`` provider with N sshd hosts on loopback ports (``tests/sshd.py``) sharing
the slots.
With ``--server postgres`` it runs against what a user outgrowing the ephemeral server would run instead:
a ``prefect server`` on PostgreSQL with Redis messaging (``prefect-redis``), all three started here on
loopback from Debian's ``postgresql`` and ``redis-server`` packages (``pip install prefect-redis``).
It prints, per batch: the wall time of the ``cloudsend(...)`` call, the time from the call to the first job
running (from the jobs' own start times), the client's CPU time per job, the peak RSS of the client and of
Prefect's server process, the round trips to hosts per job, and how many of the batch's job task runs the
server holds in a final state, read from its API after the flow returned (the target: all of them,
Completed).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def postgres_server(root: Path) -> Iterator[tuple[dict[str, str], list[subprocess.Popen[bytes]]]]:
    """PostgreSQL, Redis and a `prefect server` on them, on loopback; yields the client's environment (the
    API's URL) and the server processes (to measure them). PostgreSQL refuses to run as root: its cluster
    belongs to the `postgres` user the Debian package made."""
    pg_bin = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
    data, pg_port, redis_port, api_port = root / "pg", _free_port(), _free_port(), _free_port()
    data.mkdir(parents=True)
    root.parent.chmod(0o755)  # a temporary directory is root's alone; the postgres user must reach its cluster
    shutil.chown(data, "postgres")
    shutil.chown(root, "postgres")
    as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*as_postgres, f"{pg_bin}/initdb", "-D", str(data), "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
    )
    options = f"-p {pg_port} -k {data} -c listen_addresses=127.0.0.1 -c max_connections=200"
    subprocess.run(
        [*as_postgres, f"{pg_bin}/pg_ctl", "-D", str(data), "-o", options, "-w", "start", "-l", str(data / "log")],
        check=True,
        capture_output=True,
    )
    procs: list[subprocess.Popen[bytes]] = []
    try:
        subprocess.run(
            [f"{pg_bin}/createdb", "-h", "127.0.0.1", "-p", str(pg_port), "-U", "postgres", "prefect"], check=True
        )
        redis = subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        procs.append(redis)
        env = {
            **os.environ,
            "PREFECT_HOME": str(root / "prefect-server"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://postgres@127.0.0.1:{pg_port}/prefect",
            "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
            "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
            "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
            "PREFECT_REDIS_MESSAGING_HOST": "127.0.0.1",
            "PREFECT_REDIS_MESSAGING_PORT": str(redis_port),
        }
        prefect = Path(sys.executable).with_name("prefect")
        server = subprocess.Popen(
            [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(api_port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        procs.append(server)
        api = f"http://127.0.0.1:{api_port}/api"
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the prefect server on PostgreSQL did not start")
            time.sleep(0.5)
        yield {"PREFECT_API_URL": api}, procs
    finally:
        for proc in reversed(procs):
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        subprocess.run([*as_postgres, f"{pg_bin}/pg_ctl", "-D", str(data), "-m", "fast", "stop"], capture_output=True)


def tree_rss_kib(pid: int) -> int:
    """The resident memory of a process and all its descendants."""
    return rss_kib(pid) + sum(tree_rss_kib(child) for child in children(pid))


def one(jobs: int, command: str, slots: int, poll: float, instances: list[dict[str, Any]]) -> dict[str, Any]:
    """One batch in this process (a fresh one: the driver starts it) on ``instances`` (default: one local
    host of ``slots``); returns its figures."""
    import asyncio

    import yaml
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter

    from cloudsend_prefect.flow import cloudsend, summary_of

    root = Path(os.environ["CLOUDSEND_HOME"]).parent
    config = root / "scale.yaml"
    job = {"name": "j", "run_command": command, "repeat": jobs}
    config.write_text(
        yaml.safe_dump(
            {"project": "scale", "poll_interval": poll, "instances": instances or [{"cpus": slots}], "jobs": [job]}
        )
    )
    server_peak = 0
    done = threading.Event()

    def sample() -> None:  # Prefect's ephemeral server is a child process of this one
        nonlocal server_peak
        while not done.wait(0.5):
            server_peak = max([server_peak, *(rss_kib(p) for p in children(os.getpid()))])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu0 = os.times()
    start = time.time()
    state = cloudsend(config=str(config), results_dir=str(root / "results"), return_state=True)
    wall = time.time() - start
    cpu1 = os.times()
    summary = summary_of(state)  # a batch with jobs not done is a Failed run: its summary all the same
    flow_run_id = state.state_details.flow_run_id

    async def recorded() -> dict[str, int]:
        counts: dict[str, int] = {}
        async with get_client() as client:
            for kind in ("COMPLETED", "FAILED", "CRASHED", "RUNNING", "PENDING", "SCHEDULED"):
                body = {
                    "flow_runs": FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])).model_dump(
                        mode="json", exclude_unset=True
                    ),
                    "task_runs": TaskRunFilter(name={"like_": "j-"}, state={"type": {"any_": [kind]}}).model_dump(
                        mode="json", exclude_unset=True
                    ),
                }
                response = await client.request("POST", "/task_runs/count", json=body)
                if int(response.json()):
                    counts[kind.lower()] = int(response.json())
        return counts

    counts = asyncio.run(recorded())
    done.set()
    first = min((j.started for j in summary.jobs if j.started), default=start)
    return {
        "jobs": jobs,
        "command": command,
        "slots": slots,
        "wall": wall,
        "first_job": first - start,
        "client_cpu_ms_per_job": 1000 * (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / jobs,
        "client_rss_mb": rss_kib(os.getpid(), "VmHWM") / 1024,
        "round_trips_per_job": sum(summary.round_trips.values()) / jobs,
        "server_rss_mb": server_peak / 1024,
        "states": summary.counts,
        "recorded": counts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, nargs="+", default=[10_000])
    parser.add_argument("--command", nargs="+", default=["true"])
    parser.add_argument("--slots", type=int, default=1000)
    parser.add_argument("--poll-interval", type=float, default=0.5)
    parser.add_argument("--server", choices=["ephemeral", "postgres"], default="ephemeral")
    parser.add_argument(
        "--hosts",
        type=int,
        default=0,
        help="run on this many loopback sshd hosts (ssh provider), SLOTS split among them",
    )
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        instances = json.loads(os.environ.get("SCALE_INSTANCES", "[]"))
        print(json.dumps(one(args.jobs[0], args.command[0], args.slots, args.poll_interval, instances)), flush=True)
        return
    hosts: list[Any] = []
    where = f"{args.slots} local slots"
    with contextlib.ExitStack() as fleet:
        if args.hosts:
            sys.path.insert(0, str(REPO))  # tests.sshd lives in the repository, not in the package
            from tests.faults import ssh_instances
            from tests.sshd import sshd_hosts_running

            hosts = ssh_instances(
                fleet.enter_context(
                    sshd_hosts_running(Path(fleet.enter_context(tempfile.TemporaryDirectory())), args.hosts)
                ),
                max(1, args.slots // args.hosts),
                "scale",
            )
            where = f"{args.hosts} sshd hosts x {max(1, args.slots // args.hosts)} slots"
        rows = run_batches(args, hosts, where)
    report(rows)


def run_batches(args: argparse.Namespace, hosts: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    """Each batch (command x jobs) in a fresh process, with a fresh Prefect server and CLOUDSEND_HOME."""
    rows = []
    for command in args.command:
        for jobs in args.jobs:
            with tempfile.TemporaryDirectory(prefix="cloudsend-scale-") as tmp, contextlib.ExitStack() as stack:
                server_env: dict[str, str] = {}
                server_procs: list[subprocess.Popen[bytes]] = []
                if args.server == "postgres":
                    server_env, server_procs = stack.enter_context(postgres_server(Path(tmp) / "server"))
                env = {
                    **os.environ,
                    "PREFECT_HOME": f"{tmp}/prefect",
                    "CLOUDSEND_HOME": f"{tmp}/cloudsend-home",
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_LOGGING_LEVEL": "WARNING",
                    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
                }
                env.pop("PREFECT_API_URL", None)
                env.update(server_env, SCALE_INSTANCES=json.dumps(hosts))
                cmd = [sys.executable, __file__, "--one", "--jobs", str(jobs), "--command", command]
                cmd += ["--slots", str(args.slots), "--poll-interval", str(args.poll_interval)]
                print(f"== {jobs} x {command!r} on {where}, {args.server} server", flush=True)
                batch = subprocess.Popen(
                    cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                )
                server_peak = 0
                while batch.poll() is None and server_procs:  # the server's processes, sampled from here
                    server_peak = max(server_peak, sum(tree_rss_kib(p.pid) for p in server_procs))
                    time.sleep(0.5)
                out, err = batch.communicate()
                proc = subprocess.CompletedProcess(cmd, batch.returncode, out, err)
                errors = [line for line in proc.stderr.splitlines() if "Traceback" in line or "ERROR" in line]
                if proc.returncode != 0 or not proc.stdout.strip():
                    log = Path(tempfile.gettempdir()) / "cloudsend-scale-failed.log"
                    log.write_text(proc.stderr)
                    raise SystemExit(f"the batch failed ({proc.returncode}); its output is in {log}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                row["error_lines"] = len(errors)
                row["server"] = args.server
                row["where"] = where
                if server_procs:
                    row["server_rss_mb"] = server_peak / 1024
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def report(rows: list[dict[str, Any]]) -> None:
    print()
    columns = ["batch", "wall", "to first job", "client CPU/job", "client RSS", "server RSS", "trips/job", "recorded"]
    print("| " + " | ".join([*columns, "errors"]) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for r in rows:
        recorded = ", ".join(f"{n} {s}" for s, n in r["recorded"].items())
        print(
            f"| {r['jobs']} x `{r['command']}` on {r['where']}, {r['server']} | {r['wall']:.1f} s | "
            f"{r['first_job']:.1f} s | {r['client_cpu_ms_per_job']:.2f} ms | {r['client_rss_mb']:.0f} MB | "
            f"{r['server_rss_mb']:.0f} MB | {r['round_trips_per_job']:.2f} | {recorded} of {r['jobs']} | "
            f"{r['error_lines']} |"
        )


if __name__ == "__main__":
    main()
