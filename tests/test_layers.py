"""The package's import graph, read from the source: no circles, and every import between layers goes down.

The layers, top to bottom (docs/architecture.md draws them): cli -> flow -> tasks -> dispatch -> runtime ->
providers -> transport -> config. Modules of one layer may import each other (without a circle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import cloudsend_prefect

PACKAGE = Path(cloudsend_prefect.__file__).parent

LAYERS: list[tuple[str, set[str]]] = [
    ("cli", {"cli", "controller_cli", "remote", "cloudsend_prefect"}),
    ("flow", {"flow", "controller", "block", "fleet", "running"}),
    ("tasks", {"tasks", "reporting", "joblog", "pruning", "results"}),
    ("dispatch", {"dispatch", "planning", "placement"}),
    ("runtime", {"runtime"}),
    ("providers", {"providers"}),
    ("transport", {"transport"}),
    (
        "config",
        {
            "config",
            "specs",
            "loading",
            "resolve",
            "matrix",
            "errors",
            "hashing",
            "naming",
            "paths",
            "buckets",
            "bundle",
            "schema",
            "protocol",
        },
    ),
]


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports (at any depth of its code, lazily or not)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    deps: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            named = {f"{module}.{alias.name}" for alias in node.names} & known.keys()
            deps |= named or {module}
        elif isinstance(node, ast.Import):
            deps |= {alias.name for alias in node.names}
    return {d for d in deps if d in known and d != name}


def layer_of(name: str) -> int:
    parts = name.split(".")
    top = parts[1] if len(parts) > 1 else parts[0]
    for rank, (_, members) in enumerate(LAYERS):
        if top in members:
            return rank
    raise AssertionError(f"{name} is in no layer: add it to LAYERS and to docs/architecture.md")


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def upward(edges: dict[str, set[str]]) -> list[str]:
    return [
        f"{name} ({LAYERS[layer_of(name)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})"
        for name, deps in sorted(edges.items())
        for dep in sorted(deps)
        if layer_of(dep) < layer_of(name)
    ]


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    found: list[list[str]] = []
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        for dep in sorted(edges.get(name, ())):
            if dep in path:
                found.append([*path[path.index(dep) :], dep])
            elif dep not in done:
                visit(dep, [*path, dep])
        done.add(name)

    for name in sorted(edges):
        if name not in done:
            visit(name, [name])
    return found


def test_every_import_between_layers_goes_down() -> None:
    assert upward(graph()) == []


def test_there_are_no_import_circles() -> None:
    assert circles(graph()) == []


def test_the_checks_see_an_upward_import_and_a_circle(tmp_path: Path) -> None:
    """The checks would catch what they are for, as the package once had them: config importing the aws
    provider (upward), and config -> providers.aws -> providers.base -> config (a circle)."""
    source = tmp_path / "config.py"
    source.write_text("from cloudsend_prefect.providers import aws\nfrom .providers.base import HostInfo\n")
    known = dict.fromkeys(["cloudsend_prefect.providers.aws", "cloudsend_prefect.providers.base"], source)
    edges = {"cloudsend_prefect.config": imports("cloudsend_prefect.config", source, known)}
    assert edges["cloudsend_prefect.config"] == set(known)
    assert upward(edges) == [
        "cloudsend_prefect.config (config) imports cloudsend_prefect.providers.aws (providers)",
        "cloudsend_prefect.config (config) imports cloudsend_prefect.providers.base (providers)",
    ]
    edges |= {"cloudsend_prefect.providers.aws": {"cloudsend_prefect.providers.base"}}
    edges |= {"cloudsend_prefect.providers.base": {"cloudsend_prefect.config"}}
    assert circles(edges) == [
        [
            "cloudsend_prefect.config",
            "cloudsend_prefect.providers.aws",
            "cloudsend_prefect.providers.base",
            "cloudsend_prefect.config",
        ]
    ]
