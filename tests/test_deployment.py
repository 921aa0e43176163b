"""The deployment `cloudsend/batch` end to end: a real Prefect server, `prefect deploy`, a process worker, a run.

Everything here talks to its own server (SQLite in a temporary PREFECT_HOME, on 127.0.0.1) through environment
variables given to subprocesses, so the session's test harness and the other tests are left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PREFECT = str(BIN / "prefect")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _base_env(tmp: Path) -> dict[str, str]:
    """This process's environment without any Prefect setting (the harness's must not leak in), plus isolation."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp / "prefect-home"),
        PREFECT_PROFILES_PATH=str(tmp / "prefect-home" / "profiles.toml"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="INFO",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


class Processes:
    """Long-running subprocesses, each in its own session, stopped last-started-first by pid."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop_all
        proc = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        self.started.append((name, proc, log))
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for name, proc, log in reversed(self.started):
            started, how = time.monotonic(), "exited"
            try:
                if proc.poll() is None:
                    how = "SIGINT"  # workers, runners and the server shut down cleanly on Ctrl-C
                    proc.send_signal(signal.SIGINT)
                    try:
                        proc.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        how = "SIGTERM"
                        proc.terminate()
                        try:
                            proc.wait(timeout=10)
                        except subprocess.TimeoutExpired:
                            how = "SIGKILL"
                            proc.kill()
                            proc.wait(timeout=10)
                # Children it left behind (flow-run processes, uvicorn) are in its session's process group.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            finally:
                log.close()
                print(f"{name} stopped ({how}) in {time.monotonic() - started:.1f}s")


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("deployment")


@pytest.fixture(scope="module")
def procs(work_dir: Path) -> Iterator[Processes]:
    logs = work_dir / "logs"
    logs.mkdir()
    processes = Processes(logs)
    try:
        yield processes
    finally:
        processes.stop_all()


@pytest.fixture(scope="module")
def timings() -> Iterator[dict[str, float]]:
    measured: dict[str, float] = {}
    yield measured
    print("\ndeployment test timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in measured.items()))


@pytest.fixture(scope="module")
def server(work_dir: Path, procs: Processes, timings: dict[str, float]) -> dict[str, str]:
    """A `prefect server` of its own; returns the environment for its clients (PREFECT_API_URL set)."""
    started = time.monotonic()
    env = start_server(work_dir, procs, timeout=90)
    timings["server start"] = time.monotonic() - started
    return env


def start_server(work_dir: Path, procs: Processes, timeout: float) -> dict[str, str]:
    """Start a `prefect server` on a free loopback port and wait (at most ``timeout`` s) until it is healthy;
    returns the environment for its clients (PREFECT_API_URL set)."""
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = _base_env(work_dir)
    server_env = {**env, "PREFECT_SERVER_UI_API_URL": api}
    proc = procs.start("server", [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], server_env)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"prefect server exited with {proc.returncode}:\n{procs.log('server')[-4000:]}")
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"prefect server not healthy after {timeout:g} s:\n{procs.log('server')[-4000:]}")
        time.sleep(0.25)
    return {**env, "PREFECT_API_URL": api}


def _prefect(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [PREFECT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    assert result.returncode == 0, f"prefect {' '.join(args)} -> {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def _write_config(tmp_path: Path) -> Path:
    config = {
        "project": "deploy-test",
        "instances": [{"cpus": 2}],
        "jobs": [
            {"name": "alpha", "run_command": "echo alpha-output > out.txt", "output_files": ["out.txt"]},
            {"name": "beta", "run_command": "printf 'beta %s\\n' 42 > out.txt", "output_files": ["out.txt"]},
            {
                "name": "gamma",
                "run_command": "mkdir -p sub && echo gamma-output > sub/result.txt",
                "output_files": ["sub/result.txt"],
            },
        ],
    }
    path = tmp_path / "config" / "batch.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _read_api(api: str, coro_fn: Any) -> Any:
    """Run ``coro_fn(client)`` against our server, not the session harness's."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def main() -> Any:
        async with get_client() as client:
            return await coro_fn(client)

    with temporary_settings(updates={PREFECT_API_URL: api}):
        return asyncio.run(main())


@pytest.fixture(scope="module")
def worker(
    work_dir: Path, server: dict[str, str], procs: Processes, timings: dict[str, float]
) -> subprocess.Popen[bytes]:
    """The deployments of prefect.yaml, and a process worker polling their pool."""
    env = server
    _prefect(["work-pool", "create", "cloudsend-pool", "--type", "process"], env)
    started = time.monotonic()
    _prefect(["--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--all"], env)
    timings["deploy"] = time.monotonic() - started
    worker_env = {
        **env,
        "CLOUDSEND_HOME": str(work_dir / "cloudsend-home"),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "1",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
    }
    return procs.start("worker", [PREFECT, "worker", "start", "--pool", "cloudsend-pool"], worker_env)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_deploy_and_run_batch(
    tmp_path: Path, server: dict[str, str], worker: subprocess.Popen[bytes], procs: Processes, timings: dict[str, float]
):
    """Work-pool route: prefect.yaml deployed, a process worker runs `prefect deployment run cloudsend/batch`."""
    env = server
    api = env["PREFECT_API_URL"]
    config = _write_config(tmp_path)
    results = tmp_path / "results"

    started = time.monotonic()
    run = subprocess.run(
        [
            PREFECT, "deployment", "run", "cloudsend/batch",
            "--param", f"config={config}",
            "--param", f"results_dir={results}",
            "--param", "batch=Deploy Test",
            "--watch", "--watch-timeout", "120",
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=150, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    timings["run to completed"] = time.monotonic() - started
    assert worker.poll() is None, f"worker died:\n{procs.log('worker')[-4000:]}"
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n--- worker log ---\n{procs.log('worker')[-6000:]}"
    match = re.search(r"UUID: ([0-9a-f-]{36})", run.stdout)
    assert match, run.stdout
    flow_run_id = match.group(1)

    async def read(client: Any) -> tuple[Any, Any, list[Any]]:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        flow_run = await client.read_flow_run(flow_run_id)
        deployment = await client.read_deployment_by_name("cloudsend/batch")
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))
        )
        return flow_run, deployment, artifacts

    flow_run, deployment, artifacts = _read_api(api, read)

    # The deployment is the one prefect.yaml describes.
    assert deployment.entrypoint == "flows/cloudsend_batch.py:cloudsend"
    assert deployment.work_pool_name == "cloudsend-pool"
    assert deployment.parameters == {"results_dir": "cloudsend-results"}
    assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}], (
        deployment.pull_steps
    )
    assert [(s.schedule.cron, s.active, s.parameters) for s in deployment.schedules] == [
        ("0 3 * * *", False, {"config": "examples/quickstart.yaml", "batch": "nightly"})
    ]
    schema = deployment.parameter_openapi_schema["properties"]
    assert {"config", "cluster", "jobs", "batch", "results_dir"} <= set(schema)

    # The run: completed, with the parameters given on the command line over the deployment's defaults.
    assert flow_run.state.is_completed(), flow_run.state
    assert flow_run.deployment_id == deployment.id
    assert flow_run.name == "Deploy Test"
    assert flow_run.parameters["config"] == str(config)
    assert flow_run.parameters["results_dir"] == str(results)

    # Outputs in <results_dir>/<batch>/<job>/.
    batch = results / "deploy-test"
    assert (batch / "alpha" / "out.txt").read_text() == "alpha-output\n"
    assert (batch / "beta" / "out.txt").read_text() == "beta 42\n"
    assert (batch / "gamma" / "sub" / "result.txt").read_text() == "gamma-output\n"

    # The UI's view of it: the job table and progress artifacts.
    by_key = {a.key: a for a in artifacts}
    assert {"deploy-test-jobs", "deploy-test-progress"} <= set(by_key), sorted(by_key)
    table = by_key["deploy-test-jobs"].data
    rows = json.loads(table) if isinstance(table, str) else table
    states = sorted((row["job"], row["state"]) for row in rows)
    assert states == [("alpha", "done"), ("beta", "done"), ("gamma", "done")]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_batch_with_a_failed_job_fails_its_flow_run(
    tmp_path: Path, server: dict[str, str], worker: subprocess.Popen[bytes], procs: Processes
):
    """`prefect deployment run --watch` of a batch where a job fails: the run ends Failed (exit code 1), with
    the failure in its message, the per-job event is there, and the automation of docs/deploying.md fires."""
    env = server
    automation = {
        "name": "cloudsend batch failed",
        "trigger": {
            "type": "event",
            "posture": "Reactive",
            "expect": ["prefect.flow-run.Failed"],
            "match_related": {"prefect.resource.role": "flow", "prefect.resource.name": "cloudsend"},
            "threshold": 1,
            "within": 0,
        },
        "actions": [{"type": "do-nothing"}],  # the docs' send-notification needs a notification block
    }
    _prefect(["automation", "create", "--from-json", json.dumps(automation)], env)
    config = tmp_path / "failing.yaml"
    jobs = [{"name": "fine", "run_command": "true"}, {"name": "broken", "run_command": "echo bad >&2; exit 5"}]
    config.write_text(yaml.safe_dump({"project": "deploy-fail", "instances": [{"cpus": 2}], "jobs": jobs}))
    run = subprocess.run(
        [
            PREFECT, "deployment", "run", "cloudsend/batch",
            "--param", f"config={config}", "--param", f"results_dir={tmp_path / 'results'}",
            "--watch", "--watch-timeout", "120",
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=150, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert run.returncode == 1, f"{run.stdout}\n{run.stderr}\n--- worker log ---\n{procs.log('worker')[-6000:]}"
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", run.stdout).group(1)  # type: ignore[union-attr]

    async def read(client: Any) -> tuple[Any, list[dict[str, Any]]]:
        flow_run = await client.read_flow_run(flow_run_id)
        events = []
        for kind in (
            {"name": ["cloudsend.job.failed", "prefect.flow-run.Failed"]},
            {"prefix": ["prefect.automation."]},
        ):
            page = await client.request("POST", "/events/filter", json={"filter": {"event": kind}, "limit": 50})
            events += page.json()["events"]
        return flow_run, events

    expected = ["cloudsend.job.failed", "prefect.automation.action.executed", "prefect.flow-run.Failed"]
    deadline = time.monotonic() + 60
    while True:
        flow_run, events = _read_api(env["PREFECT_API_URL"], read)
        names = sorted(
            {e["event"] for e in events if flow_run_id in json.dumps(e) or "cloudsend batch failed" in json.dumps(e)}
        )
        if set(expected) <= set(names) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert flow_run.state.is_failed(), flow_run.state
    assert flow_run.state.message.startswith("1 of 2 jobs of batch deploy-fail not done (1 done, 1 failed): broken")
    assert set(expected) <= set(names), names


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_cancelling_the_flow_run_cancels_its_jobs(
    tmp_path: Path, server: dict[str, str], worker: subprocess.Popen[bytes], procs: Processes
):
    """`prefect flow-run cancel` of a running batch under a worker: the jobs running on their host are killed,
    the queued ones never start, the job task runs are not retried, and the flow run ends Cancelled."""
    env = server
    pids, started = tmp_path / "pids", tmp_path / "started"
    job = {"name": "long", "run_command": f"echo $$ >> {pids}; echo x >> {started}; exec sleep 300", "repeat": 4}
    config = tmp_path / "long.yaml"
    config.write_text(yaml.safe_dump({"project": "deploy-cancel", "instances": [{"cpus": 2}], "jobs": [job]}))
    run = _prefect(
        ["deployment", "run", "cloudsend/batch", "--param", f"config={config}",
         "--param", f"results_dir={tmp_path / 'results'}", "--param", "batch=cancel-me"],
        env,
    )  # fmt: skip
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", run.stdout).group(1)  # type: ignore[union-attr]
    deadline = time.monotonic() + 120
    while not (pids.exists() and len(pids.read_text().split()) == 2):
        assert time.monotonic() < deadline, f"jobs did not start:\n{procs.log('worker')[-6000:]}"
        time.sleep(0.5)
    running = [int(pid) for pid in pids.read_text().split()]
    cancelled_at = time.monotonic()
    _prefect(["flow-run", "cancel", flow_run_id], env)

    async def read(client: Any) -> tuple[Any, list[Any]]:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        flow_run = await client.read_flow_run(flow_run_id)
        task_runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
        return flow_run, task_runs

    while True:
        flow_run, task_runs = _read_api(env["PREFECT_API_URL"], read)
        if flow_run.state.is_final() or time.monotonic() - cancelled_at > 90:
            break
        time.sleep(1)
    assert flow_run.state.is_cancelled(), f"{flow_run.state}\n{procs.log('worker')[-6000:]}"
    deadline = time.monotonic() + 10
    while [pid for pid in running if _alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [pid for pid in running if _alive(pid)], "jobs still running after the cancellation"
    assert len(started.read_text().split()) == 2  # the two queued ones never started
    print(f"cancel to Cancelled: {time.monotonic() - cancelled_at:.1f}s")
    # Cancelled when the flow saw the cancellation first; Crashed when the worker's SIGTERM came first (the
    # flow then cancels the jobs on its way out). Never Failed, never retried.
    jobs = [t for t in task_runs if t.name.startswith("long")]
    assert jobs and all(t.state.type.value in ("CANCELLED", "CRASHED") and t.run_count <= 1 for t in jobs), [
        (t.name, t.state) for t in jobs
    ]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_serve_with_cluster_block_and_jobs(
    tmp_path: Path, server: dict[str, str], procs: Processes, timings: dict[str, float]
):
    """Serve route: flows/cloudsend_batch.py serves the flow; a run from a saved cluster block plus `jobs` JSON."""
    env = server
    api = env["PREFECT_API_URL"]
    results = tmp_path / "results"
    _prefect(["block", "register", "-m", "cloudsend_prefect"], env)
    save = "from cloudsend_prefect import CloudSendCluster; CloudSendCluster(instances=[{'cpus': 2}]).save('two-cpus')"
    subprocess.run([sys.executable, "-c", save], cwd=ROOT, env=env, check=True, timeout=60)

    serve_env = {**env, "CLOUDSEND_HOME": str(tmp_path / "cloudsend-home"), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    started = time.monotonic()
    served = procs.start(
        "serve", [sys.executable, "flows/cloudsend_batch.py", "--name", "served", "--batch", "served"], serve_env
    )

    async def served_deployment(client: Any) -> Any:
        from prefect.exceptions import ObjectNotFound

        try:
            return await client.read_deployment_by_name("cloudsend/served")
        except ObjectNotFound:
            return None

    while (deployment := _read_api(api, served_deployment)) is None:
        assert served.poll() is None, f"serve exited:\n{procs.log('serve')[-4000:]}"
        assert time.monotonic() - started < 60, f"deployment not served after 60 s:\n{procs.log('serve')[-4000:]}"
        time.sleep(0.5)
    timings["serve to deployment visible"] = time.monotonic() - started
    assert deployment.entrypoint == "cloudsend_prefect.flow.cloudsend"
    assert deployment.parameters == {"batch": "served"}

    jobs = [
        {"name": "one", "run_command": "echo one > one.txt", "output_files": ["one.txt"]},
        {
            "name": "two",
            "run_command": "echo two-$CLOUDSEND_CPUS > two.txt",
            "output_files": ["two.txt"],
            "cpus_req": 2,
        },
    ]
    started = time.monotonic()
    run = subprocess.run(
        [
            PREFECT, "deployment", "run", "cloudsend/served",
            "--param", "cluster=two-cpus",
            "--param", f"jobs={json.dumps(jobs)}",
            "--param", f"base_dir={tmp_path}",
            "--param", f"results_dir={results}",
            "--watch", "--watch-timeout", "120",
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=150, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    timings["served run to completed"] = time.monotonic() - started
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n--- serve log ---\n{procs.log('serve')[-6000:]}"
    assert (results / "served" / "one" / "one.txt").read_text() == "one\n"
    assert (results / "served" / "two" / "two.txt").read_text() == "two-2\n"


def test_flow_parameters_validate_after_cloudpickle(tmp_path: Path):
    """`serve()` runs the flow object cloudpickled into a fresh process, where `list[Job]` must still resolve.

    The flow function is pickled by value (its module attribute is the Flow, not the function), carrying only the
    globals its code uses; a string annotation (``from __future__ import annotations``) then names a missing `Job`.
    """
    script = tmp_path / "child.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            import cloudpickle
            flow = cloudpickle.loads(sys.stdin.buffer.read())
            params = flow.validate_parameters({"cluster": "c", "jobs": [{"run_command": "true"}]})
            print(type(params["jobs"][0]).__name__)
            """
        )
    )
    import cloudpickle

    from cloudsend_prefect.flow import cloudsend

    child = subprocess.run(
        [sys.executable, str(script)],
        input=cloudpickle.dumps(cloudsend),
        capture_output=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")},
    )
    assert child.returncode == 0, child.stderr.decode(errors="replace")[-3000:]
    assert child.stdout.decode().split()[-1] == "Job"
