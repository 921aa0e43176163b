"""``cloudsend``: run, check and watch batches from a terminal. Every command reads the same config file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cloudsend_prefect.config import BatchConfig
from cloudsend_prefect.loading import ConfigError, load_config
from cloudsend_prefect.specs import JobSpec, expand_jobs

app = typer.Typer(help="Run batches of scripts on local, SSH and EC2 hosts through Prefect.", no_args_is_help=True)
console = Console(stderr=True)
out = Console()

ConfigArg = Annotated[Path, typer.Argument(help="Config file: .yaml, .json, .toml or the predecessor's .py")]
ExecOpt = Annotated[
    bool,
    typer.Option("--exec-python-config", help="Run a .py config as Python (it may do anything) instead of reading it."),
]
BatchOpt = Annotated[str | None, typer.Option(help="Batch name (default: the project).")]

STATE_STYLE = {"done": "green", "failed": "red", "aborted": "red", "running": "cyan", "queued": "yellow"}


def _load(path: Path, allow_exec: bool) -> tuple[BatchConfig, list[JobSpec]]:
    """The validated config and its jobs, or exit 2 with the error (nothing has been created)."""
    try:
        config = load_config(path, allow_exec=allow_exec)
        jobs = expand_jobs(config)
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    for note in config.notes:
        console.print(f"[yellow]note:[/yellow] {config.source}: {note}", highlight=False)
    return config, jobs


def _styled(state: str) -> str:
    return f"[{STATE_STYLE.get(state, 'white')}]{state}[/]"


@app.command()
def validate(config: ConfigArg, exec_python_config: ExecOpt = False) -> None:
    """Check a config (keys, types, links, files) without starting anything."""
    cfg, jobs = _load(config, exec_python_config)
    envs = {job.env.key for job in jobs if job.env}
    out.print(
        f"[green]ok[/green]: {config}: {len(cfg.instances)} instance type(s), "
        f"{len(cfg.environments)} environment(s) ({len(envs)} used), {len(jobs)} job run(s)"
    )


@app.command()
def plan(config: ConfigArg, exec_python_config: ExecOpt = False) -> None:
    """Show where jobs would run and when (by expected_duration, else 1 s each); nothing is started."""
    from cloudsend_prefect.planning import plan as simulate
    from cloudsend_prefect.planning import planned_hosts

    cfg, jobs = _load(config, exec_python_config)
    hosts = planned_hosts(cfg)
    table = Table(title=f"plan for {cfg.project}: {len(jobs)} jobs on {len(hosts)} host(s)")
    for col in ("job", "host", "cpus", "env", "expected start (s)", "expected end (s)"):
        table.add_column(col)
    for job, place in zip(jobs, simulate(jobs, hosts), strict=True):
        env = job.env.name if job.env else "-"
        table.add_row(job.name, place.host, str(job.cpus), env, f"{place.start:g}", f"{place.end:g}")
    out.print(table)
    out.print("hosts: " + ", ".join(f"{name} ({cpus} CPUs)" for name, cpus in hosts.items()))


@app.command()
def run(
    config: ConfigArg,
    batch: BatchOpt = None,
    results_dir: Annotated[Path, typer.Option(help="Outputs go to RESULTS_DIR/<batch>/<job>/.")] = Path(
        "cloudsend-results"
    ),
    rerun: Annotated[bool, typer.Option(help="Run every job again, even those already done.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's logs.")] = False,
    exec_python_config: ExecOpt = False,
) -> None:
    """Run a batch through the `cloudsend` Prefect flow, with a progress bar; exit 1 if any job is not done."""
    _, jobs = _load(config, exec_python_config)
    if not verbose:  # job failures (with their stderr tail) still show; the rest is in the UI
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "ERROR")
    # The ephemeral server this process may start should not phone home (and offline it only logs errors).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from cloudsend_prefect.flow import cloudsend, job_listeners

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("jobs", total=len(jobs))
        failed = 0

        def on_job(result: object, total: int) -> None:
            nonlocal failed
            failed += getattr(result, "state", "") != "done"
            progress.update(bar, advance=1, description=f"jobs ({failed} not done)" if failed else "jobs")

        job_listeners.append(on_job)
        try:
            summary = cloudsend(
                config=str(config), batch=batch, results_dir=str(results_dir), rerun=rerun, base_dir=None
            )
        finally:
            job_listeners.remove(on_job)
    table = Table(title=f"batch {summary.batch}")
    for col in ("job", "state", "host", "exit", "duration (s)", "reason / outputs"):
        table.add_column(col)
    for job in summary.jobs:
        detail = job.reason if not job.ok else ", ".join(job.outputs)
        duration = f"{job.duration:.2f}" if job.duration is not None else "-"
        exit_code = str(job.exit_code) if job.exit_code is not None else "-"
        table.add_row(job.name, _styled(job.state), job.host or "-", exit_code, duration, detail)
    out.print(table)
    counts = ", ".join(f"{n} {state}" for state, n in sorted(summary.counts.items()))
    out.print(f"{counts}; results in {summary.results_dir}/")
    if not summary.ok:
        out.print("logs of jobs not done: stderr.log in their results folder")
        raise typer.Exit(1)


@app.command()
def status(config: ConfigArg, batch: BatchOpt = None, exec_python_config: ExecOpt = False) -> None:
    """Show the state of every job of a batch, read from its hosts (one round trip per host)."""
    from cloudsend_prefect.flow import batch_slug
    from cloudsend_prefect.providers import connect, disconnect, provision_all
    from cloudsend_prefect.runtime import HostRuntime
    from cloudsend_prefect.transport import TransportError

    cfg, jobs = _load(config, exec_python_config)
    name = batch_slug(batch or cfg.project)
    hosts = provision_all(cfg, create=False)
    found = {}
    try:
        for host in hosts:
            try:
                states = HostRuntime(connect(host), host.base_dir, host.cpus).status(name)
            except (TransportError, OSError) as exc:
                console.print(f"[yellow]{host.name}: unreachable: {exc}[/yellow]")
                continue
            found.update({key: (host.name, st) for key, st in states.items()})
    finally:
        disconnect(hosts)
    table = Table(title=f"batch {name}")
    for col in ("job", "state", "host", "exit", "duration (s)", "reason"):
        table.add_column(col)
    for job in jobs:
        host_name, st = found.get(job.key, ("-", None))
        if st is None:
            table.add_row(job.name, "not started", "-", "-", "-", "")
            continue
        duration = f"{st.duration:.2f}" if st.duration is not None else "-"
        exit_code = str(st.exit) if st.exit is not None else "-"
        table.add_row(job.name, _styled(st.state), host_name, exit_code, duration, st.reason)
    out.print(table)


if __name__ == "__main__":
    app()
