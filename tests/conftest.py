"""Shared fixtures: one Prefect test harness for the whole session, an isolated CLOUDSEND_HOME per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = [
    "tests.sshd",  # real sshd on loopback ports
    "tests.moto_server",  # moto EC2 on loopback
    "tests.host_runtime",  # host.sh driven directly, locally and over ssh
]

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")


@pytest.fixture(autouse=True, scope="session")
def prefect_harness() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(autouse=True)
def cloudsend_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "cloudsend-home"
    monkeypatch.setenv("CLOUDSEND_HOME", str(home))
    return home
