"""A host runtime (host.sh) to drive directly: on the local machine and on a real sshd host (fixture
``runtime``), with helpers to make jobs and wait for their end."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cloudsend_prefect.runtime import HostRuntime, JobStatus
from cloudsend_prefect.specs import EnvSpec, JobSpec
from cloudsend_prefect.transport.local import LocalTransport
from tests.sshd import SshdHost


def job(key: str, command: str, cpus: int = 1, outputs: list[str] | None = None, env: EnvSpec | None = None) -> JobSpec:
    return JobSpec(
        index=0, name=key, key=key, hash=key, command=command, files=[], outputs=outputs or [], cpus=cpus, env=env
    )


def wait_final(rt: HostRuntime, batch: str, keys: list[str], timeout: float = 30) -> dict[str, JobStatus]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = rt.status(batch)
        if all(k in states and states[k].final for k in keys):
            return states
        time.sleep(0.1)
    raise AssertionError(f"jobs did not end: {rt.status(batch)}")


@pytest.fixture(params=["local", "ssh"])
def runtime(request: pytest.FixtureRequest, tmp_path: Path) -> HostRuntime:
    if request.param == "local":
        rt = HostRuntime(LocalTransport(), str(tmp_path / "host"), capacity=2)
    else:
        host: SshdHost = request.getfixturevalue("sshd_hosts")[0]
        rt = HostRuntime(host.transport(), f"{host.home}/{tmp_path.name}", capacity=2)
    rt.install()
    return rt
