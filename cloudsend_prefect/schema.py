"""JSON Schema of the batch config, for editors (completion, hover docs, red squiggles on unknown keys).

Regenerate the committed copy with ``python -m cloudsend_prefect.schema > cloudsend.schema.json``; a test
checks it is current. In a YAML file, point your editor at it with a first line such as
``# yaml-language-server: $schema=./cloudsend.schema.json``.

The pydantic models are the source; the schema is widened to accept what the loader accepts beyond the
models' types: a string where a list of names is expected (split on commas), a single mapping where a list of
instances/environments/jobs is expected, ``null`` for "the default", the predecessor's string ``max_bid``,
and the predecessor's keys that are accepted but ignored (marked ``deprecated``, with the reason).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from cloudsend_prefect.config import IGNORED_GLOBAL_KEYS, BatchConfig

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
TITLE = "cloudsend batch config"

# fields whose before-validators turn a comma-separated string into a list
_STRING_LISTS = {
    "Job": ("upload_files", "input_files", "output_files"),
    "Environment": ("env_conda_channels", "env_aptget", "env_julia"),
}
_NUMBER_STRING = {"type": "string", "pattern": r"^\s*[0-9]*\.?[0-9]+\s*$"}


def _widen(prop: dict[str, Any], *alternatives: dict[str, Any]) -> None:
    """Make ``prop`` also accept ``alternatives`` (keeping its title, description and default on top)."""
    meta: dict[str, Any] = {k: prop.pop(k) for k in ("title", "description", "default") if k in prop}
    options = prop.pop("anyOf", None) or [dict(prop)]
    prop.clear()
    prop["anyOf"] = [*options, *(alt for alt in alternatives if alt not in options)]
    prop.update(meta)


def _nullable(schema: dict[str, Any]) -> None:
    """``key: null`` means the default (the predecessor wrote ``'cpus_req': None``)."""
    for prop in schema["properties"].values():
        if {"type": "null"} not in prop.get("anyOf", []):
            _widen(prop, {"type": "null"})


def config_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a cloudsend config file."""
    schema: dict[str, Any] = BatchConfig.model_json_schema()
    defs = schema["$defs"]
    for model, fields in _STRING_LISTS.items():
        for field in fields:
            _widen(defs[model]["properties"][field], {"type": "string"})
    _widen(defs["InstanceType"]["properties"]["max_bid"], _NUMBER_STRING)
    for key in ("instances", "environments", "jobs"):
        prop = schema["properties"][key]
        _widen(prop, dict(prop["items"]))
    for obj in (schema, *defs.values()):
        _nullable(obj)
    # exactly one of run_script / run_command (a model validator, invisible to pydantic's schema)
    defs["Job"]["oneOf"] = [
        {"required": [key], "properties": {key: {"type": "string", "pattern": r"\S"}}}
        for key in ("run_script", "run_command")
    ]
    for key, why in IGNORED_GLOBAL_KEYS.items():
        schema["properties"][key] = {
            "deprecated": True,
            "description": f"Accepted from the predecessor, ignored: {why}.",
        }
    schema["title"] = TITLE
    return {"$schema": SCHEMA_DIALECT, **schema}


def render() -> str:
    return json.dumps(config_schema(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
