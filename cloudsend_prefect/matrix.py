"""Parameter sweeps: a job's ``matrix`` expanded into one plain job per point.

A matrix is either a grid (``{lr: [0.1, 0.01], depth: [3, 5]}``: every combination, in the order written,
the last parameter varying fastest) or an explicit list of points (``[{lr: 0.1, depth: 3}, ...]``). Each
point becomes a job of its own: ``{param}`` in ``run_script``, ``run_command``, ``args``, ``name``,
``upload_files``, ``input_files`` and ``output_files`` is replaced by the point's value, so every point has
its own command line, hence its own hash, results folder and cache entry. A point is named ``<name>-lr=0.1,
depth=3`` (its job's name or script stem, then its values), or by the job's ``name`` when that has
placeholders; in a name, characters other than letters, digits and ``_.+=-`` become ``_``.

Values reach the job literally, never through a shell's parsing: in ``run_command`` (a shell line) a
placeholder becomes one quoted shell word; in ``run_script`` (split into words) and ``args`` it is part of one
argument. Only ``{name}`` for a parameter of the matrix is a placeholder; other braces (``${HOME}``, awk's
``{print $1}``) are left alone.
"""

from __future__ import annotations

import itertools
import re
import shlex
from collections.abc import Iterator, Mapping

from cloudsend_prefect.config import Job, MatrixValue

# What a generated name keeps of a value: anything else becomes '_' (a name is one path component).
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.+=-]+")


def text(value: MatrixValue) -> str:
    """A value as it appears in a command and a name: ``true``/``false`` for booleans, as YAML writes them."""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def points(job: Job) -> Iterator[dict[str, MatrixValue]]:
    """The matrix's points in order: the grid's combinations, or the listed points."""
    if job.matrix is None:
        yield {}
    elif isinstance(job.matrix, list):
        yield from job.matrix
    else:
        keys = list(job.matrix)
        for combination in itertools.product(*job.matrix.values()):
            yield dict(zip(keys, combination, strict=True))


def parameters(job: Job) -> list[str]:
    """The matrix's parameter names (a list of points has the same names in every point)."""
    if job.matrix is None:
        return []
    return list(job.matrix[0] if isinstance(job.matrix, list) else job.matrix)


def placeholder_pattern(names: list[str]) -> re.Pattern[str]:
    """What matches ``{name}`` for each parameter name (and no other braces)."""
    return re.compile("|".join(re.escape("{" + name + "}") for name in names))


def unused(job: Job) -> list[str]:
    """Parameters that change nothing the job runs: every point would be the same job."""
    where = [job.run_script or "", job.run_command or "", *job.args, *job.upload_files, *job.input_files]
    return [name for name in parameters(job) if not any("{" + name + "}" in part for part in where)]


def expand(job: Job, base_name: str) -> Iterator[Job]:
    """One job per point of the job's matrix, placeholders replaced (the job itself without a matrix).

    Args:
        job: The job, its matrix checked by the config (``config.check_matrix``).
        base_name: What a point's name is built from when the job's own ``name`` has no placeholder
            (``<base>-lr=0.1,depth=3``).

    Yields:
        Plain jobs (no matrix), in the matrix's order.
    """
    if job.matrix is None:
        yield job
        return
    names = parameters(job)
    pattern = placeholder_pattern(names)
    named = job.name is not None and pattern.search(job.name) is not None
    # run_script is split into words once, before values go in, so that a value with spaces or quotes stays
    # one argument: its path stays run_script, its arguments go in front of `args` (the same command line).
    words = _words(job.run_script)
    script, args = (words[0], words[1:] + job.args) if words else (None, job.args)
    for point in points(job):
        values = {"{" + k + "}": text(v) for k, v in point.items()}

        def fill(part: str, values: Mapping[str, str] = values) -> str:
            return pattern.sub(lambda m: values[m.group(0)], part)

        def quoted(part: str, values: Mapping[str, str] = values) -> str:
            return pattern.sub(lambda m: shlex.quote(values[m.group(0)]), part)

        safe = {k: _NAME_UNSAFE.sub("_", v) for k, v in values.items()}
        if named:
            name = fill(job.name or "", safe)
        else:
            name = f"{base_name}-" + ",".join(f"{k}={safe['{' + k + '}']}" for k in names)
        update: dict[str, object] = {
            "matrix": None,
            "name": name,
            "args": [fill(arg) for arg in args],
            "upload_files": [fill(f) for f in job.upload_files],
            "input_files": [fill(f) for f in job.input_files],
            "output_files": [fill(f) for f in job.output_files],
        }
        if script is not None:
            update["run_script"] = shlex.quote(fill(script))
        if job.run_command:  # a shell line: each value one quoted word
            update["run_command"] = quoted(job.run_command)
        yield job.model_copy(update=update)


def _words(script: str | None) -> list[str]:
    """``run_script``'s words; none when it cannot be split (specs reports that, with the field)."""
    try:
        return shlex.split(script or "")
    except ValueError:
        return []
