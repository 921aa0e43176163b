"""Content hashes that name environments and jobs, stable across machines.

Both are SHA-256 over canonical JSON (sorted keys, no whitespace) in which every file is represented by
its path relative to the config's directory and the SHA-256 of its bytes, so moving the project or cloning
it elsewhere keeps the hashes, while editing any file changes them.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any


def digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def file_digest(path: Path) -> str:
    stat = path.stat()
    return _file_digest(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=4096)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    # mtime and size are part of the cache key only, so an edited file is read again.
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
