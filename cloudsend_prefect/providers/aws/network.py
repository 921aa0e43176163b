"""Who may reach the instances: the project's security group, converged to SSH from the caller's CIDRs only,
and the subnets to launch in."""

from __future__ import annotations

import ipaddress
import logging
import urllib.request
from typing import Any

from cloudsend_prefect.config import BatchConfig, InstanceType
from cloudsend_prefect.providers.aws.session import AwsError, EC2Client, error_code
from cloudsend_prefect.providers.aws.tags import TAG_PROJECT

log = logging.getLogger("cloudsend.aws")


def my_cidrs(config: BatchConfig) -> list[str]:
    """Who may reach SSH: the configured CIDRs (a bare address is a /32), else this machine's public
    address as a /32."""
    if not config.ssh_from:
        with urllib.request.urlopen("https://checkip.amazonaws.com", timeout=10) as resp:
            return [str(ipaddress.ip_network(resp.read().decode().strip()))]
    cidrs = []
    for cidr in config.ssh_from:
        try:
            cidrs.append(str(ipaddress.ip_network(cidr.strip(), strict=False)))
        except ValueError:
            raise AwsError(f"ssh_from: {cidr!r} is not an address or CIDR block (like 203.0.113.5/32)") from None
    return cidrs


SSH_PORT = 22


def _ssh_cidr(permission: dict[str, Any], cidr: str, wanted: set[str]) -> str | None:
    """The requested CIDR this range of ``permission`` is, when the rule is exactly TCP 22 from it; else None."""
    if permission.get("IpProtocol") not in ("tcp", "6"):
        return None
    if (permission.get("FromPort"), permission.get("ToPort")) != (SSH_PORT, SSH_PORT):
        return None
    try:
        network = str(ipaddress.ip_network(cidr, strict=False))  # EC2 may spell an IPv6 block differently
    except ValueError:
        return None
    return network if network in wanted else None


def _stale_ingress(permissions: list[dict[str, Any]], wanted: set[str]) -> tuple[list[dict[str, Any]], set[str]]:
    """Split a group's ingress into rules to revoke (one source each, as RevokeSecurityGroupIngress takes
    them) and the requested CIDRs already let in. Anything but TCP 22 from a requested CIDR is stale: other
    ports or protocols, other CIDRs (IPv4 or IPv6), other groups, prefix lists."""
    stale: list[dict[str, Any]] = []
    present: set[str] = set()
    for permission in permissions:
        base: dict[str, Any] = {k: permission[k] for k in ("IpProtocol", "FromPort", "ToPort") if k in permission}
        for ranges, address in (("IpRanges", "CidrIp"), ("Ipv6Ranges", "CidrIpv6")):
            for entry in permission.get(ranges) or []:
                cidr = _ssh_cidr(permission, entry[address], wanted)
                if cidr is None:
                    stale.append({**base, ranges: [{address: entry[address]}]})
                else:
                    present.add(cidr)
        for pair in permission.get("UserIdGroupPairs") or []:
            source = {k: pair[k] for k in ("GroupId", "UserId") if k in pair} or {"GroupName": pair["GroupName"]}
            stale.append({**base, "UserIdGroupPairs": [source]})
        for prefix in permission.get("PrefixListIds") or []:
            stale.append({**base, "PrefixListIds": [{"PrefixListId": prefix["PrefixListId"]}]})
    return stale, present


def _describe_rule(permission: dict[str, Any]) -> str:
    """A rule for the log: ``tcp 80 from 0.0.0.0/0``."""
    ports = (permission.get("FromPort"), permission.get("ToPort"))
    port = "" if ports == (None, None) else f" {ports[0]}" if ports[0] == ports[1] else f" {ports[0]}-{ports[1]}"
    protocol = "all traffic" if permission["IpProtocol"] == "-1" else permission["IpProtocol"]
    sources = [
        *(r["CidrIp"] for r in permission.get("IpRanges", [])),
        *(r["CidrIpv6"] for r in permission.get("Ipv6Ranges", [])),
        *(p.get("GroupId") or p.get("GroupName", "?") for p in permission.get("UserIdGroupPairs", [])),
        *(p["PrefixListId"] for p in permission.get("PrefixListIds", [])),
    ]
    return f"{protocol}{port} from {', '.join(sources)}"


def _converge_ingress(ec2: EC2Client, group: str, permissions: list[dict[str, Any]], cidrs: list[str]) -> None:
    """Make the group's ingress exactly TCP 22 from ``cidrs``, whatever it held before.

    A reused group keeps what an earlier run (``ssh_from: [0.0.0.0/0]``, an address since given up) or a
    person added by hand; adding the requested rules alone would leave that open for ever. The missing rules
    are added before the stale ones go, so a batch still running from a requested address never loses SSH.
    Another run converging the same group at once only makes these calls find their work done (Duplicate,
    NotFound), which is not an error.
    """
    wanted = set(cidrs)
    stale, present = _stale_ingress(permissions, wanted)
    for cidr in cidrs:
        if cidr in present:
            continue
        ranges, address = ("Ipv6Ranges", "CidrIpv6") if ":" in cidr else ("IpRanges", "CidrIp")
        rule = {"IpProtocol": "tcp", "FromPort": SSH_PORT, "ToPort": SSH_PORT}
        try:  # one rule per CIDR: a rule already there (Duplicate) must not keep the others out
            ec2.authorize_security_group_ingress(
                GroupId=group, IpPermissions=[{**rule, ranges: [{address: cidr, "Description": "cloudsend client"}]}]
            )
            log.info("security group %s: let in SSH from %s", group, cidr)
        except Exception as exc:
            if error_code(exc) != "InvalidPermission.Duplicate":
                raise
    for permission in stale:
        try:  # one call per rule: a rule someone else already removed must not keep the others in
            answer = ec2.revoke_security_group_ingress(GroupId=group, IpPermissions=[permission])
        except Exception as exc:
            if error_code(exc) != "InvalidPermission.NotFound":
                raise
            continue
        if not answer.get("UnknownIpPermissions"):  # EC2 may answer a vanished rule with this instead of NotFound
            log.warning(
                "security group %s: revoked %s (only TCP 22 from %s is let in)",
                group,
                _describe_rule(permission),
                ", ".join(cidrs),
            )


def ensure_network(ec2: EC2Client, config: BatchConfig, inst: InstanceType) -> tuple[str, list[str]]:
    """The project's security group, converged to SSH from ``my_cidrs`` only, and the subnets to try, in order."""
    if inst.cloud_id:
        vpc = inst.cloud_id
    else:
        vpcs = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise AwsError("no default VPC in this region: set `cloud_id` to the VPC to use")
        vpc = vpcs[0]["VpcId"]
    name = f"cloudsend-{config.project}"
    groups = ec2.describe_security_groups(
        Filters=[{"Name": "group-name", "Values": [name]}, {"Name": "vpc-id", "Values": [vpc]}]
    )["SecurityGroups"]
    permissions: list[dict[str, Any]] = []
    if groups:
        group = groups[0]["GroupId"]
        permissions = list(groups[0].get("IpPermissions") or [])
    else:
        group = ec2.create_security_group(
            GroupName=name,
            Description=f"cloudsend project {config.project}: SSH from the client only",
            VpcId=vpc,
            TagSpecifications=[
                {"ResourceType": "security-group", "Tags": [{"Key": TAG_PROJECT, "Value": config.project}]}
            ],
        )["GroupId"]
    _converge_ingress(ec2, group, permissions, my_cidrs(config))
    subnets = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"]
    by_zone = {s["AvailabilityZone"]: s["SubnetId"] for s in sorted(subnets, key=lambda s: not s.get("DefaultForAz"))}
    if inst.zones:
        missing = [z for z in inst.zones if z not in by_zone]
        if missing:
            raise AwsError(f"no subnet of VPC {vpc} in zone(s) {', '.join(missing)} (zones: {', '.join(by_zone)})")
        return group, [by_zone[z] for z in inst.zones]
    if not by_zone:
        raise AwsError(f"VPC {vpc} has no subnet")
    return group, [next(iter(by_zone.values()))]
