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

from cloudsend_prefect.config import IGNORED_GLOBAL_KEYS, RETIRED_INSTANCE_KEY, RETIRED_INSTANCE_WHY, BatchConfig

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
    defs["InstanceType"]["properties"][RETIRED_INSTANCE_KEY] = {
        "deprecated": True,
        "description": f"Accepted from the predecessor, ignored: {RETIRED_INSTANCE_WHY}.",
    }
    defs["Job"]["examples"] = JOB_EXAMPLES
    schema["title"] = TITLE
    schema["examples"] = [CONFIG_EXAMPLE]
    return {"$schema": SCHEMA_DIALECT, **schema}


# One of each kind of job, shown by editors on hover and offered on completion.
JOB_EXAMPLES: list[dict[str, Any]] = [
    {"run_command": "echo hello > hello.txt", "output_files": ["hello.txt"]},
    {
        "name": "analyse",
        "run_script": "analyse.py --scale 2",
        "args": ["sample A"],
        "env_name": "sci",
        "upload_files": ["data/input.csv"],
        "output_files": ["stats.json"],
        "cpus_req": 2,
        "timeout": 3600,
        "max_retries": 1,
    },
    {"run_script": "simulate.sh", "repeat": 10, "output_files": ["run.log"], "expected_duration": 60},
    {
        "run_script": "train.py --lr {lr} --depth {depth}",
        "matrix": {"lr": [0.1, 0.01, 0.001], "depth": [3, 5]},
        "output_files": ["model.json"],
    },
    {
        "name": "fit-{sample}",
        "run_command": "python3 fit.py {sample} > fit.txt",
        "upload_files": ["fit.py", "data/{sample}.csv"],
        "matrix": [{"sample": "a"}, {"sample": "b"}],
        "output_files": ["fit.txt"],
    },
]
CONFIG_EXAMPLE: dict[str, Any] = {
    "project": "demo",
    "provider": "local",
    "instances": [{"cpus": 4}],
    "environments": [{"name": "sci", "env_pypi": ["numpy"]}],
    "jobs": JOB_EXAMPLES[:2],
}

STARTER = """\
# yaml-language-server: $schema={schema}
# A cloudsend batch: where jobs run (instances), what with (environments), what (jobs).
# `cloudsend validate` checks it, `cloudsend plan` shows where jobs would run, `cloudsend run` runs them.
# Outputs land in ./cloudsend-results/<project>/<job>/, with each job's stdout.log and stderr.log.
project: starter              # names the batch and its results folder
provider: local               # local (this machine) | ssh (your servers) | aws (EC2 instances it creates)

instances:
  - cpus: 2                   # CPU slots on this machine that jobs are packed into
  # - {{provider: ssh, host: lab1.example.org, user: alice, key_file: ~/.ssh/id_ed25519, cpus: 16}}
  # - {{provider: aws, type: c6i.xlarge, region: eu-west-1, number: 2}}

environments:                 # built once per host, reused while unchanged
  - name: base
    command: python3 --version   # setup commands (or a setup.sh file), run first
  # - {{name: sci, env_pypi: [numpy]}}   # a venv with pip packages (or a requirements.txt file)

jobs:
  # Any shell command; output_files are fetched back when the job ends.
  - name: hello
    run_command: echo "hello from $(hostname)" > hello.txt
    output_files: [hello.txt]

  # A parameter sweep: one job per point of the grid ({{n}} is replaced by each value), each with its own
  # name (square-n=1...), results folder and cache entry. A list of points works too:
  #   matrix: [{{n: 1}}, {{n: 5}}]
  - name: "square-{{n}}"
    run_command: python3 -c "print({{n}} ** 2)" > square.txt
    env_name: base
    matrix: {{n: [1, 2, 3]}}
    output_files: [square.txt]

  # A script with arguments, uploads and 2 CPUs (paths are relative to this file):
  # - run_script: analyse.py --scale 2 "sample A"
  #   upload_files: [data/input.csv]
  #   output_files: [stats.json]
  #   cpus_req: 2
  #   repeat: 3                 # three copies: analyse-1, analyse-2, analyse-3
  #   timeout: 3600             # seconds
"""


def starter_config(schema: str) -> str:
    """The commented starter config ``cloudsend init`` writes: it runs as is on this machine."""
    return STARTER.format(schema=schema)


def render() -> str:
    """The schema as the committed ``cloudsend.schema.json`` holds it (and ``cloudsend init`` writes it)."""
    return json.dumps(config_schema(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
