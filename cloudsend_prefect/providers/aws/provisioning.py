"""Provisioning: an instance type's hosts, reused by their tags or launched (key, security group, image first),
started when stopped, waited for until SSH answers; and a lost host replaced by a new instance of its type."""

from __future__ import annotations

import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cloudsend_prefect.config import BatchConfig, InstanceType
from cloudsend_prefect.providers.aws.hosts import host_client, host_info
from cloudsend_prefect.providers.aws.images import resolve_image, shape_of
from cloudsend_prefect.providers.aws.keys import ensure_key
from cloudsend_prefect.providers.aws.launch import (
    Launches,
    Want,
    cluster_hash,
    launch_instance,
    run_params,
    start,
    wanted,
)
from cloudsend_prefect.providers.aws.network import ensure_network
from cloudsend_prefect.providers.aws.session import AwsError, config_client
from cloudsend_prefect.providers.aws.tags import ALIVE, TAG_RANK, describe, find, tag
from cloudsend_prefect.providers.base import HostInfo
from cloudsend_prefect.providers.connections import Connections
from cloudsend_prefect.transport import TransportError

log = logging.getLogger("cloudsend.aws")


def provision(
    config: BatchConfig, instances: list[tuple[int, InstanceType]], connections: Connections, *, create: bool = True
) -> list[HostInfo]:
    """The instance types' hosts (see ``provision_type``); whatever fails, the instances this call launched are
    terminated before the error is raised."""
    hosts: list[HostInfo] = []
    launches = Launches(connections)
    try:
        for index, inst in instances:
            hosts += provision_type(config, index, inst, create, launches)
    except BaseException:
        launches.undo(config.project)  # nothing this call created outlives its failure
        raise
    return hosts


def provision_type(
    config: BatchConfig,
    index: int,
    inst: InstanceType,
    create: bool,
    launches: Launches,
    only: Want | None = None,
) -> list[HostInfo]:
    """The hosts of one instance type (``only``: just this one of them), waited for until SSH answers. The
    instance type was checked by ``validate`` (it has a ``type``, a known ``address``)."""
    assert inst.type is not None  # validate refuses an aws instance type without one
    ec2 = config_client(config, inst.region)
    region = ec2.meta.region_name
    cluster = cluster_hash(inst, region)
    shapes = {inst.type: shape_of(ec2, inst.type)}
    wants = [only] if only is not None else wanted(inst, index, shapes[inst.type].vcpus, shapes[inst.type].gpus)

    def fitted(want: Want, instance: dict[str, Any]) -> Want:
        """An instance of a fallback type offers that type's vCPUs and GPUs (unless `cpus`, `gpus` say)."""
        kind = instance.get("InstanceType") or inst.type or ""
        if kind == inst.type:
            return want
        if kind not in shapes:
            shapes[kind] = shape_of(ec2, kind)
        cpus = want.cpus if inst.cpus is not None else shapes[kind].vcpus
        return dataclasses.replace(want, cpus=cpus, gpus=want.gpus if inst.gpus is not None else shapes[kind].gpus)

    existing = {tag(i, TAG_RANK): i for i in find(ec2, config.project, cluster)}
    if not create:
        return [
            host_info(ec2, config, inst, fitted(w, existing[w.rank]), existing[w.rank], region)
            for w in wants
            if w.rank in existing
        ]
    key, _ = ensure_key(ec2, config, region)
    group, subnets = ensure_network(ec2, config, inst)
    # The image is looked up (SSM, describe_images) only when an instance is to be launched, not to reuse some.
    missing = any(w.rank not in existing for w in wants)
    image = resolve_image(ec2, config, inst, region, gpus=shapes[inst.type].gpus) if missing else None
    # A pending one is waited for below with the new ones; only stopping or stopped ones need a start.
    stopped = [
        i["InstanceId"] for w in wants if (i := existing.get(w.rank)) and i["State"]["Name"] in ("stopping", "stopped")
    ]
    if stopped:
        start(ec2, stopped)

    def one(want: Want) -> dict[str, Any]:
        if want.rank in existing:
            log.info("reusing %s for rank %s", existing[want.rank]["InstanceId"], want.rank)
            return existing[want.rank]
        assert image is not None  # looked up above, as this rank was missing
        params = run_params(config, inst, image, key, group, want.rank, cluster)
        instance = launch_instance(ec2, params, [inst.type or "", *inst.fallback_types], subnets, launches, cluster)
        with launches.lock:
            launches.created.append((ec2, instance["InstanceId"]))
        log.info("created %s (%s) for rank %s", instance["InstanceId"], instance["InstanceType"], want.rank)
        return instance

    with ThreadPoolExecutor(max_workers=min(16, len(wants))) as pool:
        launched = list(pool.map(one, wants))
    ids = [i["InstanceId"] for i in launched]
    ec2.get_waiter("instance_running").wait(InstanceIds=ids, WaiterConfig={"Delay": 5, "MaxAttempts": 120})
    described = {i["InstanceId"]: i for i in describe(ec2, ids)}
    fresh = {instance_id for _, instance_id in launches.created}
    hosts = [
        host_info(ec2, config, inst, fitted(w, i), described[i["InstanceId"]], region, i["InstanceId"] in fresh)
        for w, i in zip(wants, launched, strict=True)
    ]
    launches.contacted += hosts
    with ThreadPoolExecutor(max_workers=min(16, len(hosts))) as pool:
        list(pool.map(lambda host: wait_for_ssh(host, launches.connections), hosts))
    return hosts


def replace(config: BatchConfig, lost: HostInfo, name: str, connections: Connections) -> HostInfo:
    """A new instance, host ``name``, in place of a lost one: the same instance type of the config, so the
    same image, disk, market, key, security group and tags, its rank included (a later run finds it as that
    rank). The lost instance, if EC2 still has it (stopped, or running but unreachable), is terminated first:
    one instance per rank, and none billing for a host the batch gave up. Whatever fails, the instance this
    call created is terminated before the error is raised."""
    ec2 = host_client(lost)
    found = describe(ec2, [lost.machine_id or ""])
    rank = tag(found[0], TAG_RANK) if found else None
    index = int(rank.split(".")[0]) if rank and rank.split(".")[0].isdigit() else -1
    if rank is None or not 0 <= index < len(config.instances):
        raise AwsError(f"cannot replace {lost.name}: EC2 has no instance {lost.machine_id} of this config's any more")
    if found[0]["State"]["Name"] in ALIVE:
        ec2.terminate_instances(InstanceIds=[found[0]["InstanceId"]])
        log.info("terminated %s (host %s, lost) to replace it", found[0]["InstanceId"], lost.name)
    launches = Launches(connections)
    try:
        (host,) = provision_type(
            config, index, config.instances[index], True, launches, only=Want(rank, lost.cpus, lost.gpus, name)
        )
    except BaseException:
        launches.undo(config.project)
        raise
    return host


def wait_for_ssh(host: HostInfo, connections: Connections, timeout: float = 600) -> None:
    """Running is not reachable: sshd starts a while after the instance does."""

    deadline = time.monotonic() + timeout
    while True:
        try:
            connections.get(host).run("true", timeout=30)
            return
        except (TransportError, TimeoutError, OSError) as exc:
            if time.monotonic() > deadline:
                msg = f"{host.name} ({host.machine_id}) runs but SSH did not answer in {timeout:.0f}s: {exc}"
                raise AwsError(msg) from exc
            time.sleep(3)
