"""The project's controller instance (``cloudsend controller``, see ``cloudsend_prefect/controller.py``): one
on-demand instance per project and region, tagged with the rank ``controller``."""

from __future__ import annotations

import logging
from typing import Any

from cloudsend_prefect.config import BatchConfig
from cloudsend_prefect.providers.aws.hosts import host_info
from cloudsend_prefect.providers.aws.images import resolve_image, shape_of
from cloudsend_prefect.providers.aws.instances import InstanceView, teardown_region, view
from cloudsend_prefect.providers.aws.keys import ensure_key
from cloudsend_prefect.providers.aws.launch import Launches, Want, cluster_hash, launch_instance, run_params, start
from cloudsend_prefect.providers.aws.network import ensure_network
from cloudsend_prefect.providers.aws.provisioning import wait_for_ssh
from cloudsend_prefect.providers.aws.session import EC2Client, config_client
from cloudsend_prefect.providers.aws.tags import TAG_RANK, describe, find, tag
from cloudsend_prefect.providers.base import HostInfo
from cloudsend_prefect.providers.connections import Connections

log = logging.getLogger("cloudsend.aws")

CONTROLLER_RANK = "controller"  # its rank tag: one controller per project and region


def _controller(ec2: EC2Client, project: str) -> dict[str, Any] | None:
    """The project's controller instance in any live state, whatever its type: a changed type in the settings
    never leaves a second controller billing beside the first."""
    return next((i for i in find(ec2, project) if tag(i, TAG_RANK) == CONTROLLER_RANK), None)


def _controller_want(config: BatchConfig, ec2: EC2Client, instance_type: str) -> Want:
    """The controller as a host to launch: rank ``controller``, the type's vCPUs, named after the project."""
    return Want(CONTROLLER_RANK, shape_of(ec2, instance_type).vcpus, 0, f"{config.project}-controller")


def ensure_controller(config: BatchConfig, busy: str, connections: Connections) -> tuple[HostInfo, bool]:
    """The project's controller instance (its config's only instance type), running and answering SSH, and
    whether this call created it. An existing one is reused (started when stopped); a new one is on-demand, with
    the project's key, its security group converged to SSH from the caller only, tags, and the dead-man switch,
    which also counts ``busy`` (a shell command) succeeding as use. Whatever fails, an instance this call
    created is terminated before the error is raised."""
    inst = config.instances[0]
    ec2 = config_client(config, inst.region)
    region = ec2.meta.region_name
    launches = Launches(connections)
    try:
        key, _ = ensure_key(ec2, config, region)
        group, subnets = ensure_network(ec2, config, inst)  # the caller's address may have changed since
        instance = _controller(ec2, config.project)
        created = instance is None
        if instance is None:
            image = resolve_image(ec2, config, inst, region)
            cluster = cluster_hash(inst, region)
            # On-demand (the settings' instance type is never spot): a controller preempted mid-batch helps no one.
            params = run_params(config, inst, image, key, group, CONTROLLER_RANK, cluster, busy)
            instance = launch_instance(ec2, params, [inst.type or "", *inst.fallback_types], subnets, launches, cluster)
            launches.created.append((ec2, instance["InstanceId"]))
            log.info("created controller %s (%s)", instance["InstanceId"], instance["InstanceType"])
        elif instance["State"]["Name"] in ("stopping", "stopped"):
            start(ec2, [instance["InstanceId"]])
            log.info("starting controller %s", instance["InstanceId"])
        instance_id = instance["InstanceId"]
        ec2.get_waiter("instance_running").wait(
            InstanceIds=[instance_id], WaiterConfig={"Delay": 5, "MaxAttempts": 120}
        )
        (instance,) = describe(ec2, [instance_id])
        want = _controller_want(config, ec2, instance.get("InstanceType") or inst.type or "")
        host = host_info(ec2, config, inst, want, instance, region, created)
        launches.contacted.append(host)
        wait_for_ssh(host, connections)
    except BaseException:
        launches.undo(config.project)
        raise
    return host, created


def controller_view(config: BatchConfig) -> InstanceView | None:
    """The project's controller instance as EC2 describes it now, if it has one."""
    ec2 = config_client(config, config.instances[0].region)
    instance = _controller(ec2, config.project)
    return None if instance is None else view(instance, ec2.meta.region_name)


def controller_host(config: BatchConfig) -> HostInfo | None:
    """How to reach the project's controller instance over SSH when it is running (else None)."""
    inst = config.instances[0]
    ec2 = config_client(config, inst.region)
    instance = _controller(ec2, config.project)
    if instance is None or instance["State"]["Name"] != "running":
        return None
    want = _controller_want(config, ec2, instance.get("InstanceType") or inst.type or "")
    return host_info(ec2, config, inst, want, instance, ec2.meta.region_name)


def remove_controller(config: BatchConfig, *, terminate: bool) -> str | None:
    """Stop (its disk, and so its results, kept) or terminate the project's controller; its id, or None
    when it has none."""
    ec2 = config_client(config, config.instances[0].region)
    instance = _controller(ec2, config.project)
    if instance is None:
        return None
    teardown_region(ec2, [instance["InstanceId"]], terminate)
    return str(instance["InstanceId"])
