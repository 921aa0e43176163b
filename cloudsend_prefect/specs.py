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

from pydantic import BaseModel, Field

from cloudsend_prefect.config import (
    DEFAULT_MAX_OUTPUT_MB,
    MAX_JOB_RUNS,
    BatchConfig,
    Environment,
    Job,
    check_job_name,
    unprintable_char,
)
from cloudsend_prefect.errors import ConfigError
from cloudsend_prefect.hashing import digest, file_digest
from cloudsend_prefect.matrix import expand, unused

DEFAULT_MAX_OUTPUT_BYTES = DEFAULT_MAX_OUTPUT_MB * 1024**2
INTERPRETERS = {".py": "python3", ".jl": "julia", ".sh": "bash"}


class FileSpec(BaseModel):
    """A local file and where it goes in the job's run directory."""

    local: str = Field(description="The file on this machine (absolute, links resolved): what is uploaded.")
    rel: str = Field(description="Its path in the job's run directory (POSIX, relative).")
    sha256: str = Field(description="SHA-256 of its content: uploaded once per host, and part of the job's hash.")
    executable: bool = Field(False, description="Made executable on the host (a script run directly).")


class EnvSpec(BaseModel):
    """An environment as the host builds it: named by the hash of its full content."""

    name: str = Field(description="The environment's name in the config (`default` for an unnamed one).")
    hash: str = Field(description="SHA-256 of its files: hosts build it once and reuse it while it is unchanged.")
    files: dict[str, str] = Field(
        description="File name in the environment's directory -> text (requirements.txt, setup.sh, apt.txt...)."
    )

    @property
    def key(self) -> str:
        """The hash's prefix that names the environment's directory on a host."""
        return self.hash[:16]


class JobSpec(BaseModel):
    """One run of one job (a `repeat` makes several)."""

    index: int = Field(description="Its place among the batch's job runs, from 0.")
    name: str = Field(description="Its task run's and results folder's name, unique in the batch.")
    key: str = Field(description="Unique per run (hash prefix and occurrence): names its directory on the host.")
    hash: str = Field(description="SHA-256 of what it runs (command, files, environment, outputs): see hashing.")
    command: str = Field(description="The bash line run in its run directory.")
    files: list[FileSpec] = Field(description="The files placed in its run directory.")
    outputs: list[str] = Field(description="Files it must leave in its run directory; fetched back.")
    cpus: int = Field(description="CPU slots it occupies.")
    gpus: int = Field(0, description="GPUs it has to itself.")
    env: EnvSpec | None = Field(description="The environment it runs in, if any.")
    max_retries: int = Field(0, description="More runs when it does not end done.")
    timeout: float | None = Field(None, description="Seconds after which it is killed.")
    expected_duration: float | None = Field(None, description="Seconds it is expected to take (for planning).")
    max_output_bytes: int = Field(
        DEFAULT_MAX_OUTPUT_BYTES, description="The most its outputs together (and each of its logs) may hold."
    )


def _relative(base: Path, path: Path) -> str:
    """Where a file lands in the run dir: its path under the config's directory, else its name.

    Both come from the path as written (made absolute and normalized, symlinks not followed): an upload that
    is a link keeps the link's name, which is the name the job was written against.
    """
    try:
        return path.relative_to(os.path.abspath(base)).as_posix()
    except ValueError:
        return path.name


def _existing(config: BatchConfig, value: str, field: str) -> Path:
    """The file ``value`` names (absolute, symlinks kept), checked to exist and be readable now, not mid-batch."""
    bad = unprintable_char(value)
    if bad:
        raise ConfigError(f"{config.source}: {field}: {value!r}: a file name contains a control character ({bad})")
    path = Path(os.path.abspath(config.base_dir / os.path.expanduser(value)))
    if path.is_dir():
        raise ConfigError(f"{config.source}: {field}: {value} is a directory, expected a file")
    if not path.is_file():
        hint = ""
        if (Path.cwd() / value).is_file() and Path.cwd().resolve() != config.base_dir.resolve():
            # the predecessor resolved paths against the working directory
            hint = "; it exists relative to the working directory, but paths are relative to the config's directory"
        raise ConfigError(f"{config.source}: {field}: file not found: {value} (looked in {config.base_dir}{hint})")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{config.source}: {field}: cannot read {value}: {exc.strerror or exc}") from None
    return path


def _read_text(config: BatchConfig, path: Path, value: str, field: str) -> str:
    """A file the host needs as text (requirements, environment.yml, setup script)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{config.source}: {field}: {value} is not a UTF-8 text file ({exc.reason} at byte {exc.start})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{config.source}: {field}: cannot read {value}: {exc.strerror or exc}") from None


def _file_spec(config: BatchConfig, path: Path, value: str, field: str, *, executable: bool = False) -> FileSpec:
    """The file as the job receives it: named as written, content (through any link) hashed."""
    try:
        sha = file_digest(path)
    except OSError as exc:
        raise ConfigError(f"{config.source}: {field}: cannot read {value}: {exc.strerror or exc}") from None
    return FileSpec(local=str(path.resolve()), rel=_relative(config.base_dir, path), sha256=sha, executable=executable)


LOG_NAMES = ("stdout.log", "stderr.log")  # the job's logs, beside its outputs in its results folder
JOBLOG = "joblog.tsv"  # the batch's joblog, beside its jobs' folders in the results folder (see joblog.py)


def _safe_rel(config: BatchConfig, value: str, field: str) -> str:
    rel = PurePosixPath(value)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ConfigError(f"{config.source}: {field}: {value!r} must be a relative path inside the run directory")
    if rel.as_posix() in LOG_NAMES:
        raise ConfigError(
            f"{config.source}: {field}: {value!r} is the name of the job's own log in its results folder; "
            "name the file differently"
        )
    return rel.as_posix()


# What a folder given as env_pypi, env_conda or env_julia must hold (the predecessor's folder form), first found.
ENV_FOLDER_FILES = {
    "env_pypi": ("requirements.txt",),
    "env_conda": ("environment.yml", "environment.yaml"),
    "env_julia": ("Project.toml", "JuliaProject.toml"),
}


def _env_file(config: BatchConfig, value: str, where: str) -> tuple[Path, str]:
    """The file an environment field names: the file itself, or the one its folder holds (and how to say it)."""
    folder = Path(os.path.abspath(config.base_dir / os.path.expanduser(value)))
    if not folder.is_dir():
        return _existing(config, value, where), value
    names = ENV_FOLDER_FILES[where.rsplit(".", 1)[1]]
    name = next((n for n in names if (folder / n).is_file()), None)
    if name is None:
        raise ConfigError(
            f"{config.source}: {where}: {value} is a folder without {' or '.join(names)}: name the file, or put one "
            "there"
        )
    inside = f"{value.rstrip('/')}/{name}"
    return _existing(config, inside, where), inside


def resolve_env(config: BatchConfig, env: Environment, index: int) -> EnvSpec:
    """The files the host builds ``env`` from, by their names in its environment directory (see hashing).

    Args:
        config: The config ``env`` belongs to (for paths and messages).
        env: The environment.
        index: Its place in ``config.environments`` (messages name ``environments[index]``).

    Raises:
        ConfigError: A file it names is missing, unreadable or not UTF-8 text.
    """
    field = f"environments[{index}]"
    files: dict[str, str] = {}

    def text(value: str, key: str) -> str:
        where = f"{field}.{key}"
        path, shown = _env_file(config, value, where)
        return _read_text(config, path, shown, where)

    if isinstance(env.env_pypi, str):
        files["requirements.txt"] = text(env.env_pypi, "env_pypi")
    elif env.env_pypi:
        files["requirements.txt"] = "\n".join(env.env_pypi) + "\n"
    if isinstance(env.env_conda, str):
        files["environment.yml"] = text(env.env_conda, "env_conda")
    elif env.env_conda:
        files["conda.txt"] = "\n".join(env.env_conda) + "\n"
    if env.env_conda_channels:
        files["conda-channels.txt"] = "\n".join(env.env_conda_channels) + "\n"
    if env.env_aptget:
        files["apt.txt"] = "\n".join(env.env_aptget) + "\n"
    if isinstance(env.env_julia, str):
        where = f"{field}.env_julia"
        project, shown = _env_file(config, env.env_julia, where)
        files["Project.toml"] = _read_text(config, project, shown, where)
        manifest = project.with_name("Manifest.toml")  # the exact versions, when the project has them
        if manifest.is_file():
            files["Manifest.toml"] = _read_text(config, manifest, str(Path(shown).with_name("Manifest.toml")), where)
    elif env.env_julia:
        files["julia.txt"] = "\n".join(env.env_julia) + "\n"
    if env.command:
        script = _setup_script(env)
        if script:
            where = f"{field}.command"
            files["setup.sh"] = _read_text(config, _existing(config, script, where), script, where)
        else:
            files["setup.sh"] = env.command + "\n"
    return EnvSpec(name=env.name or "default", hash=digest(files), files=files)


def _setup_script(env: Environment) -> str | None:
    """The file ``command`` names, when it is one line ending in .sh; else None (it is the commands)."""
    command = env.command or ""
    return command.strip() if "\n" not in command and command.strip().endswith(".sh") else None


def env_paths(config: BatchConfig) -> list[Path]:
    """The files the environments are read from: what a remote controller must be sent with the config."""
    paths = []
    for i, env in enumerate(config.environments):
        for key in ("env_pypi", "env_conda", "env_julia"):
            value = getattr(env, key)
            if isinstance(value, str):
                path = _env_file(config, value, f"environments[{i}].{key}")[0]
                paths.append(path)
                if key == "env_julia" and path.with_name("Manifest.toml").is_file():
                    paths.append(path.with_name("Manifest.toml"))
        script = _setup_script(env)
        if script:
            paths.append(_existing(config, script, f"environments[{i}].command"))
    return paths


def resolve_envs(config: BatchConfig) -> dict[str | None, EnvSpec]:
    """Environment specs by name (the only environment is also reachable as None)."""
    specs = {env.name: resolve_env(config, env, i) for i, env in enumerate(config.environments)}
    if len(config.environments) == 1:
        specs[None] = next(iter(specs.values()))
    return specs


class _Files:
    """Each file the jobs name, checked and hashed once per expansion: a matrix's points name the same few."""

    def __init__(self, config: BatchConfig) -> None:
        self.config = config
        self.known: dict[tuple[str, bool], FileSpec] = {}

    def spec(self, value: str, field: str, *, executable: bool = False) -> FileSpec:
        """The file ``value`` names (``field`` says where, for messages), checked and hashed the first time."""
        key = (value, executable)
        if key not in self.known:
            path = _existing(self.config, value, field)
            self.known[key] = _file_spec(self.config, path, value, field, executable=executable)
        return self.known[key]


def _command(config: BatchConfig, job: Job, field: str, files: list[FileSpec], known: _Files) -> tuple[str, str]:
    """The job's shell line, and its script's path as written ("" for a run_command)."""
    if job.run_command:
        return job.run_command + (" " + shlex.join(job.args) if job.args else ""), ""
    try:
        words = shlex.split(job.run_script or "")
    except ValueError as exc:
        raise ConfigError(f"{config.source}: {field}.run_script: cannot split into path and args: {exc}") from None
    if not words:
        raise ConfigError(f"{config.source}: {field}.run_script: empty")
    interpreter = INTERPRETERS.get(PurePosixPath(words[0]).suffix.lower())
    spec = known.spec(words[0], f"{field}.run_script", executable=interpreter is None)
    files.append(spec)
    argv = [interpreter, spec.rel] if interpreter else ["./" + spec.rel]
    return shlex.join([*argv, *words[1:], *job.args]), words[0]


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


def _check_key_files(config: BatchConfig) -> None:
    """An ssh key file that is missing is found now, not at the first connection.

    The SSH transport opens ``key_file`` as given (``~`` expanded, a relative path against the working
    directory), so that is where it must exist; the config's directory is tried only to say what went wrong.
    """
    for i, inst in enumerate(config.instances):
        if config.provider_of(inst) != "ssh" or not inst.key_file:
            continue
        field = f"instances[{i}].key_file"
        path = Path(os.path.expanduser(inst.key_file))
        if path.is_file():
            try:
                with path.open("rb"):
                    pass
            except OSError as exc:
                raise ConfigError(
                    f"{config.source}: {field}: cannot read {inst.key_file}: {exc.strerror or exc}"
                ) from None
            continue
        if path.is_dir():
            raise ConfigError(f"{config.source}: {field}: {inst.key_file} is a directory, expected a private key file")
        hint = ""
        if not path.is_absolute() and (config.base_dir / path).is_file():
            hint = (
                f"; it exists relative to the config's directory ({config.base_dir / path}), but the SSH connection "
                "reads it relative to the working directory: write it as an absolute or ~/ path"
            )
        raise ConfigError(
            f"{config.source}: {field}: file not found: {inst.key_file} (looked for {path.absolute()}{hint})"
        )


def _check_run_dir_names(config: BatchConfig, field: str, files: list[FileSpec], values: list[tuple[str, str]]) -> None:
    """Two different files of one job must not land on the same name in its run directory."""
    first: dict[str, int] = {}
    for n, spec in enumerate(files):
        if spec.rel in first and files[first[spec.rel]].local != spec.local:
            (key_a, value_a), (key_b, value_b) = values[first[spec.rel]], values[n]
            raise ConfigError(
                f"{config.source}: {field}.{key_b}: {value_b!r} lands on {spec.rel!r} in the run directory, as does "
                f"{value_a!r} ({field}.{key_a}); rename one, or keep both under the config's directory"
            )
        first.setdefault(spec.rel, n)


def _run_names(config: BatchConfig, indexed: list[tuple[int, Job]]) -> list[list[str]]:
    """Each job's run names: its name (given, made from its matrix point, or derived from its script),
    numbered ``-1``, ``-2``... when repeated or shared by several jobs; a number that makes a name some other
    run already has is an error. ``indexed``: the jobs with their index in the config (a matrix's points
    share theirs)."""
    jobs = [job for _, job in indexed]
    bases = [_base_name(job) for job in jobs]
    counts: Counter[str] = Counter()
    for base, job in zip(bases, jobs, strict=True):
        counts[base] += job.repeat
    numbered: Counter[str] = Counter()
    taken: dict[str, tuple[int, int]] = {}  # name -> (job index, run number)

    def why(n: int, run: int) -> str:
        """Why run ``run`` of job ``n`` has the name it has: its own, its repeat, or a shared name."""
        if counts[bases[n]] == 1:
            return ""
        if jobs[n].repeat > 1:
            return f"run {run} of "
        return f"numbered, as several jobs are named {bases[n]!r}: "

    def owner(n: int, run: int) -> str:
        reason, i = why(n, run), indexed[n][0]
        return f"{reason}jobs[{i}] (repeat)" if reason.startswith("run") else f"{reason}jobs[{i}]"

    result = []
    for n, ((i, job), base) in enumerate(zip(indexed, bases, strict=True)):
        names = []
        for run in range(1, job.repeat + 1):
            if counts[base] == 1:
                name = base
            else:
                numbered[base] += 1
                name = f"{base}-{numbered[base]}"
            if name in taken:
                reason = why(n, run).removesuffix(" of ").removesuffix(": ")
                mine = f" ({reason})" if reason else ""
                field, hint = (f"jobs[{i}].name", "") if job.name else (f"jobs[{i}]", "; give the job a `name`")
                kind = "" if job.name else "the name taken from its script or command, "
                raise ConfigError(
                    f"{config.source}: {field}: {kind}{name!r}{mine} is also the name of {owner(*taken[name])}{hint}"
                )
            taken[name] = (n, run)
            names.append(name)
        result.append(names)
    return result


def _points(config: BatchConfig, jobs: list[Job]) -> list[tuple[int, Job]]:
    """The jobs with their index in the config, each matrix expanded into its points (plain jobs)."""
    indexed: list[tuple[int, Job]] = []
    for i, job in enumerate(jobs):
        if job.matrix is None:
            indexed.append((i, job))
            continue
        idle = unused(job)
        if idle:
            raise ConfigError(
                f"{config.source}: jobs[{i}].matrix: {', '.join(repr(p) for p in idle)} appear(s) in none of "
                "run_script, run_command, args, upload_files or input_files (as {name}): every point would run "
                "the same job"
            )
        for point in expand(job, _base_name(job)):
            try:
                check_job_name(point.name or "")
            except ValueError as exc:
                raise ConfigError(
                    f"{config.source}: jobs[{i}].name: {point.name!r}, the name of a point of its matrix: {exc}; "
                    "give the job a shorter `name` with {placeholders}, as in `name: fit-{lr}`"
                ) from None
            indexed.append((i, point))
    return indexed


def expand_jobs(config: BatchConfig, jobs: list[Job] | None = None) -> list[JobSpec]:
    """Resolve every job (matrix and `repeat` expanded) in order, checking files and computing hashes.

    A run calls it once, through ``resolve.resolve_batch``.

    Args:
        config: The validated config (its ``base_dir`` is where relative paths start).
        jobs: The jobs to resolve instead of the config's own (they are bounded here, as the config's are).

    Returns:
        One spec per job run, in the config's order: a matrix's points, then each one's repeats.

    Raises:
        ConfigError: A file is missing, unreadable or lands on another's name; a name clashes; too many runs.
    """
    jobs = config.jobs if jobs is None else jobs
    runs = sum(job.runs for job in jobs)
    if runs > MAX_JOB_RUNS:  # (the config checks its own jobs; these may have come separately)
        raise ConfigError(
            f"{config.source}: jobs: {runs} runs in all (matrix points times `repeat`), more than {MAX_JOB_RUNS}"
        )
    _check_key_files(config)
    envs = resolve_envs(config)
    indexed = _points(config, jobs)
    run_names = _run_names(config, indexed)
    specs: list[JobSpec] = []
    seen: Counter[str] = Counter()
    known = _Files(config)
    for (i, job), names in zip(indexed, run_names, strict=True):
        field = f"jobs[{i}]"
        files: list[FileSpec] = []
        command, script = _command(config, job, field, files, known)
        values = [("run_script", script)] if files else []
        for key in ("upload_files", "input_files"):
            for value in getattr(job, key):
                files.append(known.spec(value, f"{field}.{key}"))
                values.append((key, value))
        _check_run_dir_names(config, field, files, values)
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
        for name in names:
            if name == JOBLOG:
                raise ConfigError(
                    f"{config.source}: {field}.name: {name!r} is the name of the batch's joblog in its results folder; "
                    "name the job differently"
                )
            seen[job_hash] += 1
            specs.append(
                JobSpec(
                    index=len(specs),
                    name=name,
                    key=f"{job_hash[:16]}-{seen[job_hash]}",
                    hash=job_hash,
                    command=command,
                    files=files,
                    outputs=outputs,
                    cpus=job.cpus_req,
                    gpus=job.gpus_req,
                    env=env,
                    max_retries=job.max_retries,
                    timeout=job.timeout,
                    expected_duration=job.expected_duration,
                    max_output_bytes=int(job.max_output_mb * 1024**2),
                )
            )
    return specs
