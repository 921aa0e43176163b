"""``cloudsend prune``: what old batches leave behind, found with its size, and removed only when asked.

On the client (``$CLOUDSEND_HOME``): fetched outputs and logs (``outputs/<batch>/<job key>/``) and Prefect's
persisted task results (``results/``, the cache that lets a rerun skip a finished job). On a host: the
records of ended jobs (``jobs/<batch>/<job key>/``: logs, status, the run directory with its outputs).
An item is old when it has not changed for the given age (a job: since it ended).

Nothing that may still be needed is touched: a host's job that has not ended (running, queued, or never
started) is never listed, nor any job of a batch whose lease is live (a client is running it now). Removing
a job's cached result means a rerun runs it again; removing its stored outputs while its result is kept
makes a rerun run it again too (the flow finds the outputs gone); removing its record on a host loses
nothing the client kept.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cloudsend_prefect.paths import cloudsend_home
from cloudsend_prefect.providers import Connections, HostInfo
from cloudsend_prefect.runtime import HostCommandError, HostRuntime

_AGE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "": 86400}
_REL = re.compile(r"[A-Za-z0-9._-]+/[A-Za-z0-9._-]+")  # <batch>/<job key>, as host.sh names them


def parse_age(text: str) -> float:
    """Seconds from ``30m``, ``12h``, ``7d``, ``2w`` or a plain number of days."""
    match = _AGE.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r}: expected an age like 30m, 12h, 7d or 2w")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass
class Item:
    """One thing prune would remove."""

    where: str  # "client", or the host's name
    kind: str  # "outputs", "result", "job"
    path: str  # on the client: absolute; on a host: <batch>/<job key> under its jobs/
    size: int  # bytes
    age: float  # seconds since it last changed (a host's job: since it ended)


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_symlink() and p.is_file())


def client_items(older_than: float) -> list[Item]:
    """The client's stored outputs and cached results not changed for ``older_than`` seconds."""
    home, now, items = cloudsend_home(), time.time(), []
    outputs = home / "outputs"
    stores = [p for batch in outputs.glob("*") if batch.is_dir() for p in batch.iterdir() if p.is_dir()]
    for path in stores:
        age = now - path.stat().st_mtime
        if age > older_than:
            items.append(Item("client", "outputs", str(path), _tree_size(path), age))
    for path in sorted((home / "results").glob("*")):
        age = now - path.stat().st_mtime
        if path.is_file() and age > older_than:
            items.append(Item("client", "result", str(path), path.stat().st_size, age))
    return items


def _runtime(host: HostInfo, connections: Connections) -> HostRuntime:
    """The host's runtime, its script shipped if this version's is missing (the listing is host.sh's)."""
    runtime = HostRuntime.for_host(host, connections, watching=False)
    runtime.install()
    return runtime


def host_items(host: HostInfo, older_than: float, connections: Connections) -> list[Item]:
    """A host's ended jobs, of batches no client is running, that ended over ``older_than`` seconds ago."""
    try:
        now, rows = _runtime(host, connections).old_jobs(int(older_than // 60))
    except (HostCommandError, ValueError) as exc:
        raise RuntimeError(f"{host.name}: listing its jobs failed: {exc}") from None
    return [Item(host.name, "job", rel, size, now - end) for size, end, rel in rows]


def remove(items: list[Item], hosts: dict[str, HostInfo], connections: Connections) -> int:
    """Remove the items (a host's job only if it has still ended); returns the bytes freed, as listed."""
    freed = 0
    for item in items:
        if item.where == "client":
            path = Path(item.path)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                path.with_name(f"{path.name}.lock").unlink(missing_ok=True)
            else:
                path.unlink(missing_ok=True)
            freed += item.size
    by_host: dict[str, list[Item]] = {}
    for item in items:
        if item.where != "client":
            by_host.setdefault(item.where, []).append(item)
    for name, jobs in by_host.items():
        try:
            _runtime(hosts[name], connections).forget([job.path for job in jobs])
        except HostCommandError as exc:
            raise RuntimeError(f"{name}: removing old jobs failed: {exc}") from None
        freed += sum(job.size for job in jobs)
    return freed
