"""How the client reaches an instance: named address resolvers (public, private, or registered ones)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cloudsend_prefect.providers.aws.session import AwsError


@dataclass(frozen=True)
class Endpoint:
    """Where the client's SSH connection to an instance goes; user and key only when a resolver overrides them."""

    host: str
    port: int = 22
    user: str | None = None
    key_file: str | None = None


def _public(instance: dict[str, Any]) -> Endpoint:
    """The instance's public address: the default, for a client outside the VPC."""
    if not instance.get("PublicIpAddress"):
        raise AwsError(f"{instance['InstanceId']} has no public address: set `address: private` inside the VPC")
    return Endpoint(instance["PublicIpAddress"])


# How the client reaches an instance, by the name an instance type's `address` gives. Register more (a jump
# host, a tunnel, the tests' loopback sshd hosts) by adding a function here.
ADDRESS_RESOLVERS: dict[str, Callable[[dict[str, Any]], Endpoint]] = {
    "public": _public,
    "private": lambda instance: Endpoint(instance["PrivateIpAddress"]),
}
