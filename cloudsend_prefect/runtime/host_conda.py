"""Build a conda environment on a host with rattler: run there by ``host.sh`` (never imported by the client).

    python host_conda.py ENV_DIR PREFIX CACHE_DIR

ENV_DIR holds what the client sent: ``conda.txt`` (one match spec a line) or ``environment.yml``, and
``conda-channels.txt`` (one channel a line: a name such as ``conda-forge``, or a URL, ``file://`` included).
The environment is solved for this host's platform and its virtual packages (glibc, CUDA...) and installed at
PREFIX; downloaded packages are kept in CACHE_DIR for the host's other environments. The ``pip:`` section of an
environment.yml is written to ``ENV_DIR/pip.txt``, which ``host.sh`` installs into the environment's python.

Why rattler (``py-rattler`` from PyPI) rather than conda or micromamba: it is a real conda solver (resolvo) and
installer that comes from PyPI into a small venv the host makes anyway for pip environments, so nothing is
downloaded from outside a package registry to get it, no base environment or shell hook is installed, and the
same code runs on every host. micromamba on a host is not used even where present: one tested path, not two.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import rattler
import yaml

DEFAULT_CHANNELS = ["conda-forge"]
# conda's meaning of the `defaults` channel on Linux, which rattler does not know by that name.
DEFAULTS = ["https://repo.anaconda.com/pkgs/main", "https://repo.anaconda.com/pkgs/r"]


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def read_spec(env_dir: Path) -> tuple[list[str], list[str], list[str]]:
    """The match specs, channels and pip requirements the environment is made of."""
    channels = _lines(env_dir / "conda-channels.txt")
    specs = _lines(env_dir / "conda.txt")
    pip: list[str] = []
    yml = env_dir / "environment.yml"
    if yml.is_file():
        doc = yaml.safe_load(yml.read_text()) or {}
        if not isinstance(doc, dict):
            raise SystemExit("environment.yml: expected a mapping with `dependencies` (and `channels`)")
        channels = [*channels, *(str(c) for c in doc.get("channels") or [])]
        for dep in doc.get("dependencies") or []:
            if isinstance(dep, dict) and "pip" in dep:
                pip += [str(p) for p in dep["pip"] or []]
            elif isinstance(dep, str):
                specs.append(dep)
            else:
                raise SystemExit(f"environment.yml: dependencies: cannot read {dep!r} (a match spec or `pip:` list)")
    if not specs:
        raise SystemExit("no conda packages: env_conda names none")
    expanded = [c for name in channels or DEFAULT_CHANNELS for c in (DEFAULTS if name == "defaults" else [name])]
    return specs, list(dict.fromkeys(expanded)), pip


async def build(env_dir: Path, prefix: Path, cache: Path) -> None:
    """Solve the environment's conda packages and install them into ``prefix`` (packages cached in ``cache``);
    its pip packages are left in ``pip.txt`` for host.sh to install with uv into the same prefix."""
    specs, channels, pip = read_spec(env_dir)
    platform = rattler.Subdir.current()
    print(f"solving {' '.join(specs)} for {platform} from {' '.join(channels)}", flush=True)
    records = await rattler.solve(
        [rattler.Channel(c) for c in channels],
        specs,
        platforms=[platform, rattler.Subdir("noarch")],
        virtual_packages=rattler.VirtualPackage.detect(),
    )
    for record in records:
        print(f"  {record.name.normalized} {record.version} {record.build} ({record.channel})", flush=True)
    await rattler.install(records, prefix, cache_dir=cache, show_progress=False)
    if pip:
        (env_dir / "pip.txt").write_text("".join(f"{p}\n" for p in pip))


def main() -> None:
    """Entry point on the host: ``python3 host_conda.py ENV_DIR PREFIX CACHE``; a failure is one line on stderr
    and exit status 1, which host.sh records as the environment's failure."""
    env_dir, prefix, cache = (Path(arg).resolve() for arg in sys.argv[1:4])
    try:
        asyncio.run(build(env_dir, prefix, cache))
    except Exception as exc:  # the solver's and installer's errors are the build's message: no traceback
        print(f"conda environment failed: {exc}", file=sys.stderr, flush=True)
        os._exit(1)
    # Not a normal exit: rattler's worker threads may still hold the GIL's thread state while the interpreter
    # finalizes, which aborts it ("PyGILState_Release ... finalizing") after the work is done and written.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
