"""Shared fixtures: one Prefect test harness for the session, started by the first test that needs Prefect, and
an isolated CLOUDSEND_HOME per test."""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

pytest_plugins = [
    "tests.sshd",  # real sshd on loopback ports
    "tests.moto_server",  # moto EC2 on loopback
    "tests.host_runtime",  # host.sh driven directly, locally and over ssh
]

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")

# The package's modules that run flows or tasks, save or load blocks, or talk to the Prefect API: the layers from
# tasks up (tests/test_layers.py), the providers (aws loads credentials blocks) and buckets (S3Bucket blocks).
_PREFECT_USERS = {
    "cli",
    "controller_cli",
    "remote",
    "flow",
    "controller",
    "block",
    "fleet",
    "running",
    "tasks",
    "reporting",
    "joblog",
    "pruning",
    "results",
    "providers",
    "buckets",
    "CloudSendCluster",  # `from cloudsend_prefect import CloudSendCluster`
}


@cache
def _needs_prefect(path: Path) -> bool:
    """Whether the test module (or a tests helper it imports) imports Prefect or a module of the package that
    uses it, read from its source; a test of the config alone then pays for no Prefect server."""
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "prefect":
                return True
            if parts[0] == "cloudsend_prefect" and len(parts) > 1 and parts[1] in _PREFECT_USERS:
                return True
            helper = Path(__file__).parent / f"{parts[1]}.py" if parts[0] == "tests" and len(parts) > 1 else None
            if helper is not None and helper.is_file() and helper != path and _needs_prefect(helper):
                return True
    return False


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A Prefect server on loopback (a temporary database) for the rest of the session, started once."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(autouse=True)
def _prefect_when_needed(request: pytest.FixtureRequest) -> None:
    """Start the harness for the tests of a module that needs Prefect (see ``_needs_prefect``)."""
    if _needs_prefect(Path(request.path)):
        request.getfixturevalue("prefect_harness")


@pytest.fixture(autouse=True)
def cloudsend_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "cloudsend-home"
    monkeypatch.setenv("CLOUDSEND_HOME", str(home))
    return home
