"""Spot interruption notices: EC2 announces, two minutes ahead, that it takes a spot instance back, through the
instance metadata service (IMDSv2: a session token, then ``spot/instance-action``). The host's runtime reads it
during its ticks, and the batch gives that host's jobs to the others at once, none of them run twice, instead
of waiting for the instance to vanish.

The instances are moto's, reached as loopback sshd hosts; their metadata service is an HTTP server this test
runs on loopback (the provider's ``IMDS`` seam), which speaks IMDSv2 and hands out the notice when told to.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cloudsend_prefect import runtime
from cloudsend_prefect.protocol import FINAL_STATES
from cloudsend_prefect.providers import aws
from cloudsend_prefect.providers.aws import hosts as aws_hosts
from cloudsend_prefect.providers.aws import spot as aws_spot
from cloudsend_prefect.providers.models import REMOTE_BASE_DIR
from tests.faults import Fault, assert_done_once, counted_jobs, forget_batch, host_statuses, wait_for, write_config
from tests.moto_server import AwsEnv
from tests.sshd import SshdHost
from tests.test_aws import ami, batch, instance, make_config, provision, unique  # noqa: F401  (ami: a fixture)
from tests.test_recovery import run_with_fault

NOTICE = {"action": "terminate", "time": "2026-11-29T10:00:00Z"}
TOKEN_PATH, NOTICE_PATH = "/latest/api/token", "/latest/meta-data/spot/instance-action"


@dataclass
class Imds:
    """An IMDSv2 metadata service: ``spot/instance-action`` answers 404 until ``announce``; then the first
    instance to ask is the one being interrupted (``on_notice`` runs as it is told), and the others never hear
    of it."""

    url: str = ""
    tokens: set[str] = field(default_factory=set)
    announced: threading.Event = field(default_factory=threading.Event)
    told: threading.Event = field(default_factory=threading.Event)
    told_at: float = 0.0
    asked: int = 0
    on_notice: Callable[[], None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def announce(self, on_notice: Callable[[], None]) -> None:
        self.on_notice = on_notice
        self.announced.set()

    def answer(self, method: str, path: str, headers: Any) -> tuple[int, str]:
        if method == "PUT" and path == TOKEN_PATH:
            if not headers.get("X-aws-ec2-metadata-token-ttl-seconds", "").isdigit():
                return 400, ""
            token = secrets.token_hex(16)
            with self.lock:
                self.tokens.add(token)
            return 200, token
        if method != "GET" or path != NOTICE_PATH:
            return 404, ""
        with self.lock:
            if headers.get("X-aws-ec2-metadata-token") not in self.tokens:
                return 401, ""  # IMDSv2 only, as cloudsend launches its instances
            self.asked += 1
            if not self.announced.is_set() or self.told.is_set():
                return 404, ""
            if self.on_notice is not None:
                self.on_notice()
            self.told_at = time.time()
            self.told.set()
        return 200, json.dumps(NOTICE)


@pytest.fixture
def imds(monkeypatch: pytest.MonkeyPatch) -> Iterator[Imds]:
    service = Imds()

    class Handler(BaseHTTPRequestHandler):
        def _reply(self) -> None:
            status, body = service.answer(self.command, self.path, self.headers)
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_PUT = _reply

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    service.url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(aws_spot, "IMDS", service.url)
    try:
        yield service
    finally:
        server.shutdown()
        server.server_close()


def test_only_spot_instances_have_their_notices_read(
    tmp_path: Path,
    aws_env: AwsEnv,
    ami: dict[str, Any],  # noqa: F811
    imds: Imds,
) -> None:
    config = make_config(tmp_path, "notices", [instance(ami, eco=True), instance(ami)])
    spot, on_demand = provision(config)
    spot_data, on_demand_data = aws_hosts.aws_data(spot), aws_hosts.aws_data(on_demand)
    assert (spot_data.spot, spot_data.imds) == (True, imds.url)
    assert (on_demand_data.spot, on_demand_data.imds) == (False, None)
    assert aws.upkeep(spot).notices == imds.url and aws.upkeep(on_demand).notices is None
    aws.teardown([spot, on_demand], terminate=True)


def test_a_spot_notice_moves_the_hosts_jobs_to_the_other_at_once(
    tmp_path: Path,
    aws_env: AwsEnv,
    ami: dict[str, Any],  # noqa: F811
    sshd_hosts: list[SshdHost],
    imds: Imds,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two spot instances; mid-batch, EC2 announces it takes one back. Its jobs, queued and running, are
    cancelled there and done on the other, each exactly once, long before the 15 s look at the instance's
    state (which still says running: only the notice tells)."""
    counters, results, project = tmp_path / "counters", tmp_path / "results", unique("spot")
    config = write_config(
        tmp_path / "proj",
        batch(project, ami, [instance(ami, number=2, cpus=2, eco=True)], jobs=counted_jobs(counters, 12, 4)),
    )
    aws_env.resolver.slots.update({"0.0": 0, "0.1": 1})
    monkeypatch.setattr(runtime, "SPOT_CHECK", 0.5)  # read every 0.5 s (5 s by default): a shorter test
    jobs_dirs = {f"aws-0.{i}": sshd_hosts[i].home / REMOTE_BASE_DIR / "jobs" / project for i in range(2)}
    at_notice: dict[str, dict[str, Any]] = {}

    def first_wave_running() -> bool:
        """Both hosts run jobs that started under a second ago, and none has ended yet."""
        for jobs_dir in jobs_dirs.values():
            records = host_statuses(jobs_dir).values()
            running = [r for r in records if r["state"] == "running" and r["start"]]
            if not running or any(time.time() - r["start"] > 1.0 for r in running):
                return False
            if any(r["state"] in FINAL_STATES for r in records):
                return False
        return True

    def announce(fault: Fault) -> None:
        wait_for(first_wave_running, 120, "jobs running on both instances")
        imds.announce(lambda: at_notice.update({name: host_statuses(d) for name, d in jobs_dirs.items()}))
        fault.fired.set()

    def cleanup() -> None:
        for host in sshd_hosts[:2]:
            forget_batch(host.home / REMOTE_BASE_DIR, project)

    summary = run_with_fault(config, results, Fault(announce), cleanup)
    assert_done_once(summary, counters, results / project, 12)
    assert imds.told.is_set(), f"no instance read the notice ({imds.asked} reads)"
    lost = [r for r in caplog.records if r.name == "cloudsend.dispatch" and " lost: " in r.getMessage()]
    assert len(lost) == 1, [r.getMessage() for r in lost]
    victim = lost[0].getMessage().split(" lost: ")[0]
    assert re.search(r"spot instance i-\w+ of host aws-0\.\d is being interrupted by EC2", lost[0].getMessage())
    assert "action: terminate" in lost[0].getMessage()
    assert lost[0].created - imds.told_at < 3, "the notice was not acted on at once"
    # Every job the interrupted host had not finished when told ended done on the other one.
    unfinished = [key for key, r in at_notice[victim].items() if r["state"] not in FINAL_STATES]
    assert unfinished, at_notice
    by_key = {job.key: job for job in summary.jobs}
    for key in unfinished:
        assert by_key[key].host not in (None, victim), by_key[key]
    # The batch says so: each moved job's task run tells why it was placed again.
    moved = [r.getMessage() for r in caplog.records if "placing it again" in r.getMessage()]
    assert len(moved) == len(unfinished), moved
    assert all("is being interrupted by EC2" in message for message in moved), moved
