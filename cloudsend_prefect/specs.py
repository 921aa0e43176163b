"""From the config to what runs: environments and jobs resolved to files, shell lines and hashes.

Every file the config names is checked here, so a missing one is reported (with the field that names it)
before anything is provisioned.
"""

from __future__ import annotations

import os
import re
import shlex
from collections import Counter
from pathlib import Path, PurePosixPath

from pydantic import BaseModel

from cloudsend_prefect.config import BatchConfig, Environment, Job
from cloudsend_prefect.hashing import digest, file_digest
from cloudsend_prefect.loading import ConfigError

INTERPRETERS = {".py": "python3", ".jl": "julia", ".sh": "bash"}


class FileSpec(BaseModel):
    """A local file and where it goes in the job's run directory."""

    local: str
    rel: str
    sha256: str
    executable: bool = False


class EnvSpec(BaseModel):
    """An environment as the host builds it: named by the hash of its full content."""

    name: str
    hash: str
    files: dict[str, str]  # file name in the env dir -> text (requirements.txt, setup.sh, apt.txt...)

    @property
    def key(self) -> str:
        return self.hash[:16]


class JobSpec(BaseModel):
    """One run of one job (a `repeat` makes several)."""

    index: int
    name: str
    key: str  # unique per run: hash prefix + occurrence, names its directory on the host
    hash: str
    command: str
    files: list[FileSpec]
    outputs: list[str]
    cpus: int
    env: EnvSpec | None
    max_retries: int = 0
    timeout: float | None = None
    expected_duration: float | None = None


def _relative(base: Path, path: Path) -> str:
    """Where a file lands in the run dir: its path under the config's directory, else its name."""
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return path.name


def _existing(config: BatchConfig, value: str, field: str) -> Path:
    path = (config.base_dir / os.path.expanduser(value)).resolve()
    if path.is_dir():
        raise ConfigError(f"{config.source}: {field}: {value} is a directory, expected a file")
    if not path.is_file():
        hint = ""
        if (Path.cwd() / value).is_file() and Path.cwd().resolve() != config.base_dir.resolve():
            # the predecessor resolved paths against the working directory
            hint = "; it exists relative to the working directory, but paths are relative to the config's directory"
        raise ConfigError(f"{config.source}: {field}: file not found: {value} (looked in {config.base_dir}{hint})")
    return path


def _safe_rel(config: BatchConfig, value: str, field: str) -> str:
    rel = PurePosixPath(value)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ConfigError(f"{config.source}: {field}: {value!r} must be a relative path inside the run directory")
    return rel.as_posix()


def resolve_env(config: BatchConfig, env: Environment, index: int) -> EnvSpec:
    field = f"environments[{index}]"
    files: dict[str, str] = {}
    if isinstance(env.env_pypi, str):
        files["requirements.txt"] = _existing(config, env.env_pypi, f"{field}.env_pypi").read_text()
    elif env.env_pypi:
        files["requirements.txt"] = "\n".join(env.env_pypi) + "\n"
    if isinstance(env.env_conda, str):
        files["environment.yml"] = _existing(config, env.env_conda, f"{field}.env_conda").read_text()
    elif env.env_conda:
        files["conda.txt"] = "\n".join(env.env_conda) + "\n"
    if env.env_conda_channels:
        files["conda-channels.txt"] = "\n".join(env.env_conda_channels) + "\n"
    if env.env_aptget:
        files["apt.txt"] = "\n".join(env.env_aptget) + "\n"
    if env.env_julia:
        files["julia.txt"] = "\n".join(env.env_julia) + "\n"
    if env.command:
        looks_like_file = "\n" not in env.command and env.command.strip().endswith(".sh")
        files["setup.sh"] = (
            _existing(config, env.command.strip(), f"{field}.command").read_text()
            if looks_like_file
            else env.command + "\n"
        )
    return EnvSpec(name=env.name or "default", hash=digest(files), files=files)


def resolve_envs(config: BatchConfig) -> dict[str | None, EnvSpec]:
    """Environment specs by name (the only environment is also reachable as None)."""
    specs = {env.name: resolve_env(config, env, i) for i, env in enumerate(config.environments)}
    if len(config.environments) == 1:
        specs[None] = next(iter(specs.values()))
    return specs


def _command(config: BatchConfig, job: Job, field: str, files: list[FileSpec]) -> str:
    if job.run_command:
        return job.run_command + (" " + shlex.join(job.args) if job.args else "")
    try:
        words = shlex.split(job.run_script or "")
    except ValueError as exc:
        raise ConfigError(f"{config.source}: {field}.run_script: cannot split into path and args: {exc}") from None
    if not words:
        raise ConfigError(f"{config.source}: {field}.run_script: empty")
    script = _existing(config, words[0], f"{field}.run_script")
    rel = _relative(config.base_dir, script)
    interpreter = INTERPRETERS.get(script.suffix.lower())
    files.append(FileSpec(local=str(script), rel=rel, sha256=file_digest(script), executable=interpreter is None))
    argv = [interpreter, rel] if interpreter else ["./" + rel]
    return shlex.join([*argv, *words[1:], *job.args])


def _base_name(job: Job) -> str:
    if job.name:
        return job.name
    source = job.run_script or job.run_command or "job"
    try:
        words = shlex.split(source)
    except ValueError:  # unbalanced quotes: the shell's business for a command
        words = source.split()
    word = words[0] if words else "job"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(word).stem).strip("-.") or "job"


def expand_jobs(config: BatchConfig, jobs: list[Job] | None = None) -> list[JobSpec]:
    """Resolve every job (`repeat` expanded) in order, checking files and computing hashes."""
    envs = resolve_envs(config)
    jobs = config.jobs if jobs is None else jobs
    specs: list[JobSpec] = []
    seen: Counter[str] = Counter()
    names = Counter(_base_name(job) for job in jobs for _ in range(job.repeat))
    name_seen: Counter[str] = Counter()
    for i, job in enumerate(jobs):
        field = f"jobs[{i}]"
        files: list[FileSpec] = []
        command = _command(config, job, field, files)
        for key in ("upload_files", "input_files"):
            for value in getattr(job, key):
                path = _existing(config, value, f"{field}.{key}")
                files.append(FileSpec(local=str(path), rel=_relative(config.base_dir, path), sha256=file_digest(path)))
        outputs = [_safe_rel(config, out, f"{field}.output_files") for out in job.output_files]
        env = envs.get(job.env_name)
        job_hash = digest(
            {
                "command": command,
                "env": env.hash if env else None,
                "files": sorted((f.rel, f.sha256) for f in files),
                "outputs": sorted(outputs),
            }
        )
        base = _base_name(job)
        for _ in range(job.repeat):
            seen[job_hash] += 1
            name_seen[base] += 1
            specs.append(
                JobSpec(
                    index=len(specs),
                    name=base if names[base] == 1 else f"{base}-{name_seen[base]}",
                    key=f"{job_hash[:16]}-{seen[job_hash]}",
                    hash=job_hash,
                    command=command,
                    files=files,
                    outputs=outputs,
                    cpus=job.cpus_req,
                    env=env,
                    max_retries=job.max_retries,
                    timeout=job.timeout,
                    expected_duration=job.expected_duration,
                )
            )
    return specs
