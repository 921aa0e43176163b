"""The dead-man switch of EC2 instances: installed by their user data as a systemd service that runs from
every boot on, re-armed by the batch's client each time it connects, and powering the instance off once no
job runs and no client has been in contact for ``idle_minutes``.

The switch runs here as the instance runs it — the script and the limit its user data installs — watching the
runtime directory of a loopback sshd host that a real client drives over SSH. Only what cannot happen in a
test goes through the script's test seams (environment variables systemd never passes): which directories it
watches, how often it looks (0.1 s instead of 30 s), and its power-off command (a marker file instead of
``shutdown -h now``).
"""

from __future__ import annotations

import base64
import contextlib
import os
import shlex
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloudsend_prefect.config import BatchConfig
from cloudsend_prefect.providers import Upkeep, aws
from cloudsend_prefect.providers.aws import boot as aws_boot
from cloudsend_prefect.providers.models import REMOTE_BASE_DIR
from cloudsend_prefect.runtime import HostRuntime
from tests.host_runtime import job
from tests.moto_server import CONNECTIONS, AwsEnv, ec2
from tests.sshd import SshdHost
from tests.test_aws import ami, instance, make_config, provision  # noqa: F401  (ami: a fixture)

SCRIPT = "/usr/local/bin/cloudsend-deadman"
UNIT = f"/etc/systemd/system/{aws_boot.DEADMAN_UNIT}"


def installed(user_data: str) -> dict[str, str]:
    """What the user data's cloud-config writes on the instance, by path."""
    assert user_data.startswith("#cloud-config\n")
    return {f["path"]: f["content"] for f in yaml.safe_load(user_data)["write_files"]}


def exec_start(unit: str) -> list[str]:
    (line,) = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    return shlex.split(line.removeprefix("ExecStart="))


@dataclass
class Switch:
    """A dead-man switch running as its systemd unit would start it, and the marker its power-off makes."""

    proc: subprocess.Popen[str]
    marker: Path

    def powered_off(self, timeout: float) -> float:
        """Wait for the power-off; returns when it happened (epoch seconds, the marker's mtime)."""
        self.proc.wait(timeout=timeout)
        assert self.marker.exists(), self.proc.stdout.read() if self.proc.stdout else ""
        return self.marker.stat().st_mtime

    def still_up(self) -> bool:
        return self.proc.poll() is None and not self.marker.exists()


@contextlib.contextmanager
def switch(tmp_path: Path, watched: Path, idle_minutes: float) -> Iterator[Switch]:
    """Install the switch from the user data of an instance made with ``idle_minutes`` and start it (its boot)."""
    files = installed(aws_boot.user_data(BatchConfig(idle_minutes=idle_minutes)))
    script = tmp_path / "cloudsend-deadman"
    script.write_text(files[SCRIPT])
    command = exec_start(files[UNIT])
    assert command[0] == SCRIPT
    marker = tmp_path / f"powered-off-{uuid.uuid4().hex[:6]}"
    env = {
        **os.environ,
        "CLOUDSEND_DEADMAN_DIRS": str(watched),
        "CLOUDSEND_DEADMAN_PERIOD": "0.1",
        "CLOUDSEND_POWEROFF": f"touch {shlex.quote(str(marker))}",
    }
    proc = subprocess.Popen(
        ["sh", str(script), *command[1:]], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        yield Switch(proc, marker)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()


@pytest.fixture
def host_runtime(sshd_hosts: list[SshdHost]) -> Iterator[tuple[SshdHost, str]]:
    """A runtime directory of its own on a loopback sshd host (the switch watches only it)."""
    host = sshd_hosts[0]
    base = f".cloudsend-deadman-{uuid.uuid4().hex[:8]}"
    yield host, base
    subprocess.run(["rm", "-rf", str(host.home / base)], check=False)


def test_user_data_installs_the_switch_as_a_service_enabled_for_every_boot() -> None:
    user_data = aws_boot.user_data(BatchConfig(idle_minutes=7))
    files = installed(user_data)
    assert files[SCRIPT] == aws_boot.DEADMAN
    unit = files[UNIT]
    assert exec_start(unit) == [SCRIPT, "420"]
    assert "Restart=always" in unit
    assert "[Install]\nWantedBy=multi-user.target" in unit  # started at every boot once enabled
    runcmd = yaml.safe_load(user_data)["runcmd"]
    assert ["systemctl", "enable", "--now", "--no-block", aws_boot.DEADMAN_UNIT] in runcmd


def test_an_idle_instance_powers_off_and_each_client_contact_rearms_it(
    tmp_path: Path, host_runtime: tuple[SshdHost, str]
) -> None:
    host, base = host_runtime
    client = HostRuntime(host.transport(), base, 1, idle=2)
    client.install()  # the client connects: contact, with its config's limit (2 s)
    # Made with idle_minutes 10: the contact's limit replaces the one the instance was made with.
    with switch(tmp_path, host.home / base, idle_minutes=10) as deadman:
        until = time.time() + 5
        while time.time() < until:  # contacts 0.5 s apart, for 5 s: more than twice the limit
            assert deadman.still_up()
            client.arm()
            last = time.time()
            time.sleep(0.5)
        assert deadman.still_up()
        off = deadman.powered_off(timeout=10)
    # The contact's time is kept in whole seconds: the power-off comes 1 to 2 s after it (plus a look's 0.1 s).
    assert 1.0 <= off - last <= 3.5, off - last


def test_a_running_job_keeps_the_instance_up_until_it_ends(tmp_path: Path, host_runtime: tuple[SshdHost, str]) -> None:
    host, base = host_runtime
    client = HostRuntime(host.transport(), base, 1, idle=2)
    client.install()
    with switch(tmp_path, host.home / base, idle_minutes=10) as deadman:
        # Its lease runs out after 2 s and the client says nothing more: only the job keeps the instance up.
        client.stage("b", [job("long", "sleep 6")], lease=1)
        off = deadman.powered_off(timeout=20)
    (record,) = HostRuntime(host.transport(), base, 1).status("b").values()
    assert record.state == "done" and record.end is not None and record.start is not None
    assert record.end - record.start >= 6
    assert 1.0 <= off - record.end <= 3.5, (off, record)


def test_a_gone_clients_queue_and_jobs_killed_by_a_reboot_keep_nothing_up(tmp_path: Path) -> None:
    """Entries the host's runtime left behind keep nothing up once their processes and leases are gone; a
    running lease (a client renewing it) does, with its queued jobs."""
    base = tmp_path / ".cloudsend"
    for d in ("queue", "running", "leases", "jobs/old/k1", "jobs/old/k2"):
        (base / d).mkdir(parents=True)
    (base / "queue" / "1.1000001").write_text("old k1\n")  # queued by a client whose lease ran out
    (base / "leases" / "old").touch()
    os.utime(base / "leases" / "old", (time.time() - 60, time.time() - 60))
    (base / "running" / "old__k2").write_text("1\n")  # killed by a reboot: its pid is gone
    dead = subprocess.Popen(["true"])
    dead.wait()
    (base / "jobs" / "old" / "k2" / "pid").write_text(f"{dead.pid}\n")
    started = time.time()
    with switch(tmp_path, base, idle_minutes=0.05) as deadman:  # 3 s
        off = deadman.powered_off(timeout=10)
    assert 2.0 <= off - started <= 5.0, off - started
    # A lease that runs keeps the instance up.
    os.utime(base / "leases" / "old", (time.time() + 3600, time.time() + 3600))
    with switch(tmp_path, base, idle_minutes=0.05) as deadman:
        time.sleep(6)
        assert deadman.still_up()


def test_a_stopped_and_started_instance_still_carries_its_switch_and_is_rearmed(
    tmp_path: Path,
    aws_env: AwsEnv,
    ami: dict[str, Any],  # noqa: F811
    sshd_hosts: list[SshdHost],
) -> None:
    """User data runs at an instance's first boot only: what it installs must start at the next boots too."""
    config = make_config(tmp_path, "deadman", [instance(ami)], idle_minutes=7)
    (first,) = provision(config)
    aws.teardown([first])  # auto_stop: the batch's end stops it
    (host,) = provision(config.model_copy(update={"idle_minutes": 5}))  # the next run starts it again
    assert host.machine_id == first.machine_id
    (described,) = ec2().describe_instances(InstanceIds=[host.machine_id or ""])["Reservations"][0]["Instances"]
    assert described["State"]["Name"] == "running"
    attribute = ec2().describe_instance_attribute(InstanceId=host.machine_id or "", Attribute="userData")
    user_data = base64.b64decode(attribute["UserData"]["Value"]).decode()
    assert user_data == aws_boot.user_data(BatchConfig(idle_minutes=7))  # still the enabled unit of its launch
    assert exec_start(installed(user_data)[UNIT]) == [SCRIPT, "420"]
    # The client re-arms it as it connects, with the limit of its own config.
    assert aws.upkeep(host) == Upkeep(idle_seconds=300, notices=None)  # on demand: no spot notices to read
    sshd = aws_env.resolver.host_for("0")
    contact = sshd.home / REMOTE_BASE_DIR / "contact"
    contact.unlink(missing_ok=True)
    before = time.time()
    HostRuntime.for_host(host, CONNECTIONS).install()
    assert contact.read_text() == "300\n"
    assert contact.stat().st_mtime >= before - 1
