"""Content hashes that name environments and jobs, stable across machines.

Both are SHA-256 (hex) of canonical JSON (``json.dumps`` with sorted keys, ``(",", ":")`` separators, UTF-8)
in which every file is represented by its content, or by its path relative to the config's directory and the
SHA-256 of its bytes, so moving the project or cloning it elsewhere keeps the hashes, while editing any file
changes them. Absolute paths, mtimes, user and host names never enter a hash.

Environment hash (``specs.resolve_env``): ``digest`` of the files the host builds the environment from,
``{file name: text}``: ``requirements.txt`` (``env_pypi`` list, or the text of the file it names, directly or
as a folder holding it), ``environment.yml`` (``env_conda`` file or folder) or ``conda.txt`` (list),
``conda-channels.txt``, ``apt.txt``, ``julia.txt`` (``env_julia`` list) or ``Project.toml`` and
``Manifest.toml`` (a Julia project, its manifest when it has one), and ``setup.sh`` (``command``: the script's
text, or the inline commands). The environment's ``name`` is not part of it: renaming an environment reuses
what hosts already built; so does moving a file into a folder named instead.

Job hash (``specs.expand_jobs``): ``digest`` of ``{"command": the shell line (interpreter, script path, args),
"env": the environment hash or null, "files": sorted [relative path, SHA-256 of contents] of the script,
uploads and inputs, "outputs": sorted output paths}``. An edited script, upload or input is a new job; an
unchanged one keeps its hash, so a finished run is reused. Copies from ``repeat`` share the hash and are told
apart by their key (``<hash[:16]>-<n>``).
"""

from __future__ import annotations

import hashlib
import json
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

# A file modified this recently may be edited again within the filesystem's timestamp granularity without its
# mtime changing, so it is always read (git's "racily clean" rule).
_RACY_NS = 2_000_000_000


def digest(obj: Any) -> str:
    """SHA-256 (hex) of ``obj`` as canonical JSON: the one function environment and job hashes go through.

    Args:
        obj: JSON-serialisable data in which files are already represented by content or relative path and
            digest (never an absolute path or a time), so the hash is the same on every machine.

    Returns:
        64 hex digits.
    """
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of the file's bytes; cached by (path, mtime, size, inode) for files not modified just now."""
    resolved = str(path.resolve())
    stat = path.stat()
    if time.time_ns() - stat.st_mtime_ns < _RACY_NS:
        return _read_digest(resolved)
    return _file_digest(resolved, stat.st_mtime_ns, stat.st_size, stat.st_ino)


@lru_cache(maxsize=4096)
def _file_digest(path: str, mtime_ns: int, size: int, inode: int) -> str:
    # mtime, size and inode are part of the cache key only, so an edited or replaced file is read again.
    return _read_digest(path)


def _read_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
