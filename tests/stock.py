"""A "stock host": an sshd host whose commands see the software of a fresh Ubuntu or Debian cloud image.

Such images ship Debian's ``python3`` without the ``python3-venv`` package and without pip, and no uv:
``python3 -m venv`` fails (no ``ensurepip``), ``python3 -m pip`` says "No module named pip". The stand-in is
Debian's own interpreter, not a mock of one: its binary copied into a directory whose ``lib/python3.X`` links to
each entry of the real standard library except ``ensurepip`` (the part python3-venv installs), so Python takes
that directory as its prefix, finds no ``dist-packages`` (where Debian's pip lives), and Debian's own patched
``venv`` module prints Debian's own message. The host's PATH starts with it and holds no uv.

Extra stand-ins (``uname``, ``id``, ``sudo``) make the same host look like another architecture, or like a login
without root or sudo, for the paths where the client cannot help.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

DEBIAN_PYTHON = Path("/usr/bin/python3")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # sshd's default: no uv there
# This machine's way to the package registries (a TLS-inspecting gateway's CA, proxies), which a host that is
# this machine needs too; an EC2 host reaches them directly.
_REGISTRY_VARIABLES = ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "PIP_CERT")


def host_env(*bin_dirs: Path) -> dict[str, str]:
    """A host's environment: ``bin_dirs`` in front of the system's PATH, and this machine's registry settings."""
    env = {k: v for k, v in os.environ.items() if k in _REGISTRY_VARIABLES or k.lower().endswith("_proxy")}
    return {**env, "PATH": ":".join([*map(str, bin_dirs), SYSTEM_PATH])}


def debian_python() -> tuple[Path, str, Path]:
    """Debian's own interpreter: its binary, its version (``3.11``) and its standard library's directory."""
    if not DEBIAN_PYTHON.is_file():
        pytest.fail(f"{DEBIAN_PYTHON} is missing: run `apt-get install python3` (the stock-host tests use it)")
    probe = "import sys, sysconfig; print(sys.version_info[0], sys.version_info[1], sysconfig.get_path('stdlib'))"
    major, minor, stdlib = subprocess.run(
        [str(DEBIAN_PYTHON), "-I", "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split()
    return Path(os.path.realpath(DEBIAN_PYTHON)), f"{major}.{minor}", Path(stdlib)


def stock_python(root: Path) -> Path:
    """A bin directory whose ``python3`` behaves as on a stock Debian or Ubuntu image (see the module doc)."""
    binary, version, stdlib = debian_python()
    bin_dir, lib = root / "bin", root / "lib" / f"python{version}"
    bin_dir.mkdir(parents=True)
    lib.mkdir(parents=True)
    shutil.copy2(binary, bin_dir / f"python{version}")  # a copy: Python finds its prefix from where it runs
    (bin_dir / "python3").symlink_to(f"python{version}")
    for entry in stdlib.iterdir():
        if entry.name != "ensurepip":
            (lib / entry.name).symlink_to(entry)
    return bin_dir


def stand_in(bin_dir: Path, name: str, script: str) -> None:
    """An executable ``name`` in ``bin_dir`` running the sh ``script``."""
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


def other_machine(bin_dir: Path) -> None:
    """Make the host say it is an aarch64 machine whose login user is not root and has no sudo."""
    stand_in(bin_dir, "uname", 'case "$1" in -m) echo aarch64 ;; *) exec /bin/uname "$@" ;; esac\n')
    stand_in(bin_dir, "id", 'case "$1" in -u) echo 1000 ;; *) exec /usr/bin/id "$@" ;; esac\n')
    stand_in(bin_dir, "sudo", 'echo "sudo: a password is required" >&2\nexit 1\n')
