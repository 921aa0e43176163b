"""Reading a batch config from YAML, JSON, TOML or the predecessor's Python files, with errors a user can act on."""

from __future__ import annotations

import ast
import json
import re
import runpy
import tomllib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cloudsend_prefect.config import BatchConfig, ClusterSettings, Job, split_ignored
from cloudsend_prefect.errors import ConfigError

# A batch config is a few levels deep and a few kilobytes; these bounds turn a pathological file (a generated
# one gone wrong, or a hostile one) into a one-line error instead of a stack overflow or a memory hog.
MAX_CONFIG_BYTES = 50 * 1024 * 1024
MAX_NESTING = 64


def read_config(path: str | Path, *, allow_exec: bool = False, jobs: list[Job] | None = None) -> BatchConfig:
    """Read and validate a config file, once; relative paths inside it are relative to its directory.

    The files the config names are not looked at here: ``resolve.resolve_batch`` checks them while resolving
    the jobs (``resolve.load_config`` is both steps).

    Args:
        path: The config file: .yaml/.yml, .json, .toml, or the predecessor's .py (``config = {...}``).
        allow_exec: Run a .py file as a script (with everything that implies) instead of reading its
            ``config = {...}`` with ``ast.literal_eval``.
        jobs: Jobs (already validated) that replace the file's own; the config is validated with them, so a job
            asking for more CPUs than any instance has is reported as it would be in the file.

    Returns:
        The validated config, located at the file (``base_dir``, ``source``) with its load-time notes.

    Raises:
        ConfigError: The file is missing, unreadable, too large or too deep, not valid in its format, or not a
            valid config (one line per bad field, naming the file and the field).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    data = _read_mapping(path, allow_exec)
    if jobs is not None and isinstance(data, dict):
        data = {**data, "jobs": list(jobs)}  # the models themselves: pydantic takes them as they are
    return parse_config(data, source=str(path), base_dir=path.resolve().parent)


def settings_config(settings: ClusterSettings, jobs: list[Job], *, source: str, base_dir: Path) -> BatchConfig:
    """A batch from cluster settings (a ``CloudSendCluster`` block's, or another config's) and jobs, validated
    together.

    Args:
        settings: Instance types, environments and globals (every key of a config but its jobs); only the keys
            given to them are carried over.
        jobs: The jobs to run (already validated models).
        source: How messages name where the settings came from, e.g. ``block cloudsend-cluster/lab``.
        base_dir: The directory the jobs' relative paths start from.

    Raises:
        ConfigError: The jobs do not fit the settings (an unknown environment, more CPUs than any instance...).
    """
    keys = (set(type(settings).model_fields) & set(BatchConfig.model_fields)) - {"jobs"}
    data: dict[str, Any] = settings.model_dump(include=keys, exclude_unset=True)
    data["jobs"] = list(jobs)
    return parse_config(data, source=source, base_dir=base_dir)


def parse_config(data: Any, *, source: str, base_dir: Path) -> BatchConfig:
    """Validate a config's mapping (as read from a file, or built from a block and jobs).

    Args:
        data: The mapping; the predecessor's ignored keys are dropped, each with a note.
        source: How messages name the config (its file, or the block).
        base_dir: The directory its relative paths start from.

    Returns:
        The validated config, located (``base_dir``, ``source``, ``notes``).

    Raises:
        ConfigError: ``data`` is not a mapping, nests too deep, or fails validation (one line per bad field).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with instances, environments and jobs")
    if _deeper_than(data, MAX_NESTING):
        raise ConfigError(_too_deep(source))
    data, notes = split_ignored(data)
    try:
        config = BatchConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source)) from None
    except RecursionError:  # (the depth check above should make this unreachable)
        raise ConfigError(_too_deep(source)) from None
    return config.located(base_dir, source, notes)


def _too_deep(source: object) -> str:
    return f"{source}: nesting deeper than {MAX_NESTING} levels (lists and mappings inside each other)"


def _deeper_than(data: Any, limit: int) -> bool:
    """Whether lists and mappings nest more than ``limit`` deep, level by level without recursion.

    Each level holds every container once (YAML aliases share them), and a structure that contains itself
    never ends, so it counts as too deep.
    """
    containers = (dict, list, tuple, set, frozenset)  # what pydantic takes for a list or a mapping
    level = [data]
    for _ in range(limit + 1):
        children: dict[int, Any] = {}
        for node in level:
            for child in node.values() if isinstance(node, dict) else node:
                if isinstance(child, containers):
                    children[id(child)] = child
        if not children:
            return False
        level = list(children.values())
    return True


def _short_repr(value: Any) -> str:
    """The bad value as the user wrote it, cut short; a container by its kind only."""
    if isinstance(value, dict | list):
        return "a mapping" if isinstance(value, dict) else "a list"
    try:
        text = repr(value)
    except ValueError:  # an int too long to print (Python's digit limit)
        return "a number with too many digits"
    return text if len(text) <= 60 else text[:57] + "..."


# Location parts pydantic adds for the members of a union (`str | list[str]`), not keys of the config.
_UNION_TAG = re.compile(r"(str|int|float|bool|none|(list|dict|literal|function-\w+)\[.*\])")


def describe_validation_error(exc: ValidationError, source: str) -> str:
    """One line per bad field, ``<file>: jobs[1].cpus_req: <problem> (got <value>)``."""
    problems: dict[str, list[str]] = {}
    inputs: dict[str, str] = {}
    for err in exc.errors():
        loc = [p for p in err["loc"] if isinstance(p, int) or not _UNION_TAG.fullmatch(p)]
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling against the config reference)"
        elif "input" in err and where and (not isinstance(err["input"], dict | list) or err["type"].endswith("_type")):
            value = err["input"]  # a container is only worth naming when a scalar was expected
            inputs[where] = f" (got {_short_repr(value)})"
        if msg not in problems.setdefault(where, []):
            problems[where].append(msg)
    return "\n".join(
        f"{source}: {where + ': ' if where else ''}{', or '.join(msgs)}{inputs.get(where, '')}"
        for where, msgs in problems.items()
    )


def _read_mapping(path: Path, allow_exec: bool) -> Any:
    suffix = path.suffix.lower()
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"{path}: {size / 2**20:.0f} MiB is too large for a config file (the limit is "
                f"{MAX_CONFIG_BYTES // 2**20} MiB); list data in files the jobs upload instead"
            )
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    try:
        if suffix in (".yaml", ".yml"):
            return yaml.safe_load(text)
        if suffix == ".json":
            return json.loads(text)
        if suffix == ".toml":
            return tomllib.loads(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        context = exc.context_mark and exc.context and f" ({exc.context} at line {exc.context_mark.line + 1})"
        raise ConfigError(f"{path}{where}: not valid YAML: {exc.problem or exc.context}{context or ''}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON: {exc.msg}") from None
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {suffix[1:].upper()}: {exc}") from None
    except RecursionError:
        raise ConfigError(_too_deep(path)) from None
    except ValueError as exc:  # Python's limit on digits when reading an int; the parsers let it through
        if "digits" in str(exc):
            raise ConfigError(f"{path}: a number with too many digits (at most 4300)") from None
        raise ConfigError(f"{path}: not valid {suffix[1:].upper()}: {exc}") from None
    if suffix == ".py":
        return _exec_config(path) if allow_exec else _literal_config(path, text)
    raise ConfigError(f"{path}: unknown config format {suffix!r} (use .yaml, .json, .toml or .py)")


def _exec_config(path: Path) -> Any:
    try:
        namespace = runpy.run_path(str(path), run_name="__cloudsend_config__")
    except (Exception, SystemExit) as exc:
        raise ConfigError(f"{path}: running it as Python failed: {type(exc).__name__}: {exc}") from None
    if "config" not in namespace:
        raise ConfigError(f"{path}: the file ran but defined no `config` variable")
    return namespace["config"]


_MUTATORS = {"append", "extend", "insert", "update", "setdefault", "pop", "popitem", "remove", "clear", "__setitem__"}


def _root_name(node: ast.expr) -> str | None:
    """``config`` for ``config``, ``config['jobs']``, ``config.update``, ``config['jobs'][0].append``..."""
    while isinstance(node, ast.Subscript | ast.Attribute | ast.Call):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def _literal_config(path: Path, text: str) -> Any:
    """The value of the file's ``config = {...}``, read as a literal; refused if the file changes it later."""
    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: not valid Python: {exc.msg}") from None
    hint = "pass --exec-python-config (allow_exec=True) to run the file as Python instead"
    assigned: ast.expr | None = None
    lineno = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and target.id == "config" and not isinstance(node, ast.AugAssign):
                    if assigned is not None or node not in tree.body:
                        raise ConfigError(
                            f"{path}:{node.lineno}: `config` is assigned more than once or inside a block; "
                            f"it can only be read without running the file when it is one top-level literal; {hint}"
                        )
                    assigned, lineno = node.value, node.lineno
                elif _root_name(target) == "config":
                    raise ConfigError(f"{path}:{node.lineno}: `config` is modified after it is defined; {hint}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in _MUTATORS
            and _root_name(node.func) == "config"
        ):
            raise ConfigError(f"{path}:{node.lineno}: `config` is modified by .{node.func.attr}(); {hint}")
        elif isinstance(node, ast.Delete) and any(_root_name(t) == "config" for t in node.targets):
            raise ConfigError(f"{path}:{node.lineno}: `config` is modified after it is defined; {hint}")
    if assigned is None:
        raise ConfigError(f"{path}: no `config = {{...}}` assignment found")
    try:
        return ast.literal_eval(assigned)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ConfigError(
            f"{path}:{lineno}: `config = ...` must be a literal dict (no calls, names or operators) to be read "
            f"without running the file; {hint}"
        ) from None
