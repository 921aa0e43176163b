"""One place turns what a user gives (a config file, or a cluster block, plus jobs) into the batch that runs.

A run resolves its batch once: the CLI does it before anything is created (bad input exits 2 there) and hands
the result to the flow; a run started elsewhere (a deployment, a schedule, ``run_batch`` from Python) resolves
it inside the flow, once. Resolving reads the config once, validates it, and expands its jobs once (matrices
and repeats expanded, every file the config names checked and hashed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cloudsend_prefect.config import BatchConfig, ClusterSettings, Job
from cloudsend_prefect.errors import ConfigError
from cloudsend_prefect.loading import read_config, settings_config
from cloudsend_prefect.specs import JobSpec, expand_jobs


@dataclass(frozen=True)
class Batch:
    """A validated, resolved batch: the config and the job runs it stands for, in order.

    Attributes:
        config: The validated config (its ``source`` and ``base_dir`` say where it came from).
        jobs: One spec per job run (matrix points and repeats expanded), files checked and hashed.
    """

    config: BatchConfig
    jobs: list[JobSpec]


def resolve_batch(
    source: str | Path | ClusterSettings,
    jobs: list[Job] | None = None,
    *,
    allow_exec: bool = False,
    base_dir: Path | None = None,
    name: str = "",
) -> Batch:
    """Resolve a batch: read and validate its config, then resolve its jobs, each once.

    Args:
        source: A config file's path; or settings already in memory: a ``BatchConfig`` (its jobs run unless
            ``jobs`` is given) or cluster settings such as a ``CloudSendCluster`` block (``jobs`` required).
        jobs: Jobs that replace the config's own; validated with the config (environments, CPUs, GPUs).
        allow_exec: A .py config file runs as Python instead of having its literal read.
        base_dir: For settings in memory given ``jobs``: the directory the jobs' relative paths start from
            (default: a ``BatchConfig``'s own, else the working directory).
        name: For settings in memory: how messages name them, e.g. ``block cloudsend-cluster/lab`` (default: a
            ``BatchConfig``'s source).

    Returns:
        The batch: the validated config and its job runs.

    Raises:
        ConfigError: Anything wrong with the input, named by file (or block) and field, before anything is
            created: the file, its keys and values, the files it names, the jobs' names and count.
    """
    if not isinstance(source, ClusterSettings):
        config = read_config(source, allow_exec=allow_exec, jobs=jobs)
    elif jobs is None:
        if not isinstance(source, BatchConfig):
            raise ConfigError(f"{name or 'cluster'}: give the jobs to run")
        config = source
    elif isinstance(source, BatchConfig):
        config = settings_config(source, jobs, source=name or source.source, base_dir=base_dir or source.base_dir)
    else:
        config = settings_config(source, jobs, source=name or "cluster", base_dir=base_dir or Path.cwd())
    return Batch(config=config, jobs=expand_jobs(config))


def load_config(path: str | Path, *, allow_exec: bool = False) -> BatchConfig:
    """Load and validate a config file, including the files it names (scripts, uploads, environments).

    Args:
        path: The config file (.yaml, .json, .toml or the predecessor's .py).
        allow_exec: Run a .py file as a script instead of reading its ``config = {...}`` literal.

    Returns:
        The validated config; relative paths inside it are relative to its directory.

    Raises:
        ConfigError: The config or a file it names is missing or wrong (the message names file and field).
    """
    return resolve_batch(path, allow_exec=allow_exec).config
