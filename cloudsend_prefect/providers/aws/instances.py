"""A project's instances after launch: their state (the evidence that decides whether a host is lost), stop
or terminate, removal of everything the project made (``cloudsend down``), and the listing, stopping and
starting behind ``cloudsend instances``, ``stop`` and ``start``."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from cloudsend_prefect.config import BatchConfig
from cloudsend_prefect.providers.aws.hosts import by_region, host_client
from cloudsend_prefect.providers.aws.keys import key_path
from cloudsend_prefect.providers.aws.pricing import on_demand_price
from cloudsend_prefect.providers.aws.session import AwsError, EC2Client, config_client
from cloudsend_prefect.providers.aws.tags import ALIVE, TAG_PROJECT, TAG_RANK, describe, find, tag
from cloudsend_prefect.providers.base import HostHealth, HostInfo
from cloudsend_prefect.providers.costs import billed_hours

log = logging.getLogger("cloudsend.aws")


def regions_of(config: BatchConfig, asked: list[str] | None) -> list[str | None]:
    """The regions to look in: those asked for, else the config's aws instance types' (else the default one)."""
    if asked:
        return [*asked]
    found: set[str | None] = {i.region for i in config.instances if config.provider_of(i) == "aws"}
    return sorted(found, key=str) or [None]


def status(hosts: list[HostInfo]) -> dict[str, HostHealth]:
    """Each instance's state from the EC2 API (the evidence that decides whether a host is lost)."""
    health: dict[str, HostHealth] = {}
    for group in by_region(hosts).values():
        ec2 = host_client(group[0])
        states = {i["InstanceId"]: i["State"]["Name"] for i in describe(ec2, [h.machine_id or "" for h in group])}
        for host in group:
            state = states.get(host.machine_id or "", "terminated")
            health[host.name] = (
                "running"
                if state in ("pending", "running")
                else "stopped"
                if state in ("stopping", "stopped")
                else "terminated"
            )
    return health


def teardown(hosts: list[HostInfo], *, terminate: bool = False) -> None:
    """Stop (or terminate) the batch's instances: nothing keeps billing compute once the batch is over.

    Instances already gone (terminated, shutting down, forgotten by EC2) or already stopped are left alone;
    a failure in one region or for one kind of instance does not keep the others running.
    """
    failures = []
    for region, group in by_region(hosts).items():
        try:
            teardown_region(host_client(group[0]), [h.machine_id or "" for h in group], terminate)
        except Exception as exc:
            ids = ", ".join(h.machine_id or "" for h in group)
            failures.append(f"{region or 'default region'} ({ids}): {exc}")
    if failures:
        raise AwsError(
            "could not stop or terminate every instance; remove them with `cloudsend down CONFIG`:\n  "
            + "\n  ".join(failures)
        )


def teardown_region(ec2: EC2Client, ids: list[str], terminate: bool) -> None:
    """Stop (or terminate) the live ones among ``ids`` in one region; a spot instance is terminated (it cannot
    stop), a pending one waited for first (EC2 cannot stop it yet)."""
    live = [i for i in describe(ec2, ids) if i["State"]["Name"] in ALIVE]
    # A one-time spot instance cannot be stopped: it is terminated.
    doomed = [i["InstanceId"] for i in live if terminate or i.get("InstanceLifecycle") == "spot"]
    pending = [i["InstanceId"] for i in live if i["InstanceId"] not in doomed and i["State"]["Name"] == "pending"]
    stoppable = [
        i["InstanceId"] for i in live if i["InstanceId"] not in doomed and i["State"]["Name"] in ("pending", "running")
    ]
    errors = []
    if doomed:
        try:
            ec2.terminate_instances(InstanceIds=doomed)
            log.info("terminated %s", ", ".join(doomed))
        except Exception as exc:
            errors.append(f"terminate {', '.join(doomed)}: {exc}")
    if stoppable:
        try:
            if pending:  # EC2 cannot stop an instance that is still starting
                ec2.get_waiter("instance_running").wait(
                    InstanceIds=pending, WaiterConfig={"Delay": 5, "MaxAttempts": 60}
                )
            ec2.stop_instances(InstanceIds=stoppable)
            log.info("stopped %s (their disks remain, at EBS prices)", ", ".join(stoppable))
        except Exception as exc:
            errors.append(f"stop {', '.join(stoppable)}: {exc}")
    if errors:
        raise AwsError("; ".join(errors))


def down(config: BatchConfig, regions: list[str | None]) -> list[str]:
    """Remove everything the project created in these regions, found by its tags: instances (terminated and
    waited for), then its security group and key pairs. Returns what was removed."""
    removed = []
    for region in regions:
        ec2 = config_client(config, region)
        ids = [i["InstanceId"] for i in find(ec2, config.project)]
        if ids:
            ec2.terminate_instances(InstanceIds=ids)
            ec2.get_waiter("instance_terminated").wait(InstanceIds=ids, WaiterConfig={"Delay": 5, "MaxAttempts": 120})
            removed += [f"instance {i}" for i in ids]
        project_filter = [{"Name": f"tag:{TAG_PROJECT}", "Values": [config.project]}]
        for group in ec2.describe_security_groups(Filters=project_filter)["SecurityGroups"]:
            ec2.delete_security_group(GroupId=group["GroupId"])
            removed.append(f"security group {group['GroupId']} ({group['GroupName']})")
        for pair in ec2.describe_key_pairs(Filters=project_filter)["KeyPairs"]:
            ec2.delete_key_pair(KeyName=pair["KeyName"])
            removed.append(f"key pair {pair['KeyName']}")
        key_path(config, ec2.meta.region_name).unlink(missing_ok=True)
    return removed


@dataclass
class InstanceView:
    """One of a project's instances as EC2 describes it now."""

    instance_id: str
    region: str
    instance_type: str
    state: str  # pending, running, stopping, stopped
    address: str | None  # public address, else private; None when stopped
    launched: float | None  # epoch seconds of its last start (EC2's LaunchTime)
    spot: bool
    rank: str | None  # which copy of its instance type (the tag cloudsend gave it)


def list_instances(config: BatchConfig, regions: list[str | None]) -> list[InstanceView]:
    """The project's instances in these regions, found by its tag (pending, running, stopping or stopped)."""
    views = []
    for region in regions:
        ec2 = config_client(config, region)
        views += [view(instance, ec2.meta.region_name) for instance in find(ec2, config.project)]
    return views


def view(instance: dict[str, Any], region: str) -> InstanceView:
    """An EC2 instance as ``cloudsend instances`` shows it."""
    launched = instance.get("LaunchTime")
    return InstanceView(
        instance_id=instance["InstanceId"],
        region=region,
        instance_type=instance.get("InstanceType", "?"),
        state=instance["State"]["Name"],
        address=instance.get("PublicIpAddress") or instance.get("PrivateIpAddress"),
        launched=launched.timestamp() if launched is not None else None,
        spot=instance.get("InstanceLifecycle") == "spot",
        rank=tag(instance, TAG_RANK),
    )


def set_running(
    config: BatchConfig, regions: list[str | None], *, running: bool, ids: list[str] | None = None
) -> list[str]:
    """Start (``running``) or stop the project's instances in these regions, all of them or only ``ids``;
    a spot instance cannot be stopped and start again (one-time requests): it is left to ``down``. Returns the
    ids asked to change (already in that state: not counted)."""
    changed = []
    for region in regions:
        ec2 = config_client(config, region)
        found = [i for i in find(ec2, config.project) if ids is None or i["InstanceId"] in ids]
        wanted = ("stopped",) if running else ("pending", "running")  # (a stopping one cannot start yet)
        todo = [i["InstanceId"] for i in found if i["State"]["Name"] in wanted and i.get("InstanceLifecycle") != "spot"]
        if todo:
            (ec2.start_instances if running else ec2.stop_instances)(InstanceIds=todo)
            changed += todo
    return changed


def machine_rows(config: BatchConfig, regions: list[str | None]) -> list[dict[str, Any]]:
    """The project's instances in these regions as ``cloudsend instances`` lists them: uptime since their last
    start, and its cost at the catalog's us-east-1 on-demand price (an upper bound)."""
    rows: list[dict[str, Any]] = []
    now = time.time()
    for seen in list_instances(config, regions):
        uptime = now - seen.launched if seen.state == "running" and seen.launched is not None else None
        price = on_demand_price(seen.instance_type)
        rows.append(
            {
                "provider": "aws",
                "name": f"rank {seen.rank}" if seen.rank else None,
                "id": seen.instance_id,
                "type": seen.instance_type + (" (spot)" if seen.spot else ""),
                "region": seen.region,
                "state": seen.state,
                "address": seen.address,
                "launched": seen.launched,
                "uptime": uptime,
                "usd_per_hour": price,
                "usd_so_far": price * billed_hours(uptime) if price is not None and uptime else None,
            }
        )
    return rows
