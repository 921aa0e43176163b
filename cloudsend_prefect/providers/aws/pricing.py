"""What EC2 instances are and cost: the packaged catalog of instance types (read offline, so planning never needs
AWS) and spot prices from EC2. The catalog's prices are us-east-1 Linux on-demand list prices, approximate and
dated (see the file's header); other regions differ, and EBS volumes, data transfer and public IPv4 addresses
are not counted."""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Protocol

from cloudsend_prefect.providers.aws.hosts import AwsHost, data_client
from cloudsend_prefect.providers.costs import Price, Quote

CATALOG_REGION = "us-east-1"


@dataclass(frozen=True)
class InstanceInfo:
    """One instance type as the catalog knows it (price: us-east-1, Linux, on-demand, USD per hour)."""

    type: str
    vcpus: int
    memory_gib: float
    gpus: int
    on_demand: float


@cache
def catalog() -> dict[str, InstanceInfo]:
    """Every instance type in the packaged catalog, by name (read once)."""
    text = resources.files("cloudsend_prefect").joinpath("data/aws_instance_types.csv").read_text()
    rows = csv.DictReader(line for line in text.splitlines() if line.strip() and not line.startswith("#"))
    return {
        row["type"]: InstanceInfo(
            type=row["type"],
            vcpus=int(row["vcpus"]),
            memory_gib=float(row["memory_gib"]),
            gpus=int(row["gpus"]),
            on_demand=float(row["on_demand_usd_per_hour"]),
        )
        for row in rows
    }


def instance_info(instance_type: str | None) -> InstanceInfo | None:
    """The catalog's entry for a type, or None when it is not in the catalog (EC2 knows it at provisioning)."""
    return catalog().get(instance_type or "")


def on_demand_price(instance_type: str | None) -> float | None:
    """The catalog's us-east-1 on-demand USD per hour, or None for an unknown type. Other regions are somewhat
    dearer: AWS's Pricing API would be exact, but needs credentials and network, and planning works offline."""
    info = instance_info(instance_type)
    return info.on_demand if info else None


def spot_price(ec2: Any, instance_type: str, zone: str | None = None) -> float | None:
    """The current Linux/UNIX spot price of a type from ``describe_spot_price_history``, or None on any error.

    In ``zone`` when given; otherwise the highest current price over the region's zones, an upper bound for
    wherever the instance lands. ``StartTime=now`` makes EC2 return only the price in effect now, per zone.
    """
    try:
        params: dict[str, Any] = {
            "InstanceTypes": [instance_type],
            "ProductDescriptions": ["Linux/UNIX", "Linux/UNIX (Amazon VPC)"],
            "StartTime": dt.datetime.now(dt.UTC),
        }
        if zone:
            params["AvailabilityZone"] = zone
        latest: dict[str, tuple[Any, float]] = {}  # zone -> (timestamp, price)
        pages = ec2.get_paginator("describe_spot_price_history").paginate(**params, PaginationConfig={"MaxItems": 1000})
        for page in pages:
            for item in page.get("SpotPriceHistory", []):
                if item.get("InstanceType") != instance_type:
                    continue
                az, stamp, price = item.get("AvailabilityZone", ""), item.get("Timestamp"), float(item["SpotPrice"])
                if az not in latest or (stamp is not None and stamp > latest[az][0]):
                    latest[az] = (stamp, price)
        return max(price for _, price in latest.values()) if latest else None
    except Exception:  # no permission, no network, throttled, odd answer: the caller falls back to the catalog
        return None


def offline_price(data: AwsHost) -> Price:
    """A host's price without asking AWS: the catalog's on-demand price.

    A spot host's price is not known offline: ``max_bid`` (what the user agreed to pay at most) when given,
    else the on-demand price, which spot never exceeds in practice. Both are upper bounds.
    """
    on_demand = on_demand_price(data.instance_type)
    where = "" if data.region in (None, CATALOG_REGION) else f", {CATALOG_REGION} price"
    if data.spot and data.max_bid is not None:
        return Price(data.max_bid, "spot: max_bid (upper bound)")
    if on_demand is None:
        return Price(None, f"{data.instance_type or 'no type'}: not in the catalog")
    if data.spot:
        return Price(on_demand, f"spot: on-demand price as upper bound (catalog{where})")
    return Price(on_demand, f"on-demand (catalog{where})")


class Priced(Protocol):
    """What pricing needs of a host: a provisioned ``HostInfo`` or a ``PlannedHost``."""

    @property
    def name(self) -> str:
        """The host's name: quotes are keyed by it."""
        ...

    @property
    def machine_id(self) -> str | None:
        """The instance's id once it exists (``None`` for a planned host)."""
        ...

    @property
    def provider_data(self) -> dict[str, Any]:
        """The aws facts pricing reads: type, region, spot, ``max_bid``."""
        ...


def quote(hosts: Sequence[Priced], *, live: bool) -> tuple[dict[str, Quote], list[str]]:
    """The hosts' quotes by name, and notes for the user on them. Offline: the catalog (and ``max_bid``); with
    ``live``, spot hosts at EC2's current spot price (one call per region and type), where EC2 answers."""
    found: dict[tuple[str | None, str], float | None] = {}
    quotes, missed, regions = {}, set(), set()
    for host in hosts:
        data = AwsHost.model_validate(host.provider_data)
        price = offline_price(data)
        regions.add(data.region)
        if live and data.spot and data.instance_type:
            key = (data.region, data.instance_type)
            if key not in found:
                try:
                    found[key] = spot_price(data_client(data), data.instance_type)
                except Exception:
                    found[key] = None
            spot = found[key]
            if spot is not None:
                price = Price(spot, "spot: current price from EC2 (highest zone)")
            else:
                missed.add(data.instance_type)
        info = instance_info(data.instance_type)
        quotes[host.name] = Quote(
            host=host.name,
            provider="aws",
            billed=True,
            kind=data.instance_type,
            machine_id=host.machine_id,
            market="spot" if data.spot else "on-demand",
            price=price,
            vcpus=info.vcpus if info else None,
            memory_gib=info.memory_gib if info else None,
        )
    notes = [f"no spot price from EC2 for {', '.join(sorted(missed))}: offline price used"] if missed else []
    others = regions - {CATALOG_REGION}
    if quotes and others:
        where = ", ".join(sorted(r or "the default region" for r in others))
        notes.append(f"catalog prices are {CATALOG_REGION} list prices; {where} may differ")
    return quotes, notes
