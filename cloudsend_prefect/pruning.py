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
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cloudsend_prefect.paths import cloudsend_home
from cloudsend_prefect.providers import Connections, HostInfo

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


def _q(path: str) -> str:
    """A host path for a shell line: a leading ``~/`` stays outside the quotes (the shell expands it)."""
    return "~/" + shlex.quote(path[2:]) if path.startswith("~/") else shlex.quote(path)


# Lists <size KiB> <end epoch> <batch>/<key> of every ended job whose end is older than the cutoff, skipping
# batches whose lease is live; the host's clock decides both. $1: base dir, $2: minutes.
_LIST = r"""
base=$1 min=$2
now=$(mktemp) || exit 1
date +%s
for d in "$base"/jobs/*/*; do
    [ -f "$d/end" ] || continue
    b=${d%/*}; b=${b##*/}
    # shellcheck disable=SC3013 # -nt: in every sh host.sh runs on (it relies on it for leases too)
    if [ -f "$base/leases/$b" ] && [ "$base/leases/$b" -nt "$now" ]; then continue; fi
    [ -n "$(find "$d/end" -mmin +"$min" 2>/dev/null)" ] || continue
    read -r e <"$d/end" || e=0
    printf '%s %s %s\n' "$(du -sk "$d" | cut -f1)" "${e%%.*}" "${d#"$base"/jobs/}"
done
rm -f "$now"
"""


def host_items(host: HostInfo, older_than: float, connections: Connections) -> list[Item]:
    """A host's ended jobs, of batches no client is running, that ended over ``older_than`` seconds ago."""
    minutes = max(0, int(older_than // 60))
    line = f"sh -c {shlex.quote(_LIST)} prune {_q(host.base_dir.rstrip('/'))} {minutes}"
    result = connections.get(host).run(line, timeout=300)
    lines = result.stdout.splitlines()
    if result.exit_code != 0 or not lines:
        raise RuntimeError(f"{host.name}: listing its jobs failed ({result.exit_code}): {result.stderr.strip()}")
    now, items = float(lines[0]), []
    for row in lines[1:]:
        size, end, rel = row.split(" ", 2)
        if _REL.fullmatch(rel):  # anything else is not a job record of host.sh's: left alone
            items.append(Item(host.name, "job", rel, int(size) * 1024, now - int(end)))
    return items


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
        host = hosts[name]
        base = _q(host.base_dir.rstrip("/"))
        steps = []
        for job in jobs:
            assert _REL.fullmatch(job.path)  # checked when listed: no shell word can hide in it
            d = f"{base}/jobs/{shlex.quote(job.path)}"
            steps.append(f"if [ -f {d}/end ]; then rm -rf {d}; fi")
        batches = sorted({job.path.split("/")[0] for job in jobs})
        steps += [f"rmdir {base}/jobs/{shlex.quote(b)} 2>/dev/null" for b in batches]  # (only if now empty)
        result = connections.get(host).run("; ".join(steps) + "; true", timeout=600)
        if result.exit_code != 0:
            raise RuntimeError(f"{name}: removing old jobs failed ({result.exit_code}): {result.stderr.strip()}")
        freed += sum(job.size for job in jobs)
    return freed
