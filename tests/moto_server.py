"""moto's EC2 server on loopback, standing in for AWS: boto3 talks to it over real HTTP.

moto invents public and private addresses for its instances (54.x.x.x, 10.x.x.x) that belong to real
networks, so nothing may ever connect to them. Tests reach "instances" through the provider's address
resolver seam instead: the ``loopback`` resolver maps each instance, by its rank tag, to one of the session's
loopback sshd hosts. ``aws_env`` also keeps a developer's real AWS configuration and credentials out of reach
(their files, the instance metadata service) and refuses any non-loopback HTTP lookup by the provider.
"""

from __future__ import annotations

import logging
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cloudsend_prefect.providers import Connections
from tests.sshd import SshdHost

REGION = "eu-west-1"
# The host connections of tests that call the aws provider directly (a flow run has its own): closed by
# ``aws_env`` after each test.
CONNECTIONS = Connections()
LOOPBACK = "loopback"
RANK_TAG = "cloudsend:rank"


@pytest.fixture(scope="session")
def moto_ec2() -> Iterator[str]:
    """A moto server on 127.0.0.1 (a free port) for the session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise floods the logs
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def reset_moto(endpoint: str) -> None:
    """Forget every resource of every account and region (instances, key pairs, groups...)."""
    request = urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST", data=b"")
    with urllib.request.urlopen(request, timeout=10) as resp:
        resp.read()


@dataclass
class LoopbackResolver:
    """Instance → loopback sshd host, round-robin by rank in the order ranks are first seen (deterministic:
    the provider resolves its hosts in rank order). An instance keeps its sshd host for the whole test."""

    hosts: list[SshdHost]
    slots: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def host_for(self, rank: str) -> SshdHost:
        with self.lock:
            slot = self.slots.setdefault(rank, len(self.slots) % len(self.hosts))
        return self.hosts[slot]

    def __call__(self, instance: dict[str, Any]) -> Any:
        from cloudsend_prefect.providers.aws.addresses import Endpoint

        rank = next((t["Value"] for t in instance.get("Tags", []) if t["Key"] == RANK_TAG), None)
        if rank is None:
            raise AssertionError(f"{instance['InstanceId']} has no {RANK_TAG} tag")
        host = self.host_for(rank)
        return Endpoint("127.0.0.1", host.port, host.user, str(host.key_file))


@dataclass
class AwsEnv:
    endpoint: str
    region: str
    config_home: Path
    resolver: LoopbackResolver


def _loopback_only(real: Any) -> Any:
    def urlopen(url: Any, *args: Any, **kwargs: Any) -> Any:
        target = url.full_url if isinstance(url, urllib.request.Request) else str(url)
        host = urllib.parse.urlsplit(target).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise AssertionError(f"test tried to reach {target}: tests never leave loopback (set ssh_from)")
        return real(url, *args, **kwargs)

    return urlopen


@pytest.fixture
def aws_env(
    moto_ec2: str, sshd_hosts: list[SshdHost], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[AwsEnv]:
    """AWS is the moto server, with fake credentials and a clean state; instances resolve to loopback sshd."""
    from cloudsend_prefect.providers import aws
    from cloudsend_prefect.providers.aws import network as aws_network

    reset_moto(moto_ec2)
    config_home = tmp_path / "xdg-config"
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_ec2)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_SECURITY_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_PROFILE", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # the credential chain must not probe 169.254.169.254
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config_home))
    monkeypatch.setattr(aws_network.urllib.request, "urlopen", _loopback_only(urllib.request.urlopen))
    resolver = LoopbackResolver(sshd_hosts)
    monkeypatch.setitem(aws.ADDRESS_RESOLVERS, LOOPBACK, resolver)
    try:
        yield AwsEnv(moto_ec2, REGION, config_home, resolver)
    finally:
        CONNECTIONS.close_all()  # what this test's direct provider calls opened


def ec2(region: str = REGION) -> Any:
    """A boto3 EC2 client on the moto server (inside ``aws_env``)."""
    import boto3

    return boto3.client("ec2", region_name=region)


def linux_ami(client: Any | None = None) -> dict[str, Any]:
    """A usable non-Windows image from moto's catalogue (the first one listed is often Windows)."""
    images = (client or ec2()).describe_images(
        Owners=["amazon"], Filters=[{"Name": "name", "Values": ["ubuntu/images/*"]}]
    )["Images"]
    images = [i for i in images if i.get("Platform") != "windows" and i.get("RootDeviceType") == "ebs"]
    if not images:
        raise AssertionError("moto lists no Ubuntu EBS image")
    return sorted(images, key=lambda i: i["ImageId"])[0]
