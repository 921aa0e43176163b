"""Reading a batch config from YAML, JSON, TOML or the predecessor's Python files, with errors a user can act on."""

from __future__ import annotations

import ast
import json
import runpy
from pathlib import Path
from typing import Any

import tomllib
import yaml
from pydantic import ValidationError

from cloudsend_prefect.config import BatchConfig, split_ignored


class ConfigError(ValueError):
    """Bad input: the message names the file and the field; nothing has been created or started."""


def load_config(path: str | Path, *, allow_exec: bool = False) -> BatchConfig:
    """Load and validate a config file; relative paths inside it are relative to its directory.

    Python files (``config = {...}``) are read with ``ast.literal_eval``, never executed, unless
    ``allow_exec`` is set: then the file runs as a script, with everything that implies.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    data = _read_mapping(path, allow_exec)
    config = parse_config(data, source=str(path), base_dir=path.resolve().parent)
    from cloudsend_prefect.specs import expand_jobs  # checks every file the config names

    expand_jobs(config)
    return config


def parse_config(data: Any, *, source: str, base_dir: Path) -> BatchConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with instances, environments and jobs")
    data, notes = split_ignored(data)
    try:
        config = BatchConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source)) from None
    return config.located(base_dir, source, notes)


def describe_validation_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling against the config reference)"
        lines.append(f"{source}: {where + ': ' if where else ''}{msg}")
    return "\n".join(lines)


def _read_mapping(path: Path, allow_exec: bool) -> Any:
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    try:
        if suffix in (".yaml", ".yml"):
            return yaml.safe_load(text)
        if suffix == ".json":
            return json.loads(text)
        if suffix == ".toml":
            return tomllib.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {suffix[1:].upper()}: {exc}") from None
    if suffix == ".py":
        return runpy.run_path(str(path)).get("config") if allow_exec else _literal_config(path, text)
    raise ConfigError(f"{path}: unknown config format {suffix!r} (use .yaml, .json, .toml or .py)")


def _literal_config(path: Path, text: str) -> Any:
    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: not valid Python: {exc.msg}") from None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "config" for t in node.targets):
            try:
                return ast.literal_eval(node.value)
            except ValueError:
                raise ConfigError(
                    f"{path}:{node.lineno}: `config = ...` must be a literal dict to be read without running "
                    "the file; pass --exec-python-config to run it as Python instead"
                ) from None
    raise ConfigError(f"{path}: no `config = {{...}}` assignment found")
