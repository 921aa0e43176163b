"""Recovery and fault tolerance, proven by injecting the faults: nothing lost, nothing run twice.

Each test runs a batch of counting jobs (tests/faults.py) and breaks something while they run — the client
killed with SIGKILL, a host killed with its jobs, a host's connections dropped, a slow host, an instance
stopped in the cloud, jobs that exhaust memory or overrun, malformed configs — then checks what a user would
check: every job ends done, its side effect shows exactly one completed run, its outputs are complete and
correct in the results folder, and no instance is left running.

A killed client runs as a subprocess pointed at the session's Prefect server (PREFECT_API_URL), so killing
it orphans no ephemeral server. The batch is run again in a subprocess too: a rerun that hangs is killed
and fails the test instead of hanging the session.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from cloudsend_prefect import dispatch
from cloudsend_prefect.cli import app
from cloudsend_prefect.flow import run_batch
from cloudsend_prefect.protocol import FINAL_STATES
from cloudsend_prefect.resolve import load_config
from cloudsend_prefect.results import BatchSummary
from cloudsend_prefect.specs import expand_jobs
from tests.faults import (
    CLOUDSEND,
    Fault,
    assert_done_once,
    client_process,
    completed,
    counted_jobs,
    driver_args,
    forget_batch,
    host_statuses,
    kill_host,
    run_client,
    slow_host,
    ssh_instances,
    states,
    wait_for,
    write_config,
)
from tests.moto_server import AwsEnv, ec2
from tests.sshd import SshdHost
from tests.test_aws import Wire, ami, batch, described, instance, wire  # noqa: F401  (ami, wire: fixtures)

RERUN_TIMEOUT = 120  # seconds; every rerun below needs well under 30


def unique(stem: str) -> str:
    """Projects name the batch directories on the shared sshd hosts: one per test run."""
    return f"{stem}-{uuid.uuid4().hex[:6]}"


def run_args(config: Path, results: Path) -> list[str]:
    return [str(CLOUDSEND), "run", str(config), "--results-dir", str(results)]


def rerun(
    tmp_path: Path, home: Path, config: Path, jobs_dirs: list[Path], count: int, gate: Path | None = None, **driver: Any
) -> BatchSummary:
    """Run the batch again in a client process; it must end soon after its ``count`` jobs ended on the hosts.

    ``gate`` is opened once the rerun's dispatcher has read what the hosts hold: jobs waiting for it were still
    running when the rerun looked at them.
    """
    summary, started = tmp_path / "rerun-summary.json", tmp_path / "rerun-dispatcher-started"
    args = driver_args(config, tmp_path / "results", summary, started=started, **driver)

    def settled() -> bool:
        records = all_statuses(jobs_dirs)
        return len(records) == count and all(r["state"] in FINAL_STATES for r in records.values())

    def open_gate(client: Any) -> None:
        if gate is not None and started.exists():
            gate.touch()

    return run_client(args, tmp_path / "rerun.log", home, summary, RERUN_TIMEOUT, settled=settled, during=open_gate)


def remote_jobs(host: SshdHost, remote_dir: str, batch: str) -> Path:
    return host.home / remote_dir / "jobs" / batch


def all_statuses(jobs_dirs: list[Path]) -> dict[str, dict[str, Any]]:
    return {key: record for d in jobs_dirs for key, record in host_statuses(d).items()}


def keys_by_name(config: Path) -> dict[str, str]:
    return {spec.name: spec.key for spec in expand_jobs(load_config(config))}


def kill_client_mid_batch(
    tmp_path: Path,
    home: Path,
    config: Path,
    project: str,
    jobs_dirs: list[Path],
    gate: Path | None = None,
    gated: tuple[str, ...] = (),
) -> dict[str, dict[str, Any]]:
    """Run the batch with `cloudsend run` and SIGKILL it once some jobs are done (and delivered) while others
    run; then open ``gate`` and wait for the ``gated`` jobs (names) to end on their hosts while no client
    watches. Returns the jobs' records on the hosts at the kill. The results folder is emptied: the rerun must
    deliver every output again, those of jobs finished before the kill included."""
    results = tmp_path / "results"

    def mid_batch() -> dict[str, dict[str, Any]] | None:
        now = all_statuses(jobs_dirs)
        delivered = list((results / project).glob("*/out.txt"))
        return now if delivered and any(r["state"] == "running" for r in now.values()) else None

    with client_process(run_args(config, results), tmp_path / "client.log", home) as client:
        before = wait_for(mid_batch, 120, "some jobs delivered while others run", client=client)
        client.kill()
    assert completed(tmp_path / "counters"), "no job had completed before the kill"
    if gate is not None:
        gate.touch()
    keys = keys_by_name(config)
    wait_for(
        lambda: all(all_statuses(jobs_dirs).get(keys[name], {}).get("state") == "done" for name in gated),
        60,
        f"{', '.join(gated)} to end while the client is dead",
    )
    shutil.rmtree(results)
    return before


def assert_reattached(summary: BatchSummary, before: dict[str, dict[str, Any]]) -> None:
    """Jobs running when the client died were watched again (or adopted), not started again: same start."""
    by_key = {job.key: job for job in summary.jobs}
    running = {key: record for key, record in before.items() if record["state"] == "running"}
    assert running, before
    for key, record in running.items():
        assert by_key[key].started == record["start"], (by_key[key], record)


# -- the client killed (kill -9) ------------------------------------------------------------------------
def test_client_killed_with_jobs_running_on_the_local_provider(tmp_path: Path, cloudsend_home: Path) -> None:
    """On 3 CPUs: j00 ends before the kill (cached on rerun); j01 runs at the kill and ends while the client
    is dead, and j04 runs after it (both adopted, not run again); j02 and j03 still run when the rerun looks
    (re-attached)."""
    counters, project = tmp_path / "counters", unique("kill-local")
    killed, rerun_gate = tmp_path / "gate-killed", tmp_path / "gate-rerun"
    gates = {1: killed, 2: rerun_gate, 3: rerun_gate}
    jobs = counted_jobs(counters, 5, [0.5, 1, 1, 1, 0.5], gates=gates)
    config = write_config(
        tmp_path / "proj", {"project": project, "poll_interval": 0.2, "instances": [{"cpus": 3}], "jobs": jobs}
    )
    jobs_dirs = [cloudsend_home / "hosts" / "local-0" / "jobs" / project]
    before = kill_client_mid_batch(tmp_path, cloudsend_home, config, project, jobs_dirs, killed, ("j01", "j04"))

    summary = rerun(tmp_path, cloudsend_home, config, jobs_dirs, 5, gate=rerun_gate)
    assert_done_once(summary, counters, tmp_path / "results" / project, 5)
    assert_reattached(summary, before)


def test_client_killed_with_jobs_running_across_ssh_hosts(
    tmp_path: Path, cloudsend_home: Path, sshd_hosts: list[SshdHost]
) -> None:
    """Short jobs and jobs that end only once the rerun has looked, spread over the hosts as the dispatcher
    likes: whichever host takes j00 runs it first (it is delivered before the kill), the gated jobs are
    re-attached, and jobs queued behind them run during the rerun. (Jobs ending while the client is dead are
    the local test's: here one could be queued behind a gated job.)"""
    counters, project = tmp_path / "counters", unique("kill-ssh")
    rerun_gate = tmp_path / "gate-rerun"
    jobs = counted_jobs(counters, 6, [0.5, 1] * 3, gates={1: rerun_gate, 3: rerun_gate, 5: rerun_gate})
    config = write_config(
        tmp_path / "proj",
        {"project": project, "poll_interval": 0.2, "instances": ssh_instances(sshd_hosts, 1, project), "jobs": jobs},
    )
    jobs_dirs = [remote_jobs(h, project, project) for h in sshd_hosts]
    before = kill_client_mid_batch(tmp_path, cloudsend_home, config, project, jobs_dirs)

    summary = rerun(tmp_path, cloudsend_home, config, jobs_dirs, 6, gate=rerun_gate)
    assert_done_once(summary, counters, tmp_path / "results" / project, 6)
    assert_reattached(summary, before)


def test_client_killed_during_bootstrap_the_environment_is_built_once(tmp_path: Path, cloudsend_home: Path) -> None:
    counters, builds, project = tmp_path / "counters", tmp_path / "builds.log", unique("kill-boot")
    gate = tmp_path / "gate-build"
    config = write_config(
        tmp_path / "proj",
        {
            "project": project,
            "poll_interval": 0.2,
            "instances": [{"cpus": 2}],
            # the build ends when the test says; its side effect comes last: one line per completed build
            "environments": [
                {"name": "slow", "command": f"while [ ! -e {gate} ]; do sleep 0.05; done; echo built >> {builds}"}
            ],
            "jobs": counted_jobs(counters, 3, 0.5),
        },
    )
    host = cloudsend_home / "hosts" / "local-0"
    jobs_dir = host / "jobs" / project

    def building_with_jobs_waiting() -> bool:
        building = any(p.read_text().strip() == "building" for p in (host / "envs").glob("*/state"))
        return building and len(states(jobs_dir)) == 3

    with client_process(run_args(config, tmp_path / "results"), tmp_path / "client.log", cloudsend_home) as client:
        wait_for(building_with_jobs_waiting, 120, "the build under way and the jobs staged", client=client)
        client.kill()
    assert not builds.exists() and not completed(counters)

    summary = rerun(tmp_path, cloudsend_home, config, [jobs_dir], 3, gate=gate)
    assert_done_once(summary, counters, tmp_path / "results" / project, 3)
    assert builds.read_text() == "built\n"  # the rerun waited for the build under way instead of starting another


def test_client_killed_during_provisioning_on_aws_creates_no_instance_twice(
    tmp_path: Path,
    cloudsend_home: Path,
    aws_env: AwsEnv,
    ami: dict[str, Any],  # noqa: F811
    sshd_hosts: list[SshdHost],
    wire: Wire,  # noqa: F811
) -> None:
    counters, results, project = tmp_path / "counters", tmp_path / "results", unique("kill-prov")
    config = write_config(
        tmp_path / "proj",
        batch(project, ami, [instance(ami, number=3, cpus=1)], jobs=counted_jobs(counters, 4, 0.5)),
    )
    ranks = {f"0.{i}": i for i in range(3)}  # the same instance → sshd host mapping in both processes
    aws_env.resolver.slots.update(ranks)
    loopback = {
        "ranks": {rank: sshd_hosts[i].port for rank, i in ranks.items()},
        "user": sshd_hosts[0].user,
        "key_file": str(sshd_hosts[0].key_file),
    }
    made = tmp_path / "instances-made"
    args = driver_args(config, results, tmp_path / "first.json", loopback=loopback, hang=made)
    with client_process(args, tmp_path / "client.log", cloudsend_home) as client:
        wait_for(made.exists, 120, "EC2 to have made the instances", client=client)
        first = described(project)
        client.kill()
    assert len(first) == 3 and {i["State"]["Name"] for i in first} <= {"pending", "running"}

    summary = run_batch(config=str(config), results_dir=str(results))
    assert_done_once(summary, counters, results / project, 4)
    assert wire.sent("RunInstances") == []  # the rerun found the instances by their tags
    after = described(project)
    assert sorted(i["InstanceId"] for i in after) == sorted(i["InstanceId"] for i in first)
    assert {i["State"]["Name"] for i in after} == {"stopped"}
    tagged = [{"Name": "tag:cloudsend:project", "Values": [project]}]
    assert len(ec2().describe_key_pairs(Filters=tagged)["KeyPairs"]) == 1
    assert len(ec2().describe_security_groups(Filters=tagged)["SecurityGroups"]) == 1


# -- hosts in trouble ---------------------------------------------------------------------------------------
def ssh_batch(tmp_path: Path, hosts: list[SshdHost], project: str, jobs: list[dict[str, Any]], **extra: Any) -> Path:
    config = {
        "project": project,
        "poll_interval": 0.2,
        "instances": ssh_instances(hosts, 2, project),
        "jobs": jobs,
        **extra,
    }
    return write_config(tmp_path / "proj", config)


def run_with_fault(config: Path, results: Path, fault: Fault, cleanup: Callable[[], None]) -> BatchSummary:
    fault.start()
    try:
        summary = run_batch(config=str(config), results_dir=str(results))
    finally:
        if fault.thread is not None:
            fault.thread.join(30)
        cleanup()
    fault.check()
    return summary


def test_dropped_connections_restart_no_job(tmp_path: Path, sshd_hosts: list[SshdHost]) -> None:
    counters, results, project = tmp_path / "counters", tmp_path / "results", unique("drop")
    config = ssh_batch(tmp_path, sshd_hosts, project, counted_jobs(counters, 18, 1.5), lost_after=30)
    target = sshd_hosts[0]
    jobs_dir = remote_jobs(target, project, project)

    def drop(fault: Fault) -> None:
        wait_for(lambda: "running" in states(jobs_dir).values() and completed(counters), 120, "jobs running on host-0")
        fault.seen.update(host_statuses(jobs_dir))
        target.stop(kill_jobs=False)  # sshd and every session die; detached jobs go on
        fault.fired.set()
        time.sleep(4)
        target.start()

    fault = Fault(drop)
    summary = run_with_fault(config, results, fault, target.start)
    assert_done_once(summary, counters, results / project, 18)
    assert not [j.name for j in summary.jobs if j.lost]
    by_key = {job.key: job for job in summary.jobs}
    through = {key: record for key, record in fault.seen.items() if record["state"] == "running"}
    assert through, fault.seen  # jobs were running when the connections dropped
    for key, record in through.items():  # what ran through the drop is the same run
        assert by_key[key].started == record["start"], (by_key[key], record)


# paramiko's SFTP prefetch thread dies with the connection (EOFError): expected here
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_connection_dropped_during_an_output_transfer_restarts_no_job(
    tmp_path: Path, cloudsend_home: Path, sshd_hosts: list[SshdHost]
) -> None:
    """The drop lands while a finished job's outputs are being fetched (a large file, so the transfer takes
    a while): the fetch is tried again once the host is back; the job, already done, is not run again."""
    counters, results, project = tmp_path / "counters", tmp_path / "results", unique("dropget")
    (job,) = counted_jobs(counters, 1, 0.5)
    job["run_command"] = "head -c 60000000 /dev/zero > big.bin; " + job["run_command"]
    job["output_files"] = ["out.txt", "big.bin"]
    config = write_config(
        tmp_path / "proj",
        {
            "project": project,
            "poll_interval": 0.2,
            "lost_after": 30,
            "instances": ssh_instances(sshd_hosts[:1], 1, project),
            "jobs": [job],
        },
    )
    target = sshd_hosts[0]

    def transferring() -> bool:
        return any((cloudsend_home / "outputs").glob("*/*/.*.part"))  # outputs/<batch>/<job key>/

    def drop(fault: Fault) -> None:
        wait_for(transferring, 120, "an output transfer", interval=0.01)
        target.stop(kill_jobs=False)
        fault.fired.set()
        time.sleep(2)
        target.start()

    summary = run_with_fault(config, results, Fault(drop), target.start)
    assert_done_once(summary, counters, results / project, 1)
    assert (results / project / "j00" / "big.bin").stat().st_size == 60_000_000


def test_slow_host_is_never_declared_lost(tmp_path: Path, sshd_hosts: list[SshdHost]) -> None:
    counters, results, project = tmp_path / "counters", tmp_path / "results", unique("slow")
    config = ssh_batch(tmp_path, sshd_hosts, project, counted_jobs(counters, 9, 1), lost_after=2)
    with slow_host(sshd_hosts[0], 2.5):  # every round trip to host-0 takes longer than lost_after
        summary = run_batch(config=str(config), results_dir=str(results))
    assert_done_once(summary, counters, results / project, 9)
    assert not [j.name for j in summary.jobs if j.lost]
    assert any(j.host == sshd_hosts[0].name for j in summary.jobs)  # the slow host did its share


def wait_to_kill(jobs_dir: Path) -> dict[str, dict[str, Any]]:
    """A moment to kill a host: jobs of it run, far from their end (these jobs take 2 s), and none has ended
    there yet (a host that dies holding the only copy of a finished job's outputs must run it again, which
    its counter would show as a second run)."""
    records = host_statuses(jobs_dir)
    running = [r for r in records.values() if r["state"] == "running" and r["start"]]
    if not running or any(time.time() - r["start"] > 1.0 for r in running):
        return {}
    if any(r["state"] in FINAL_STATES for r in records.values()):
        return {}
    return records


def test_killed_host_jobs_run_again_on_the_others(tmp_path: Path, sshd_hosts: list[SshdHost]) -> None:
    counters, results, project = tmp_path / "counters", tmp_path / "results", unique("hostkill")
    config = ssh_batch(tmp_path, sshd_hosts, project, counted_jobs(counters, 12, 2), lost_after=3)
    victim = sshd_hosts[2]
    jobs_dir = remote_jobs(victim, project, project)

    def kill(fault: Fault) -> None:
        fault.seen.update(wait_for(lambda: wait_to_kill(jobs_dir), 120, "jobs running on host-2"))
        kill_host(victim)
        fault.fired.set()

    fault = Fault(kill)
    started = time.monotonic()
    summary = run_with_fault(config, results, fault, victim.start)
    elapsed = time.monotonic() - started
    assert_done_once(summary, counters, results / project, 12)
    by_key = {job.key: job for job in summary.jobs}
    unfinished = [key for key, record in fault.seen.items() if record["state"] not in FINAL_STATES]
    assert unfinished
    for key in unfinished:  # killed with the host, then run to completion on another one
        assert by_key[key].host != victim.name, by_key[key]
    assert elapsed < 60, elapsed


def test_a_host_back_after_being_lost_runs_the_next_batch_and_none_of_the_lost_jobs(
    tmp_path: Path, cloudsend_home: Path, sshd_hosts: list[SshdHost]
) -> None:
    counters, results, project = tmp_path / "counters", tmp_path / "results", unique("revive")
    config = ssh_batch(tmp_path, sshd_hosts, project, counted_jobs(counters, 12, 2), lost_after=3)
    victim = sshd_hosts[2]
    jobs_dir = remote_jobs(victim, project, project)

    def kill(fault: Fault) -> None:
        fault.seen.update(wait_for(lambda: wait_to_kill(jobs_dir), 120, "jobs running on host-2"))
        kill_host(victim)
        fault.fired.set()

    summary = run_with_fault(config, results, Fault(kill), victim.start)
    assert_done_once(summary, counters, results / project, 12)

    # The host is back (same runtime directory); the next batch runs there alone.
    later, next_counters = unique("after"), tmp_path / "next-counters"
    next_config = write_config(
        tmp_path / "next",
        {
            "project": later,
            "poll_interval": 0.2,
            "instances": ssh_instances([victim], 2, project),
            "jobs": counted_jobs(next_counters, 2, 0.2, prefix="n"),
        },
    )
    summary_file = tmp_path / "next-summary.json"
    args = driver_args(next_config, results, summary_file)
    after = run_client(args, tmp_path / "next.log", cloudsend_home, summary_file, timeout=30)
    assert_done_once(after, next_counters, results / later, 2, prefix="n")
    assert_done_once(summary, counters, results / project, 12)  # no job of the lost batch ran again there


def test_stopped_instance_jobs_run_again_on_the_others(
    tmp_path: Path,
    aws_env: AwsEnv,
    ami: dict[str, Any],  # noqa: F811
    sshd_hosts: list[SshdHost],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cloud API's word decides: lost_after is far longer than the batch, yet the stopped instance's
    jobs run again elsewhere at once."""
    counters, results, project = tmp_path / "counters", tmp_path / "results", unique("stopped")
    lost_after = 90
    config = write_config(
        tmp_path / "proj",
        batch(
            project,
            ami,
            [instance(ami, number=3, cpus=2)],
            jobs=counted_jobs(counters, 12, 2),
            lost_after=lost_after,
            replace_lost=0,  # this is about the others taking its jobs; tests/test_fleet.py replaces it
        ),
    )
    aws_env.resolver.slots.update({"0.0": 0, "0.1": 1, "0.2": 2})
    # The dispatcher asks EC2 about each instance every CLOUD_CHECK seconds (and on failed round trips); a
    # shorter period keeps this test short without changing what decides.
    monkeypatch.setattr(dispatch, "CLOUD_CHECK", 3.0)
    victim = sshd_hosts[1]
    jobs_dir = victim.home / ".cloudsend" / "jobs" / project

    def stop(fault: Fault) -> None:
        fault.seen.update(wait_for(lambda: wait_to_kill(jobs_dir), 120, "jobs running on aws-0.1"))
        (target,) = [i for i in described(project) if _tag(i, "cloudsend:rank") == "0.1"]
        ec2().stop_instances(InstanceIds=[target["InstanceId"]])
        kill_host(victim)  # a stopped instance's processes are gone
        fault.fired.set()

    def cleanup() -> None:
        victim.start()
        forget_batch(victim.home / ".cloudsend", project)  # CPUs held by its killed jobs in the shared dir

    fault = Fault(stop)
    started = time.monotonic()
    summary = run_with_fault(config, results, fault, cleanup)
    elapsed = time.monotonic() - started
    assert_done_once(summary, counters, results / project, 12)
    by_key = {job.key: job for job in summary.jobs}
    unfinished = [key for key, record in fault.seen.items() if record["state"] not in FINAL_STATES]
    assert unfinished
    for key in unfinished:
        assert by_key[key].host != "aws-0.1", by_key[key]
    assert elapsed < lost_after, f"{elapsed:.0f}s: the loss was not decided from the cloud API"
    assert not {"pending", "running"} & {i["State"]["Name"] for i in described(project)}
    assert len(described(project)) == 3  # past the bound, the lost instance is not replaced


def _tag(resource: dict[str, Any], key: str) -> str | None:
    return next((t["Value"] for t in resource.get("Tags", []) if t["Key"] == key), None)


# -- jobs failing on their own ------------------------------------------------------------------------------
def task_log(caplog: pytest.LogCaptureFixture, name: str) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if getattr(r, "task_run_name", "") == name)


def test_memory_hog_timeout_and_retries_are_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    runs, bg = tmp_path / "runs.log", tmp_path / "background.pid"
    config = write_config(
        tmp_path / "proj",
        {
            "project": unique("fail"),
            "poll_interval": 0.2,
            "instances": [{"cpus": 2}],
            "jobs": [
                {
                    "name": "hog",
                    "run_command": f"echo run >> {runs}; ulimit -v 300000; python3 -c 'x = bytearray(2 * 1024 ** 3)'",
                    "max_retries": 1,
                },
                {"name": "slowpoke", "run_command": f"sleep 31.5 & echo $! > {bg}; sleep 31.5", "timeout": 1},
            ],
        },
    )
    started = time.monotonic()
    summary = run_batch(config=str(config), results_dir=str(tmp_path / "results"))
    assert time.monotonic() - started < 30
    jobs = {job.name: job for job in summary.jobs}

    hog = jobs["hog"]
    assert (hog.state, hog.exit_code) == ("failed", 1), hog
    assert hog.reason.startswith("out of memory"), hog.reason
    assert runs.read_text().split() == ["run", "run"]  # max_retries: 1 → two attempts, not one more
    log = task_log(caplog, "hog")
    assert "out of memory" in log and "MemoryError" in log, log  # the reason and the end of its stderr

    slow = jobs["slowpoke"]
    assert (slow.state, slow.reason) == ("failed", "timed out after 1s"), slow
    assert "timed out after 1s" in task_log(caplog, "slowpoke")
    pid = int(bg.read_text())  # the job's background child died with its process group
    wait_for(lambda: not _alive(pid), 15, f"the job's background process {pid} to die")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and "sleep" in Path(f"/proc/{pid}/cmdline").read_text()


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Path]:
    """A memory cgroup (v1 or v2) capped at ``limit`` bytes, without swap; skips when none can be made."""
    name = f"cloudsend-test-{uuid.uuid4().hex[:8]}"
    v1 = Path("/sys/fs/cgroup/memory")
    cgroup: Path | None = None
    try:
        if (v1 / "memory.limit_in_bytes").exists():
            cgroup = v1 / name
            cgroup.mkdir()
            (cgroup / "memory.limit_in_bytes").write_text(str(limit))
            if (cgroup / "memory.memsw.limit_in_bytes").exists():
                (cgroup / "memory.memsw.limit_in_bytes").write_text(str(limit))
        elif "memory" in Path("/sys/fs/cgroup/cgroup.controllers").read_text():
            cgroup = Path("/sys/fs/cgroup") / name
            cgroup.mkdir()
            (cgroup / "memory.max").write_text(str(limit))
            (cgroup / "memory.swap.max").write_text("0")
        else:
            raise OSError("no memory controller")
    except OSError as exc:
        if cgroup is not None:
            with contextlib.suppress(OSError):
                cgroup.rmdir()
        reason = f"cannot make a memory cgroup here ({exc}): no kernel OOM kill to observe"
        if os.environ.get("CI"):  # CI's machine kind can (it runs as root): there, not testing is a failure
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield cgroup
    finally:
        for _ in range(50):
            with contextlib.suppress(OSError):
                cgroup.rmdir()
                break
            time.sleep(0.1)


def test_kernel_oom_kill_is_reported_as_out_of_memory(tmp_path: Path) -> None:
    with memory_cgroup(64 * 1024**2) as cgroup:
        config = write_config(
            tmp_path / "proj",
            {
                "project": unique("oom"),
                "poll_interval": 0.2,
                "instances": [{"cpus": 1}],
                "jobs": [
                    {
                        "name": "oom",
                        # into the capped cgroup, then grow until the kernel's OOM killer steps in
                        "run_command": f"echo $$ > {cgroup}/cgroup.procs; "
                        "python3 -c 'x = [bytearray(10 ** 6) for _ in range(10 ** 4)]'",
                    }
                ],
            },
        )
        summary = run_batch(config=str(config), results_dir=str(tmp_path / "results"))
    (job,) = summary.jobs
    assert (job.state, job.exit_code) == ("failed", 137), job
    assert "out of memory" in job.reason, job.reason


# -- bad input: exit 2, nothing created -----------------------------------------------------------------------
def good_config(project: str, hosts: list[SshdHost]) -> dict[str, Any]:
    return {
        "project": project,
        "instances": [{"cpus": 2}, *ssh_instances(hosts, 2, project)],
        "environments": [{"name": "e", "command": "echo ready"}],
        "jobs": [
            {"run_script": "work.py 1", "upload_files": ["data/in.txt"], "output_files": ["out.txt"], "env_name": "e"},
            {"run_command": "echo hi > hi.txt", "output_files": "hi.txt", "repeat": 2},
        ],
    }


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(config: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = config
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        if value is _DELETE:
            del target[int(last) if last.isdigit() else last]
        else:
            target[int(last) if last.isdigit() else last] = value

    return mutate


_DELETE = object()

MALFORMED = {
    "misspelt key": (_set("projcet", "x"), "projcet: unknown key"),
    "too many CPUs": (_set("jobs.1.cpus_req", 64), "jobs[1].cpus_req"),
    "script and command": (_set("jobs.0.run_command", "true"), "jobs[0]"),
    "missing upload": (_set("jobs.0.upload_files", ["data/nope.csv"]), "jobs[0].upload_files"),
    "missing script": (_set("jobs.0.run_script", "nope.py"), "jobs[0].run_script"),
    "missing setup script": (_set("environments.0.command", "setup.sh"), "environments[0].command"),
    "unknown environment": (_set("jobs.0.env_name", "nope"), "jobs[0].env_name"),
    "port out of range": (_set("instances.1.port", 70000), "instances[1].port"),
    "ssh host missing": (_set("instances.2.host", _DELETE), "instances[2].host"),
    "lost_after zero": (_set("lost_after", 0), "lost_after"),
    "timeout not a number": (_set("jobs.1.timeout", "soon"), "jobs[1].timeout"),
    "repeat zero": (_set("jobs.1.repeat", 0), "jobs[1].repeat"),
}


def nothing_created(home: Path, hosts: list[SshdHost], project: str) -> None:
    assert not (home / "hosts").exists() and not (home / "outputs").exists() and not (home / "results").exists()
    for host in hosts:
        assert not (host.home / project).exists(), f"{host.name} has {host.home / project}"


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_config_exits_2_naming_the_field_and_creates_nothing(
    case: str, tmp_path: Path, cloudsend_home: Path, sshd_hosts: list[SshdHost]
) -> None:
    mutate, expected = MALFORMED[case]
    project = unique("bad")
    config = good_config(project, sshd_hosts)
    mutate(config)
    path = write_config(tmp_path / "proj", config, {"work.py": "open('out.txt', 'w').write('x')\n", "data/in.txt": "x"})
    result = CliRunner().invoke(app, ["run", str(path), "--results-dir", str(tmp_path / "results")])
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())  # rich wraps long lines
    assert "batch.yaml" in flat and expected in flat, result.output
    nothing_created(cloudsend_home, sshd_hosts, project)
    assert not (tmp_path / "results").exists()


def test_unparsable_config_exits_2_with_the_line_and_creates_nothing(
    tmp_path: Path, cloudsend_home: Path, sshd_hosts: list[SshdHost]
) -> None:
    project = unique("bad")
    text = yaml.safe_dump(good_config(project, sshd_hosts)).replace("jobs:", "jobs: [", 1)
    path = tmp_path / "proj" / "batch.yaml"
    path.parent.mkdir()
    path.write_text(text)
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2, result.output
    assert "batch.yaml:" in result.output and "not valid YAML" in " ".join(result.output.split()), result.output
    nothing_created(cloudsend_home, sshd_hosts, project)


AWS_MALFORMED = {
    "no instance type": (_set("instances.0.type", _DELETE), "instances[0].type"),
    "unknown address kind": (_set("instances.0.address", "nowhere"), "instances[0].address"),
    "disk size zero": (_set("instances.0.disk_size", 0), "instances[0].disk_size"),
    "negative bid": (_set("instances.0.max_bid", -1), "instances[0].max_bid"),
    "ssh_from not a CIDR": (_set("ssh_from", ["not-a-cidr"]), "ssh_from"),
}


@pytest.mark.parametrize("case", list(AWS_MALFORMED))
def test_malformed_aws_config_exits_2_and_creates_nothing_in_ec2(
    case: str,
    tmp_path: Path,
    cloudsend_home: Path,
    aws_env: AwsEnv,
    ami: dict[str, Any],  # noqa: F811
) -> None:
    mutate, expected = AWS_MALFORMED[case]
    project = unique("badaws")
    config = batch(project, ami, [instance(ami, cpus=1)], jobs=[{"run_command": "true"}])
    mutate(config)
    path = write_config(tmp_path / "proj", config)
    result = CliRunner().invoke(app, ["run", str(path), "--results-dir", str(tmp_path / "results")])
    client = ec2()
    made = {
        "instances": [i["InstanceId"] for r in client.describe_instances()["Reservations"] for i in r["Instances"]],
        "key pairs": [k["KeyName"] for k in client.describe_key_pairs()["KeyPairs"]],
        "security groups": [
            g["GroupName"] for g in client.describe_security_groups()["SecurityGroups"] if g["GroupName"] != "default"
        ],
    }
    assert made == {"instances": [], "key pairs": [], "security groups": []}
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert "batch.yaml" in flat and expected in flat, result.output
    assert not (cloudsend_home / "hosts").exists()
    assert not list((aws_env.config_home / "cloudsend").glob("keys/*"))  # no private key written either
