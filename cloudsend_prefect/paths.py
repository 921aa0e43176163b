"""Where cloudsend keeps its own files on the client machine."""

from __future__ import annotations

import os
from pathlib import Path


def cloudsend_home() -> Path:
    """``$CLOUDSEND_HOME``, default ``~/.cloudsend``: local hosts, fetched outputs, persisted task results."""
    return Path(os.environ.get("CLOUDSEND_HOME", "~/.cloudsend")).expanduser()
