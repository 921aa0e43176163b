"""What hosts cost, whatever their provider: a provider prices each host (a ``Quote``); this module turns quotes
and up times into cost rows, totals and the log line. Cloud machines are billed per second with a 60 s minimum
per start (EC2's rule for Linux, which is how hours are billed here); the user's own machines cost nothing."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

MIN_BILLED_SECONDS = 60.0
OWN_MACHINE = "own machine"


@dataclass(frozen=True)
class Price:
    """USD per hour of one host (None when unknown) and where that figure comes from, for the user to judge."""

    usd_per_hour: float | None
    basis: str


@dataclass(frozen=True)
class Quote:
    """One host as its provider prices it: what it is, its market and its price per hour."""

    host: str
    provider: str
    billed: bool  # a cloud bills it (False: the user's own machine, free here)
    kind: str | None  # the machine type (an EC2 instance type)
    machine_id: str | None  # None before it exists
    market: str  # "spot", "on-demand" or "own machine"
    price: Price
    vcpus: int | None = None  # of the machine type, when the provider knows it offline
    memory_gib: float | None = None


def own_machine(host: str, provider: str) -> Quote:
    """The quote of a user's own machine (local, ssh): no charge."""
    return Quote(host, provider, False, None, None, OWN_MACHINE, Price(0.0, OWN_MACHINE))


def billed_hours(seconds: float) -> float:
    """Per second, at least 60 s per machine start."""
    return max(seconds, MIN_BILLED_SECONDS) / 3600


@dataclass(frozen=True)
class CostRow:
    """One host's cost: its price times its billed hours (0 hours for own machines)."""

    host: str
    provider: str
    kind: str | None  # the machine type (an EC2 instance type)
    machine_id: str | None
    market: str  # "spot", "on-demand" or "own machine"
    hours: float  # billed hours (0 for own machines)
    usd_per_hour: float | None
    cost: float | None  # None when the price is unknown
    basis: str


@dataclass(frozen=True)
class Estimate:
    """Cost rows and their total."""

    rows: list[CostRow]
    total: float  # of the rows whose price is known
    complete: bool  # every row had a price

    @property
    def billed_rows(self) -> list[CostRow]:
        """The rows of machines a cloud bills."""
        return [row for row in self.rows if row.market != OWN_MACHINE]


def estimate(quotes: Iterable[Quote], seconds: float | Mapping[str, float]) -> Estimate:
    """What the quoted hosts cost when each is up for ``seconds`` (the same for all, or each host's by name):
    price times billed hours (per second, 60 s minimum)."""
    rows = []
    for quote in quotes:
        up = seconds[quote.host] if isinstance(seconds, Mapping) else seconds
        hours = billed_hours(up) if quote.billed else 0.0
        price = quote.price
        rows.append(
            CostRow(
                host=quote.host,
                provider=quote.provider,
                kind=quote.kind,
                machine_id=quote.machine_id,
                market=quote.market,
                hours=hours,
                usd_per_hour=price.usd_per_hour,
                cost=None if price.usd_per_hour is None else price.usd_per_hour * hours,
                basis=price.basis,
            )
        )
    total = math.fsum(row.cost for row in rows if row.cost is not None)
    return Estimate(rows, total, complete=all(row.cost is not None for row in rows))


def cost_line(report: Estimate) -> str:
    """One log line: total and per-host cost."""
    hosts = ", ".join(
        f"{r.host} ({r.machine_id or '-'}, {r.kind or '?'} {r.market}, {r.hours:.3f} h: "
        f"{usd(r.cost) if r.cost is not None else 'price unknown'})"
        for r in report.billed_rows
    )
    unknown = "" if report.complete else " (some prices unknown: not counted)"
    return (
        f"cost: {usd(report.total)}{unknown} for {len(report.billed_rows)} instance(s), billed time an upper bound "
        f"(from provisioning or launch to stop): {hosts}"
    )


def usd(amount: float) -> str:
    """Dollars with the precision small amounts need."""
    if amount >= 10:
        return f"${amount:,.2f}"
    return f"${amount:.4f}" if amount >= 0.01 or amount == 0 else f"${amount:.6f}"
