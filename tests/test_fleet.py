"""The fleet keeps itself whole and lean, on moto's EC2 with instances reached on loopback sshd hosts.

A lost instance is replaced (a new one launched, bootstrapped, joining the running batch), within a bound;
an instance no work can reach any more is stopped at once, not at the batch's end. Instance time is counted
from what EC2 itself records: each instance's launch time, and the time of its last state transition (moto
records a stop or termination as ``User initiated (<time> UTC)``).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cloudsend_prefect import dispatch, flow
from cloudsend_prefect.flow import run_batch
from cloudsend_prefect.protocol import FINAL_STATES
from cloudsend_prefect.providers import aws
from cloudsend_prefect.providers.aws import addresses as aws_addresses
from cloudsend_prefect.results import BatchSummary
from tests.faults import (
    Fault,
    assert_done_once,
    counted_jobs,
    forget_batch,
    host_statuses,
    kill_host,
    wait_for,
    write_config,
)
from tests.moto_server import CONNECTIONS, LOOPBACK, AwsEnv, ec2
from tests.sshd import SshdHost
from tests.test_aws import (  # noqa: F401  (ami, wire: fixtures)
    Wire,
    ami,
    batch,
    described,
    instance,
    make_config,
    no_capacity,
    provision,
    tag,
    wire,
)


def unique(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:6]}"


@dataclass
class ByInstance:
    """Instance → loopback sshd host in the order instances are first resolved: a replacement (which takes
    the lost instance's rank) reaches a host of its own, not the dead one's."""

    hosts: list[SshdHost]
    slots: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, inst: dict[str, Any]) -> aws_addresses.Endpoint:
        with self.lock:
            slot = self.slots.setdefault(inst["InstanceId"], len(self.slots))
        host = self.hosts[slot]
        return aws_addresses.Endpoint("127.0.0.1", host.port, host.user, str(host.key_file))


def _moment(text: str) -> dt.datetime:
    """The time in moto's ``User initiated (2026-11-29 08:40:25 UTC)``."""
    stamp = text[text.index("(") + 1 : text.index(")")].removesuffix(" UTC")
    return dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").replace(tzinfo=dt.UTC)


@dataclass
class Billed:
    """One instance's billed span, as EC2 records it."""

    instance_id: str
    rank: str | None
    state: str
    launched: dt.datetime
    ended: dt.datetime

    @property
    def seconds(self) -> float:
        return (self.ended - self.launched).total_seconds()


def billed(project: str) -> list[Billed]:
    """Each instance of the project from its launch to its stop or termination, in launch order."""
    spans = []
    for inst in described(project):
        assert inst["State"]["Name"] in ("stopped", "terminated"), inst["State"]  # nothing left running
        spans.append(
            Billed(
                inst["InstanceId"],
                tag(inst, "cloudsend:rank"),
                inst["State"]["Name"],
                inst["LaunchTime"],
                _moment(inst["StateTransitionReason"]),
            )
        )
    return sorted(spans, key=lambda b: b.launched)


def minutes(spans: list[Billed]) -> str:
    return ", ".join(f"{b.rank} {b.instance_id} {b.state} after {b.seconds / 60:.2f} min" for b in spans)


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


def running_fresh(jobs_dir: Path) -> dict[str, dict[str, Any]]:
    """Jobs run there, begun under a second ago, and none has ended there yet: the moment to kill it."""
    records = host_statuses(jobs_dir)
    running = [r for r in records.values() if r["state"] == "running" and r["start"]]
    if not running or any(time.time() - r["start"] > 1.0 for r in running):
        return {}
    if any(r["state"] in FINAL_STATES for r in records.values()):
        return {}
    return records


def test_a_terminated_instance_is_replaced_and_the_new_one_finishes_the_batch(
    tmp_path: Path,
    aws_env: AwsEnv,
    ami: dict[str, Any],  # noqa: F811
    sshd_hosts: list[SshdHost],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """2 instances, one terminated mid-batch (as a spot reclaim would): a third is launched in its place,
    gets the environment built, joins and takes jobs; every job is done exactly once; never more than 2
    instances bill at once."""
    counters, results, project = tmp_path / "counters", tmp_path / "results", unique("replace")
    config = write_config(
        tmp_path / "proj",
        batch(
            project,
            ami,
            [instance(ami, number=2, cpus=2)],
            environments=[{"name": "tools", "command": "echo ready"}],
            jobs=counted_jobs(counters, 16, 2, env_name="tools"),
            lost_after=90,
        ),
    )
    monkeypatch.setitem(aws.ADDRESS_RESOLVERS, LOOPBACK, ByInstance(sshd_hosts))
    monkeypatch.setattr(dispatch, "CLOUD_CHECK", 1.0)  # how often EC2 is asked about each instance
    victim, newcomer = sshd_hosts[1], sshd_hosts[2]
    jobs_dir = victim.home / ".cloudsend" / "jobs" / project

    def terminate(fault: Fault) -> None:
        fault.seen.update(wait_for(lambda: running_fresh(jobs_dir), 120, "jobs running on aws-0.1"))
        (target,) = [i for i in described(project) if tag(i, "cloudsend:rank") == "0.1"]
        ec2().terminate_instances(InstanceIds=[target["InstanceId"]])
        kill_host(victim)  # a terminated instance's processes are gone
        fault.fired.set()

    def cleanup() -> None:
        victim.start()
        forget_batch(victim.home / ".cloudsend", project)

    caplog.set_level(logging.INFO)
    fault = Fault(terminate)
    started = time.monotonic()
    summary = run_with_fault(config, results, fault, cleanup)
    elapsed = time.monotonic() - started
    assert_done_once(summary, counters, results / project, 16)

    # A third instance was launched, of the same type and with the lost one's tags (its rank included).
    spans = billed(project)
    print(f"\nbatch {elapsed:.1f}s; instance time: {minutes(spans)}")
    assert [b.rank for b in spans] == ["0.0", "0.1", "0.1"]
    lost, kept, replacement = spans[1], spans[0], spans[2]
    assert (lost.state, kept.state, replacement.state) == ("terminated", "stopped", "stopped")
    (new,) = [i for i in described(project) if i["InstanceId"] == replacement.instance_id]
    (old,) = [i for i in described(project) if i["InstanceId"] == lost.instance_id]
    for key in ("InstanceType", "ImageId", "KeyName"):
        assert new[key] == old[key], key
    assert [g["GroupId"] for g in new["SecurityGroups"]] == [g["GroupId"] for g in old["SecurityGroups"]]
    assert tag(new, "cloudsend:cluster") == tag(old, "cloudsend:cluster")
    # Never more than `number` instances billing at once: the replacement launched after the loss.
    assert replacement.launched >= lost.ended.replace(microsecond=0)
    assert kept.seconds + lost.seconds + replacement.seconds <= 2 * elapsed + 10

    # It was bootstrapped (the environment built there), joined, and took jobs, including lost ones.
    assert (newcomer.home / ".cloudsend" / "envs").is_dir()
    hosts = {job.name: job.host for job in summary.jobs}
    assert "aws-0.1-r1" in hosts.values(), hosts
    by_key = {job.key: job for job in summary.jobs}
    unfinished = [key for key, record in fault.seen.items() if record["state"] not in FINAL_STATES]
    assert unfinished
    for key in unfinished:  # killed with their instance, then run to completion elsewhere
        assert by_key[key].host != "aws-0.1", by_key[key]
    assert "aws-0.1-r1 (" in caplog.text and "replaces aws-0.1" in caplog.text


def test_an_instance_no_work_can_reach_is_stopped_before_the_batch_ends(
    tmp_path: Path,
    aws_env: AwsEnv,
    ami: dict[str, Any],  # noqa: F811
    sshd_hosts: list[SshdHost],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two 1-CPU instances; a slow job that fails once and is retried keeps one busy while the short jobs end
    on the other: that one is stopped as soon as every job left is held by the first, and the retry, which
    comes after, still runs (on the instance kept)."""
    counters, results, project = tmp_path / "counters", tmp_path / "results", unique("lean")
    jobs = counted_jobs(counters, 5, [0, 0.3, 0.3, 0.3, 0.3])
    attempts = tmp_path / "attempts"
    jobs[0]["run_command"] = (
        f"echo try >> {attempts}; sleep 4; [ $(wc -l < {attempts}) -ge 2 ] || exit 3; " + jobs[0]["run_command"]
    )
    jobs[0]["max_retries"] = 1
    config = write_config(tmp_path / "proj", batch(project, ami, [instance(ami, number=2, cpus=1)], jobs=jobs))
    caplog.set_level(logging.INFO)
    reported: dict[str, float] = {}  # the up-time each instance is billed for in the batch's cost report
    report = flow.cost_report
    monkeypatch.setattr(flow, "cost_report", lambda hosts, seconds: reported.update(seconds) or report(hosts, seconds))
    started = time.monotonic()
    summary = run_batch(config=str(config), results_dir=str(results))
    elapsed = time.monotonic() - started
    assert_done_once(summary, counters, results / project, 5)
    assert attempts.read_text().split() == ["try", "try"]  # failed once, then retried after the other stopped

    busy = next(job.host or "" for job in summary.jobs if job.name == "j00")
    spans = {f"aws-{b.rank}": b for b in billed(project)}
    print(f"\nbatch {elapsed:.1f}s; instance time: {minutes(list(spans.values()))}")
    (idle,) = set(spans) - {busy}
    assert spans[idle].state == spans[busy].state == "stopped"
    saved = (spans[busy].ended - spans[idle].ended).total_seconds()
    assert saved >= 4, f"{idle} was stopped only {saved:.0f}s before {busy}"
    assert f"{idle} (" in caplog.text and "no job left could reach it" in caplog.text
    assert "instance-minutes saved" in caplog.text
    # The cost report bills the idle one until its early stop, not until the batch's end.
    assert reported[busy] - reported[idle] >= 4, reported


def terminate_when_busy(project: str, rank: str, host: SshdHost, fault: Fault, nth: int = 0) -> None:
    """Once jobs run on ``host`` (fresh ones, none ended), terminate the ``nth`` instance of ``rank`` in EC2
    and kill the host with its jobs, as a reclaimed instance would be."""
    jobs_dir = host.home / ".cloudsend" / "jobs" / project
    fault.seen.update(wait_for(lambda: running_fresh(jobs_dir), 120, f"jobs running on {host.name}"))
    ranked = sorted((i for i in described(project) if tag(i, "cloudsend:rank") == rank), key=lambda i: i["LaunchTime"])
    ec2().terminate_instances(InstanceIds=[ranked[nth]["InstanceId"]])
    kill_host(host)


def revive(project: str, *hosts: SshdHost) -> Callable[[], None]:
    def cleanup() -> None:
        for host in hosts:
            host.start()
            forget_batch(host.home / ".cloudsend", project)

    return cleanup


def test_replacements_stop_at_the_bound(
    tmp_path: Path,
    aws_env: AwsEnv,
    ami: dict[str, Any],  # noqa: F811
    sshd_hosts: list[SshdHost],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """replace_lost: 1. The lost instance is replaced once; when the replacement is lost too, it is not: the
    batch ends on the instance left, every job done once, and 3 instances were launched in all, not 4."""
    counters, results, project = tmp_path / "counters", tmp_path / "results", unique("bound")
    config = write_config(
        tmp_path / "proj",
        batch(
            project,
            ami,
            [instance(ami, number=2, cpus=2)],
            jobs=counted_jobs(counters, 30, 4),  # long enough that a late replacement still finds work
            lost_after=90,
            replace_lost=1,
        ),
    )
    monkeypatch.setitem(aws.ADDRESS_RESOLVERS, LOOPBACK, ByInstance(sshd_hosts))
    monkeypatch.setattr(dispatch, "CLOUD_CHECK", 1.0)

    def twice(fault: Fault) -> None:
        terminate_when_busy(project, "0.1", sshd_hosts[1], fault)
        terminate_when_busy(project, "0.1", sshd_hosts[2], fault, nth=1)  # the replacement, once it works
        fault.fired.set()

    caplog.set_level(logging.INFO)
    summary = run_with_fault(config, results, Fault(twice), revive(project, sshd_hosts[1], sshd_hosts[2]))
    assert_done_once(summary, counters, results / project, 30)
    spans = billed(project)
    print(f"\ninstance time: {minutes(spans)}")
    assert [(b.rank, b.state) for b in spans] == [("0.0", "stopped"), ("0.1", "terminated"), ("0.1", "terminated")]
    assert "aws-0.1-r1 is not replaced: this batch may replace 1 lost instances (replace_lost) and launched 1" in (
        caplog.text
    )
    assert {job.host for job in summary.jobs} <= {"aws-0.0", "aws-0.1", "aws-0.1-r1"}


def test_a_replacement_without_capacity_is_not_tried_again(
    tmp_path: Path,
    aws_env: AwsEnv,
    ami: dict[str, Any],  # noqa: F811
    sshd_hosts: list[SshdHost],
    wire: Wire,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """EC2 has no capacity left when the replacement is asked for: the failure is logged, nothing is left
    behind, the batch ends on the instance left, and there was exactly one attempt (nothing loops)."""
    counters, results, project = tmp_path / "counters", tmp_path / "results", unique("nocap")
    config = write_config(
        tmp_path / "proj",
        batch(project, ami, [instance(ami, number=2, cpus=2)], jobs=counted_jobs(counters, 12, 2), lost_after=90),
    )
    monkeypatch.setitem(aws.ADDRESS_RESOLVERS, LOOPBACK, ByInstance(sshd_hosts))
    monkeypatch.setattr(dispatch, "CLOUD_CHECK", 1.0)

    def reclaim(fault: Fault) -> None:
        jobs_dir = sshd_hosts[1].home / ".cloudsend" / "jobs" / project
        wait_for(lambda: host_statuses(jobs_dir), 120, "jobs on aws-0.1")
        wire.faults.append(no_capacity("t3.micro"))  # from now on (the first two are up)
        terminate_when_busy(project, "0.1", sshd_hosts[1], fault)
        fault.fired.set()

    caplog.set_level(logging.INFO)
    summary = run_with_fault(config, results, Fault(reclaim), revive(project, sshd_hosts[1]))
    assert_done_once(summary, counters, results / project, 12)
    assert len(wire.sent("RunInstances")) == 3  # the two first, and one refused attempt
    spans = billed(project)
    print(f"\ninstance time: {minutes(spans)}")
    assert [(b.rank, b.state) for b in spans] == [("0.0", "stopped"), ("0.1", "terminated")]
    assert "could not replace aws-0.1: no capacity or quota left" in caplog.text


def test_a_replacement_takes_the_lost_instances_rank_and_a_later_run_reuses_it(
    tmp_path: Path,
    aws_env: AwsEnv,
    ami: dict[str, Any],  # noqa: F811
    wire: Wire,  # noqa: F811
) -> None:
    """The provider's side: a lost instance EC2 still has (here stopped, as by hand or a stopped spot) is
    terminated, the new one carries its tags, rank included, and the next run finds it instead of creating."""
    config = make_config(tmp_path, "stand-in", [instance(ami, number=2, cpus=2, disk_size=12)])
    first, lost = provision(config)
    ec2().stop_instances(InstanceIds=[lost.machine_id or ""])
    new = aws.replace(config, lost, "aws-0.1-r1", CONNECTIONS)
    assert (new.name, new.cpus, new.created) == ("aws-0.1-r1", 2, True)
    by_id = {i["InstanceId"]: i for i in described("stand-in")}
    assert by_id[lost.machine_id or ""]["State"]["Name"] == "terminated"
    old, made = by_id[lost.machine_id or ""], by_id[new.machine_id or ""]
    assert made["State"]["Name"] == "running"
    assert {t["Key"]: t["Value"] for t in made["Tags"]} == {t["Key"]: t["Value"] for t in old["Tags"]}
    assert wire.sent("RunInstances")[-1]["BlockDeviceMapping.1.Ebs.VolumeSize"] == 12

    again = provision(config)  # the next run: both ranks found, nothing created
    assert [(h.name, h.machine_id) for h in again] == [(first.name, first.machine_id), ("aws-0.1", new.machine_id)]
    assert len(wire.sent("RunInstances")) == 3
    aws.teardown(again, terminate=True)
