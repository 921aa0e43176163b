"""Benchmark: how long a large parameter sweep takes to validate (load, expand the matrix, check files, hash).

Run from the repository root:

    .venv/bin/python bench/matrix.py                  # a 100 x 100 grid: 10,000 jobs
    .venv/bin/python bench/matrix.py --side 300       # 90,000 jobs

It writes a config with one script and one job whose matrix is a SIDE x SIDE grid into a temporary
directory, then times ``resolve_batch`` (what ``cloudsend validate`` and ``cloudsend plan`` do before printing),
best of three runs, in this process (the CLI's own start-up, imports included, is not counted).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from cloudsend_prefect.resolve import resolve_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=100, help="values per parameter (the grid has SIDE^2 points)")
    args = parser.parse_args()
    values = list(range(args.side))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "fit.py").write_text("import sys\nprint(sys.argv)\n")
        config = folder / "sweep.yaml"
        config.write_text(
            "instances: [{cpus: 8}]\n"
            "jobs:\n"
            "  - run_script: fit.py --lr {lr} --seed {seed}\n"
            f"    matrix: {{lr: {values}, seed: {values}}}\n"
            "    output_files: [model.json]\n"
        )
        times = []
        for _ in range(3):
            started = time.perf_counter()
            jobs = resolve_batch(config).jobs
            times.append(time.perf_counter() - started)
    print(f"{len(jobs)} jobs from a {args.side}x{args.side} grid: validated in {min(times):.3f} s (best of 3)")


if __name__ == "__main__":
    main()
