"""A project's instances, found again by their tags: project, cluster hash (what the machine is) and rank
(which copy), so that a later run, or the rerun of a crashed one, reuses an instance instead of duplicating it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from cloudsend_prefect.providers.aws.session import EC2Client

TAG_PROJECT, TAG_CLUSTER, TAG_RANK = "cloudsend:project", "cloudsend:cluster", "cloudsend:rank"
ALIVE = ["pending", "running", "stopping", "stopped"]


def find(ec2: EC2Client, project: str, cluster: str | None = None) -> Iterator[dict[str, Any]]:
    """The project's instances in any live state (of one cluster hash when given), by their tags."""
    filters = [{"Name": f"tag:{TAG_PROJECT}", "Values": [project]}, {"Name": "instance-state-name", "Values": ALIVE}]
    if cluster:
        filters.append({"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster]})
    for page in ec2.get_paginator("describe_instances").paginate(Filters=filters):
        for reservation in page["Reservations"]:
            yield from reservation["Instances"]


def tag(instance: dict[str, Any], key: str) -> str | None:
    """The value of one of an instance's tags, or None."""
    return next((t["Value"] for t in instance.get("Tags", []) if t["Key"] == key), None)


def describe(ec2: EC2Client, ids: list[str]) -> list[dict[str, Any]]:
    """The instances among ``ids`` that EC2 still knows. By filter, not by id: an id EC2 has forgotten (long
    terminated) is simply absent instead of failing the whole call."""
    found: list[dict[str, Any]] = []
    for start in range(0, len(ids), 100):  # EC2 takes at most 200 values per filter
        chunk = ids[start : start + 100]
        pages = ec2.get_paginator("describe_instances").paginate(Filters=[{"Name": "instance-id", "Values": chunk}])
        found += [i for page in pages for r in page["Reservations"] for i in r["Instances"]]
    return found
