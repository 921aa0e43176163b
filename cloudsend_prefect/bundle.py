"""A config and the files it names, carried as one flow parameter to a controller that has none of them.

A batch submitted to the controller's deployment (``cloudsend run --remote``) cannot name files on the user's
machine: the config file, its jobs' scripts and uploads and its environments' files travel inside the run's
parameters, compressed, and the flow writes them into a folder of their own before loading the config there.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zlib
from pathlib import Path, PurePosixPath

from pydantic import BaseModel, Field

from cloudsend_prefect.errors import ConfigError
from cloudsend_prefect.resolve import Batch, resolve_batch
from cloudsend_prefect.specs import env_paths

# Flow run parameters live in the Prefect database and go through its API whole: a batch's data belongs on its
# hosts (or in a bucket), not here.
MAX_BYTES = 4 * 1024**2


class Bundle(BaseModel):
    """Files by their path under the config's folder (base64 of their zlib-compressed content)."""

    config: str = Field(description="The config file's path inside the bundle.")
    files: dict[str, str]
    executable: list[str] = Field(default_factory=list)

    @property
    def digest(self) -> str:
        """SHA-256 of the whole bundle: names the folder it is unpacked into, so a re-attach finds it written."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


def pack(
    config_path: Path, *, resolved: Batch | None = None, allow_exec: bool = False, max_bytes: int = MAX_BYTES
) -> Bundle:
    """The config and every file it names, all under the config's folder (checked as ``validate`` does);
    ConfigError for a file outside it, or when together they are over ``max_bytes`` compressed. ``resolved``:
    the batch the file describes, when the caller has resolved it already (else it is resolved here)."""
    batch = resolved or resolve_batch(config_path, allow_exec=allow_exec)
    config, specs = batch.config, batch.jobs
    base = Path(os.path.abspath(config.base_dir))
    config_file = Path(os.path.abspath(config_path))
    named = [config_file]
    for f in {f.rel: f for spec in specs for f in spec.files}.values():
        # rel is the file's path under the config's folder, or only its name for a file elsewhere
        if not (base / f.rel).is_file() or not os.path.samefile(base / f.rel, f.local):
            raise _outside(config.source, f.local, base)
        named.append(base / f.rel)
    named += env_paths(config)
    files: dict[str, str] = {}
    executable = []
    size = 0
    for path in dict.fromkeys(named):
        try:
            rel = path.relative_to(base).as_posix()
        except ValueError:
            raise _outside(config.source, path, base) from None
        data = base64.b64encode(zlib.compress(path.read_bytes(), 9)).decode()
        size += len(data)
        if size > max_bytes:
            raise ConfigError(
                f"{config.source}: the config and its files are over {max_bytes // 1024**2} MiB compressed (at "
                f"{rel}): a remote batch carries them in its flow run's parameters; put large inputs on the hosts "
                "or in a bucket and have the jobs fetch them"
            )
        files[rel] = data
        if os.access(path, os.X_OK):
            executable.append(rel)
    return Bundle(config=config_file.relative_to(base).as_posix(), files=files, executable=executable)


def _outside(source: str, path: Path | str, base: Path) -> ConfigError:
    """The error for a file a remote batch cannot carry: it is sent the config's folder only."""
    return ConfigError(
        f"{source}: {path} is outside the config's folder ({base}): a remote batch is sent the config's folder "
        "only; move the file there"
    )


def _inside(root: Path, rel: str) -> Path:
    path = PurePosixPath(rel)
    if not rel or path.is_absolute() or ".." in path.parts or "\0" in rel:
        raise ValueError(f"bundle: {rel!r} is not a relative path inside the bundle")
    return root.joinpath(*path.parts)


def unpack(bundle: Bundle, root: Path) -> Path:
    """The bundle's files under ``root/<its digest>/`` (written once: a run of the same batch again, a re-attach,
    finds them there), and the config file's path."""
    folder = root / bundle.digest[:16]
    if not folder.is_dir():
        part = root / f".{folder.name}.{os.getpid()}"
        executable = set(bundle.executable)
        for rel, data in bundle.files.items():
            path = _inside(part, rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(zlib.decompress(base64.b64decode(data)))
            if rel in executable:
                path.chmod(0o755)
        os.replace(part, folder)
    return _inside(folder, bundle.config)
