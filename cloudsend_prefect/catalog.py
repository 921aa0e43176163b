"""What EC2 instances are and what they cost: a packaged catalog of instance types, spot prices from EC2, and the
cost arithmetic used by ``cloudsend plan`` (an estimate before anything exists) and by the flow (a report after
teardown).

The catalog (``data/aws_instance_types.csv``) is read offline, so planning never needs AWS. Its prices are
us-east-1 Linux on-demand list prices, approximate and dated (see the file's header): other regions differ, and
EBS volumes, data transfer and public IPv4 addresses are not counted. EC2 bills Linux instances per second
with a 60 s minimum per start, which is how hours are billed here. Nothing here imports Prefect or boto3.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from cloudsend_prefect.providers.base import HostInfo

CATALOG_REGION = "us-east-1"
MIN_BILLED_SECONDS = 60.0
OWN_MACHINE = "own machine"


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


def on_demand_price(instance_type: str | None, region: str | None = None) -> float | None:
    """On-demand USD per hour from the catalog, or None for an unknown type.

    The catalog holds us-east-1 prices only: for any other ``region`` this is the us-east-1 price, a guide
    rather than a quote (most regions are somewhat dearer). AWS's Pricing API would be exact but needs
    credentials and network, and planning must work offline.
    """
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


def billed_hours(seconds: float) -> float:
    """EC2 (Linux) billing: per second, at least 60 s per instance start."""
    return max(seconds, MIN_BILLED_SECONDS) / 3600


# -- prices and estimates -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Price:
    """USD per hour of one host (None when unknown) and where that figure comes from, for the user to judge."""

    usd_per_hour: float | None
    basis: str


class Billable(Protocol):
    """What a cost row needs of a host: a provisioned ``HostInfo`` or a host ``cloudsend plan`` expects."""

    @property
    def name(self) -> str: ...
    @property
    def provider(self) -> str: ...
    @property
    def instance_type(self) -> str | None: ...
    @property
    def spot(self) -> bool: ...
    @property
    def region(self) -> str | None: ...
    @property
    def instance_id(self) -> str | None: ...


def offline_price(host: Billable, max_bid: float | None = None) -> Price:
    """A host's price without asking AWS: free for local/ssh machines, the catalog's on-demand price for aws.

    A spot host's price is not known offline: ``max_bid`` (what the user agreed to pay at most) when given,
    else the on-demand price, which spot never exceeds in practice. Both are upper bounds.
    """
    if host.provider != "aws":
        return Price(0.0, OWN_MACHINE)
    on_demand = on_demand_price(host.instance_type, host.region)
    where = "" if host.region in (None, CATALOG_REGION) else f", {CATALOG_REGION} price"
    if host.spot and max_bid is not None:
        return Price(max_bid, "spot: max_bid (upper bound)")
    if on_demand is None:
        return Price(None, f"{host.instance_type or 'no type'}: not in the catalog")
    if host.spot:
        return Price(on_demand, f"spot: on-demand price as upper bound (catalog{where})")
    return Price(on_demand, f"on-demand (catalog{where})")


@dataclass(frozen=True)
class CostRow:
    host: str
    provider: str
    instance_type: str | None
    instance_id: str | None
    market: str  # "spot", "on-demand" or "own machine"
    hours: float  # billed hours (0 for own machines)
    usd_per_hour: float | None
    cost: float | None  # None when the price is unknown
    basis: str


@dataclass(frozen=True)
class Estimate:
    rows: list[CostRow]
    total: float  # of the rows whose price is known
    complete: bool  # every aws row had a price

    @property
    def aws_rows(self) -> list[CostRow]:
        return [row for row in self.rows if row.provider == "aws"]


def estimate(
    hosts: Iterable[Billable], seconds: float | Mapping[str, float], prices: Mapping[str, Price] | None = None
) -> Estimate:
    """What ``hosts`` cost when each is up for ``seconds`` (the same for all, or each host's by name): price
    times billed hours (per second, 60 s minimum).

    ``prices`` overrides a host's offline price by host name (live spot prices, ``max_bid``).
    """
    rows = []
    for host in hosts:
        price = (prices or {}).get(host.name) or offline_price(host)
        aws = host.provider == "aws"
        up = seconds[host.name] if isinstance(seconds, Mapping) else seconds
        hours = billed_hours(up) if aws else 0.0
        cost = None if price.usd_per_hour is None else price.usd_per_hour * hours
        market = ("spot" if host.spot else "on-demand") if aws else OWN_MACHINE
        rows.append(
            CostRow(
                host=host.name,
                provider=host.provider,
                instance_type=host.instance_type,
                instance_id=host.instance_id,
                market=market,
                hours=hours,
                usd_per_hour=price.usd_per_hour,
                cost=cost,
                basis=price.basis,
            )
        )
    total = math.fsum(row.cost for row in rows if row.cost is not None)
    return Estimate(rows, total, complete=all(row.cost is not None for row in rows))


def live_spot_prices(hosts: Sequence[Billable], client: Any) -> dict[str, Price]:
    """Current spot prices of the spot hosts, by host name; hosts whose price EC2 did not give are left out.

    ``client(host)`` returns an EC2 client for the host's region (it may raise); one call per (region, type).
    """
    found: dict[tuple[str | None, str], float | None] = {}
    prices = {}
    for host in hosts:
        if host.provider != "aws" or not host.spot or not host.instance_type:
            continue
        key = (host.region, host.instance_type)
        if key not in found:
            try:
                found[key] = spot_price(client(host), host.instance_type)
            except Exception:
                found[key] = None
        if found[key] is not None:
            prices[host.name] = Price(found[key], "spot: current price from EC2 (highest zone)")
    return prices


def cost_report(hosts: Sequence[HostInfo], seconds: float | Mapping[str, float]) -> Estimate | None:
    """The flow's end-of-batch report: what the batch's aws hosts cost while the batch had them up.

    ``seconds``: how long each host was up for the batch, by name (or one figure for all): from provisioning
    (a replacement: from its launch) to its stop, early or at teardown; an upper bound, as EC2 starts billing
    once an instance runs (a reused instance that was already running is billed from this batch's provisioning
    only). Spot hosts are priced at EC2's current spot price when it answers, else at the catalog's on-demand
    price. None when there is no aws host.
    """
    aws_hosts = [h for h in hosts if h.provider == "aws"]
    if not aws_hosts:
        return None
    from cloudsend_prefect.providers.aws import ec2_client

    def client(host: HostInfo) -> Any:
        return ec2_client(host.region, credentials=host.aws_credentials, profile=host.aws_profile)

    return estimate(aws_hosts, seconds, live_spot_prices(aws_hosts, client))


def cost_line(report: Estimate) -> str:
    """One log line: total and per-host cost."""
    hosts = ", ".join(
        f"{r.host} ({r.instance_id or '-'}, {r.instance_type or '?'} {r.market}, {r.hours:.3f} h: "
        f"{usd(r.cost) if r.cost is not None else 'price unknown'})"
        for r in report.aws_rows
    )
    unknown = "" if report.complete else " (some prices unknown: not counted)"
    return (
        f"cost: {usd(report.total)}{unknown} for {len(report.aws_rows)} instance(s), billed time an upper bound "
        f"(from provisioning or launch to stop): {hosts}"
    )


def usd(amount: float) -> str:
    """Dollars with the precision small amounts need."""
    if amount >= 10:
        return f"${amount:,.2f}"
    return f"${amount:.4f}" if amount >= 0.01 or amount == 0 else f"${amount:.6f}"
