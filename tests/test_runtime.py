"""The host runtime (host.sh) driven directly through the local transport and through a real sshd host."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from cloudsend_prefect.protocol import RERUN_ANY, RERUN_FAILED
from cloudsend_prefect.runtime import HostRuntime
from cloudsend_prefect.specs import EnvSpec
from cloudsend_prefect.transport.local import LocalTransport
from tests.host_runtime import job, wait_final


def test_capacity_is_respected_and_queued_jobs_start_when_cpus_free(runtime: HostRuntime) -> None:
    jobs = [job(f"j{i}", "sleep 0.6") for i in range(4)] + [job("big", "sleep 0.6", cpus=2)]
    runtime.stage("b", jobs)
    states = wait_final(runtime, "b", [j.key for j in jobs])
    spans = sorted((s.start or 0, s.end or 0, 2 if s.key == "big" else 1) for s in states.values())
    for start, _, _ in spans:
        assert sum(c for s, e, c in spans if s <= start < e) <= 2
    assert all(s.state == "done" for s in states.values())
    makespan = max(e for _, e, _ in spans) - min(s for s, _, _ in spans)
    assert makespan < 0.6 * 3 + 1.0  # three waves of 0.6 s: queued jobs start without waiting for a poll


def test_staging_a_known_job_again_does_not_run_it_twice(runtime: HostRuntime, tmp_path: Path) -> None:
    spec = job("once", "echo ran >> count.txt; sleep 0.3", outputs=["count.txt"])
    runtime.stage("b", [spec])
    runtime.stage("b", [spec])  # e.g. a rerun of the client while the job runs
    wait_final(runtime, "b", ["once"])
    runtime.stage("b", [spec])  # and after it ended
    time.sleep(0.3)
    assert runtime.status("b")["once"].state == "done"
    got = runtime.fetch("b", "once", ["count.txt"], tmp_path / "out")
    assert (tmp_path / "out" / "count.txt").read_text() == "ran\n" and len(got) == 3
    runtime.stage("b", [spec], rerun={"once": RERUN_FAILED})  # a retry (another client's) leaves a done job alone
    time.sleep(0.3)
    assert runtime.status("b")["once"].state == "done" and (tmp_path / "out" / "count.txt").read_text() == "ran\n"
    runtime.stage("b", [spec], rerun={"once": RERUN_ANY})  # an explicit rerun replaces the ended job
    wait_final(runtime, "b", ["once"])
    runtime.fetch("b", "once", ["count.txt"], tmp_path / "again")
    assert (tmp_path / "again" / "count.txt").read_text() == "ran\n"


def test_cancel_kills_the_whole_process_group(runtime: HostRuntime, tmp_path: Path) -> None:
    marker = tmp_path / "child-survived"
    spec = job("long", f"(sleep 3; touch {marker}) & sleep 30")
    queued = job("queued", "sleep 30", cpus=2)
    runtime.stage("b", [spec, queued])
    deadline = time.monotonic() + 10
    while runtime.status("b")["long"].state != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert sorted(runtime.cancel("b")) == ["long", "queued"]
    states = runtime.status("b")
    assert (states["long"].state, states["long"].reason) == ("aborted", "cancelled")
    assert (states["queued"].state, states["queued"].reason) == ("aborted", "cancelled")
    assert states["long"].cancelled and states["queued"].cancelled
    time.sleep(3.5)
    assert not marker.exists()


def test_a_vanished_process_is_reported_aborted(tmp_path: Path) -> None:
    rt = HostRuntime(LocalTransport(), str(tmp_path / "host"), capacity=1)
    rt.install()
    rt.stage("b", [job("victim", "sleep 30"), job("next", "echo next > n.txt", outputs=["n.txt"])])
    deadline = time.monotonic() + 10
    while (pid := rt.status("b")["victim"].pid) is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(pid, signal.SIGKILL)  # the wrapper and the job die without recording anything
    states = wait_final(rt, "b", ["victim", "next"])
    assert states["victim"].state == "aborted" and "vanished" in states["victim"].reason
    assert states["next"].state == "done"  # the freed CPU went to the queued job


def test_jobs_wait_for_their_environment(runtime: HostRuntime) -> None:
    env = EnvSpec(name="slow", hash="e" * 64, files={"setup.sh": "sleep 1; echo built\n"})
    spec = job("uses-env", "echo in-env", env=env)
    runtime.stage("b", [spec])
    assert runtime.status("b")["uses-env"].state == "waiting"
    assert runtime.ensure_env(env) == "building"
    states = wait_final(runtime, "b", ["uses-env"])
    assert states["uses-env"].state == "done"
    assert runtime.env_state(env) == "ready"
    assert "built" in runtime.env_log_tail(env)
    assert runtime.ensure_env(env) == "ready"  # reused, not rebuilt


def test_timeout_kills_the_job(runtime: HostRuntime) -> None:
    spec = job("slow", "sleep 20").model_copy(update={"timeout": 0.5})
    runtime.stage("b", [spec])
    state = wait_final(runtime, "b", ["slow"])["slow"]
    assert (state.state, state.reason) == ("failed", "timed out after 0.5s")


def test_running_out_of_memory_is_reported_as_such(runtime: HostRuntime) -> None:
    hog = "ulimit -v 300000; python3 -c 'x = bytearray(2 * 1024 ** 3)'"
    runtime.stage("b", [job("hog", hog)])
    state = wait_final(runtime, "b", ["hog"])["hog"]
    assert state.state == "failed" and state.reason.startswith("out of memory"), state


def test_a_poll_is_one_round_trip_and_empty_logs_cost_none(runtime: HostRuntime, tmp_path: Path) -> None:
    first, second = job("first", "echo out; echo made > o.txt", outputs=["o.txt"]), job("second", "sleep 30")
    runtime.stage("b", [first])
    wait_final(runtime, "b", ["first"])
    trips = runtime.transport.round_trips
    seen = runtime.stage("b", [second], watch=["first"])  # stage one job and read another's record
    assert runtime.transport.round_trips == trips + 1
    assert seen["first"].state == "done" and seen["first"].logs == "o" and "second" not in seen
    trips = runtime.transport.round_trips
    got = runtime.fetch("b", "first", ["o.txt"], tmp_path / "got", logs=seen["first"].logs)
    assert runtime.transport.round_trips == trips + 2  # o.txt and stdout: stderr is empty, made here
    assert sorted(p.name for p in got) == ["o.txt", "stderr.log", "stdout.log"]
    assert (tmp_path / "got" / "stdout.log").read_text() == "out\n"
    assert (tmp_path / "got" / "stderr.log").read_bytes() == b""
    assert runtime.stage("b", [], watch=["second"])["second"].state in ("queued", "running")
    runtime.cancel("b", ["second"])


def test_a_reason_naming_quotes_and_backslashes_comes_back_whole(runtime: HostRuntime) -> None:
    """host.sh escapes every string of a record: a missing output's name is reported as it is."""
    name = 'we"ird\\name \x01.txt'
    runtime.stage("b", [job("odd", "true", outputs=[name])])
    state = wait_final(runtime, "b", ["odd"])["odd"]
    assert (state.state, state.reason, state.cause) == ("aborted", f"missing output file: {name}", None)


def test_a_job_whose_environment_failed_says_so_in_its_cause(runtime: HostRuntime) -> None:
    env = EnvSpec(name="broken", hash="f" * 64, files={"setup.sh": "echo cannot; exit 3\n"})
    runtime.stage("b", [job("needs-env", "true", env=env)])
    runtime.ensure_env(env)
    state = wait_final(runtime, "b", ["needs-env"])["needs-env"]
    assert state.state == "aborted" and state.env_failed and not state.cancelled, state
    assert runtime.env_state(env) == "failed" and "cannot" in runtime.env_log_tail(env)
