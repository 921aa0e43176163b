"""``cloudsend``: run, check and watch batches from a terminal. Every command reads the same config file."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Task as RichTask
from rich.table import Table
from rich.text import Text

from cloudsend_prefect import controller_cli, providers, reporting
from cloudsend_prefect.config import BatchConfig
from cloudsend_prefect.errors import ConfigError
from cloudsend_prefect.providers import Connections
from cloudsend_prefect.resolve import Batch, resolve_batch
from cloudsend_prefect.results import BatchSummary, JobResult
from cloudsend_prefect.specs import JobSpec

if TYPE_CHECKING:
    from cloudsend_prefect.providers import PlannedHost
    from cloudsend_prefect.runtime import HostRuntime, JobStatus

app = typer.Typer(help="Run batches of scripts on local, SSH and EC2 hosts through Prefect.", no_args_is_help=True)
console = Console(stderr=True)
out = Console()

ConfigArg = Annotated[Path, typer.Argument(help="Config file: .yaml, .json, .toml or the predecessor's .py")]
ExecOpt = Annotated[
    bool,
    typer.Option("--exec-python-config", help="Run a .py config as Python (it may do anything) instead of reading it."),
]
BatchOpt = Annotated[str | None, typer.Option(help="Batch name (default: the project).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of a table.")]
ProjectOpt = Annotated[str | None, typer.Option(help="Project (default: the config's).")]
RegionOpt = Annotated[list[str] | None, typer.Option(help="Region(s) (default: the config's instance regions).")]
OptionalConfig = Annotated[
    Path | None, typer.Argument(help="Config file (.yaml, .json, .toml, .py); optional: see the options.")
]
IdsArg = Annotated[list[str] | None, typer.Option("--id", help="Only these instance ids (default: all).")]
CredsOpt = Annotated[str | None, typer.Option(help="AwsCredentials block to use.")]
RemoteOpt = Annotated[
    bool,
    typer.Option("--remote", help="Run on the controller (`cloudsend controller up`), as `maestro: remote` does."),
]
ProfileOpt = Annotated[str | None, typer.Option(help="AWS profile to use.")]

MAX_ROWS = 50  # rows of a job table in the terminal; the rest is counted, and `status` lists them
STATE_STYLE = {"done": "green", "failed": "red", "aborted": "red", "running": "cyan", "queued": "yellow"}


def _resolve(path: Path, allow_exec: bool) -> Batch:
    """The batch the config file describes, resolved once (``resolve.resolve_batch``), its notes printed; or
    exit 2 with the error (nothing has been created)."""
    try:
        batch = resolve_batch(path, allow_exec=allow_exec)
        providers.validate(batch.config)
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2) from None
    for note in batch.config.notes:
        console.print(f"[yellow]note:[/yellow] {escape(batch.config.source)}: {escape(note)}", highlight=False)
    return batch


def _load(path: Path, allow_exec: bool) -> tuple[BatchConfig, list[JobSpec]]:
    """The validated config and its jobs (see ``_resolve``), for the commands that look at them."""
    batch = _resolve(path, allow_exec)
    return batch.config, batch.jobs


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
def plan(
    config: ConfigArg,
    spot_prices: Annotated[
        bool,
        typer.Option("--spot-prices", help="Ask EC2 for current spot prices (the only AWS call plan makes)."),
    ] = False,
    exec_python_config: ExecOpt = False,
) -> None:
    """Show the hosts, where jobs would run and when (by expected_duration, else 1 s each), and what it would
    cost; nothing is created, and AWS is not contacted unless --spot-prices is given."""
    from cloudsend_prefect.planning import plan as simulate
    from cloudsend_prefect.planning import planned

    cfg, jobs = _load(config, exec_python_config)
    hosts = planned(cfg)
    placements = simulate(jobs, hosts)
    table = Table(title=f"plan for {cfg.project}: {len(jobs)} jobs on {len(hosts)} host(s)")
    for col in ("job", "host", "cpus", "env", "expected start (s)", "expected end (s)"):
        table.add_column(col)
    for job, place in list(zip(jobs, placements, strict=True))[:MAX_ROWS]:
        env = job.env.name if job.env else "-"
        table.add_row(escape(job.name), place.host, str(job.cpus), env, f"{place.start:g}", f"{place.end:g}")
    out.print(table)
    if len(jobs) > MAX_ROWS:  # a sweep of thousands: the count and the makespan say what matters
        out.print(f"… and {len(jobs) - MAX_ROWS} more jobs (the first {MAX_ROWS} are shown)")
    out.print("hosts: " + ", ".join(f"{h.name} ({h.cpus} CPUs{f', {h.gpus} GPUs' if h.gpus else ''})" for h in hosts))
    _plan_cost(cfg, hosts, max((p.end for p in placements), default=0.0), spot_prices)


def _plan_cost(cfg: BatchConfig, hosts: list[PlannedHost], seconds: float, live: bool) -> None:
    """The instances table: each instance type's hosts, their price and the cost of keeping them up for the
    simulated makespan (every host lives from provisioning to teardown)."""
    from cloudsend_prefect.providers.costs import billed_hours, estimate, usd

    quotes, notes = providers.quote(hosts, live=live)
    report = estimate([quotes[h.name] for h in hosts], seconds)
    by_name = {row.host: row for row in report.rows}
    table = Table(title=f"instances: estimated cost for {seconds:g} s of jobs")
    for col in ("hosts", "type", "vCPUs", "GiB", "count", "market", "$/h", "est. cost"):
        table.add_column(col, overflow="fold", justify="left" if col in ("hosts", "type", "market") else "right")
    bases = []
    for index in sorted({h.index for h in hosts}):
        group = [h for h in hosts if h.index == index]
        rows = [by_name[h.name] for h in group]
        first, row, quote = group[0], rows[0], quotes[group[0].name]
        names = first.name if len(group) == 1 else f"{first.name}..{group[-1].name}"
        if not quote.billed:
            table.add_row(names, first.provider, str(first.cpus), "-", str(len(group)), row.market, "-", "$0")
            continue
        costs = [r.cost for r in rows]
        table.add_row(
            names,
            quote.kind or "-",
            str(quote.vcpus) if quote.vcpus is not None else "?",
            f"{quote.memory_gib:g}" if quote.memory_gib is not None else "?",
            str(len(group)),
            row.market,
            usd(row.usd_per_hour) if row.usd_per_hour is not None else "?",
            usd(sum(c for c in costs if c is not None)) if None not in costs else "?",
        )
        bases.append(f"{quote.kind}: {row.basis}")
    out.print(table)
    if not report.billed_rows:
        out.print("cost: $0 (own machines)")
        return
    unknown = "" if report.complete else " (types not in the catalog are not counted)"
    out.print(
        f"estimated cost: {usd(report.total)}{unknown}: each instance billed for the jobs' makespan "
        f"({billed_hours(seconds):.4f} h; per second, 60 s minimum); boot and environment setup time, "
        "EBS disks and data transfer are not counted"
    )
    out.print("prices: " + "; ".join(dict.fromkeys(bases)), highlight=False)
    for note in notes:
        out.print(f"note: {note}", highlight=False)
    for h in hosts:
        if not h.cpus_known:
            console.print(f"[yellow]note:[/yellow] {h.name}: type {h.kind} is not in the catalog: planned as 1 CPU")


@app.command()
def run(
    config: ConfigArg,
    batch: BatchOpt = None,
    results_dir: Annotated[Path, typer.Option(help="Outputs go to RESULTS_DIR/<batch>/<job>/.")] = Path(
        "cloudsend-results"
    ),
    rerun: Annotated[bool, typer.Option(help="Run every job again, even those already done.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's logs.")] = False,
    remote: RemoteOpt = False,
    wait: Annotated[bool, typer.Option("--wait", help="With --remote: follow the run to its end.")] = False,
    results_bucket: Annotated[
        str | None, typer.Option(help="S3Bucket block: the results are also uploaded there, under <batch>/.")
    ] = None,
    exec_python_config: ExecOpt = False,
) -> None:
    """Run a batch through the `cloudsend` Prefect flow, with a progress bar; exit 1 if any job is not done.
    With --remote (or `maestro: remote`): submit it to the controller and return."""
    resolved = _resolve(config, exec_python_config)
    cfg, jobs = resolved.config, resolved.jobs
    if remote or cfg.maestro == "remote":
        from cloudsend_prefect.controller_cli import run_remote

        name = _batch_name(cfg, batch)
        run_remote(
            config,
            name,
            rerun=rerun,
            wait=wait,
            bucket=results_bucket,
            exec_python_config=exec_python_config,
            resolved=resolved,
        )
        return
    if not verbose:  # job failures (with their stderr tail) still show; the rest is in the UI
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "ERROR")
    # The ephemeral server this process may start should not phone home (and offline it only logs errors).
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Its 20 s default start-up limit is too short on a loaded 2-core machine (a raw traceback otherwise).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    from cloudsend_prefect.flow import run_batch

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task("jobs", total=len(jobs))
        failed = cached = 0

        def on_job(result: JobResult, total: int) -> None:
            nonlocal failed, cached
            failed += not result.ok
            cached += result.cached
            parts = [f"{failed} not done"] * bool(failed) + [f"{cached} cached"] * bool(cached)
            progress.update(bar, advance=1, description=f"jobs ({', '.join(parts)})" if parts else "jobs")

        try:
            summary = run_batch(
                resolved,  # the flow runs it as it is; its run records the parameters below
                listeners=[on_job],
                config=str(config),
                batch=batch,
                results_dir=str(results_dir),
                rerun=rerun,
                base_dir=None,
                exec_python_config=exec_python_config,
                results_bucket=results_bucket,
            )
        except KeyboardInterrupt:
            progress.stop()
            console.print(
                "[yellow]interrupted:[/yellow] the batch's jobs keep running on their hosts. "
                f"`cloudsend run {config}` again re-attaches to them (jobs already done are not run again); "
                f"`cloudsend cancel {config}` stops them; `cloudsend status {config}` shows where they are.",
                highlight=False,
            )
            raise typer.Exit(130) from None
    _print_summary(summary, config)
    if not summary.ok:
        raise typer.Exit(1)


class RateColumn(ProgressColumn):
    """Jobs ended per second, over the last moments (rich's own estimate)."""

    def render(self, task: RichTask) -> Text:
        """The rate, or ``-`` before rich has one."""
        return Text(f"{task.speed:.1f} jobs/s" if task.speed else "- jobs/s", style="progress.data.speed")


def _print_summary(summary: BatchSummary, config: Path) -> None:
    """A table a person can read whatever the batch's size: every job of a small batch, else only the jobs
    not done (at most ``MAX_ROWS``), then the counts per state."""
    shown = summary.jobs if len(summary.jobs) <= MAX_ROWS else [j for j in summary.jobs if not j.ok]
    if shown:
        title = f"batch {summary.batch}" if shown is summary.jobs else f"batch {summary.batch}: jobs not done"
        table = Table(title=title)
        for col in ("job", "state", "host", "duration", "reason / outputs"):
            table.add_column(col)
        for job in shown[:MAX_ROWS]:
            detail = reporting.reason(job) if not job.ok else reporting.outputs_text(job)
            state = _styled(job.state) + (" (cached)" if job.cached else "")
            duration = reporting.human_duration(job.duration)
            table.add_row(escape(job.name), state, job.host or "-", duration, escape(detail))
        out.print(table)
        if len(shown) > MAX_ROWS:
            out.print(f"… and {len(shown) - MAX_ROWS} more: `cloudsend status {config}`", highlight=False)
    counts = summary.counts
    cached = sum(job.cached for job in summary.jobs)
    text = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    out.print(f"{text}{f' ({cached} cached)' if cached else ''}; results in {summary.results_dir}/")
    if not summary.ok:
        out.print("logs of jobs not done: stderr.log in their results folder")


def _find_jobs(
    cfg: BatchConfig, batch: str, connections: Connections
) -> tuple[dict[str, tuple[str, JobStatus]], dict[str, HostRuntime]]:
    """Every job of the batch the hosts know, by key, with its host; one round trip per host."""
    from cloudsend_prefect.providers import provision_all
    from cloudsend_prefect.runtime import HostRuntime
    from cloudsend_prefect.transport import TransportError

    found: dict[str, tuple[str, JobStatus]] = {}
    runtimes = {}
    for host in provision_all(cfg, connections, create=False):
        runtime = HostRuntime.for_host(host, connections, watching=False)
        try:
            states = runtime.status(batch)
        except (TransportError, OSError) as exc:
            console.print(f"[yellow]{host.name}: unreachable: {escape(str(exc))}[/yellow]")
            continue
        runtimes[host.name] = runtime
        found.update({key: (host.name, st) for key, st in states.items()})
    return found, runtimes


def _batch_name(cfg: BatchConfig, batch: str | None) -> str:
    from cloudsend_prefect.flow import batch_slug

    return batch_slug(batch or cfg.project)


def _select(jobs: list[JobSpec], names: list[str]) -> list[JobSpec]:
    known = {job.name: job for job in jobs}
    unknown = [n for n in names if n not in known]
    if unknown:
        console.print(f"[red]error:[/red] no job named {escape(', '.join(unknown))} (jobs: {escape(', '.join(known))})")
        raise typer.Exit(2)
    return [known[n] for n in names]


def _json(data: object) -> None:
    out.print_json(json.dumps(data), highlight=False)


@app.command()
def status(
    config: OptionalConfig = None,
    batch: BatchOpt = None,
    project: Annotated[str | None, typer.Option(help="Without a config: only this project's batches.")] = None,
    as_json: JsonOpt = False,
    remote: RemoteOpt = False,
    exec_python_config: ExecOpt = False,
) -> None:
    """Show the state of every job of a batch. With a config: read from its hosts (one round trip per host).
    Without: from what this machine recorded as batches ran (every batch, or one with --batch).
    With --remote (or `maestro: remote`): from the Prefect API, the controller's run of it."""
    if config is None:
        _recorded_status(batch, project, as_json)
        return
    cfg, jobs = _load(config, exec_python_config)
    name = _batch_name(cfg, batch)
    if remote or cfg.maestro == "remote":
        from cloudsend_prefect.controller_cli import status_remote

        status_remote(config, jobs, name, as_json)
        return
    with Connections() as connections:
        found, _ = _find_jobs(cfg, name, connections)
    rows: list[dict[str, Any]] = []
    for job in jobs:
        host_name, st = found.get(job.key, (None, None))
        rows.append(
            {
                "job": job.name,
                "key": job.key,
                "state": st.state if st else "not started",
                "host": host_name,
                "exit": st.exit if st else None,
                "start": st.start if st else None,
                "duration": st.duration if st else None,
                "reason": st.reason if st else "",
            }
        )
    if as_json:
        _json({"batch": name, "project": cfg.project, "jobs": rows})
        return
    table = Table(title=f"batch {name}")
    for col in ("job", "state", "host", "exit", "duration", "reason"):
        table.add_column(col)
    for row in rows:
        exit_code = "-" if row["exit"] is None else str(row["exit"])
        table.add_row(
            escape(row["job"]),
            _styled(row["state"]),
            row["host"] or "-",
            exit_code,
            reporting.human_duration(row["duration"]),
            escape(row["reason"]),
        )
    out.print(table)


def _recorded_status(batch: str | None, project: str | None, as_json: bool) -> None:
    """``status`` without a config: the batches this machine ran (from their joblogs), or one batch's jobs."""
    from cloudsend_prefect import joblog

    if batch is not None:
        rows = joblog.recorded_jobs(batch)
        if rows is None:
            console.print(f"[red]error:[/red] no batch {escape(batch)} recorded on this machine")
            raise typer.Exit(1)
        if as_json:
            _json({"batch": batch, "jobs": rows})
            return
        table = Table(title=f"batch {batch} (as recorded on this machine)")
        for col in ("job", "state", "host", "exit", "start", "duration"):
            table.add_column(col)
        for row in rows:
            table.add_row(
                escape(row["job"]),
                _styled(row["state"].split()[0]) + row["state"].removeprefix(row["state"].split()[0]),
                escape(row["host"] or "-"),
                "-" if row["exit"] is None else str(row["exit"]),
                reporting.utc(row["start"]),
                reporting.human_duration(row["duration"]),
            )
        out.print(table)
        return
    batches = [b for b in joblog.recorded_batches() if project is None or b["project"] == project]
    if as_json:
        _json(batches)
        return
    if not batches:
        out.print("no batch recorded on this machine" + (f" for project {project}" if project else ""))
        return
    table = Table(title="batches run from this machine")
    for col in ("batch", "project", "jobs", "ended", "done", "not done", "cached", "last ended", "results"):
        table.add_column(col)
    for b in batches:
        table.add_row(
            escape(b["batch"]),
            escape(b["project"]),
            str(b["jobs"]),
            str(b["ended"]),
            str(b["done"]),
            str(b["not_done"]),
            str(b["cached"]),
            reporting.utc(b["last_ended"]),
            escape(b["results_dir"]),
        )
    out.print(table)


@app.command()
def logs(
    config: ConfigArg,
    job: Annotated[str, typer.Argument(help="Job name, as in `cloudsend status`.")],
    stderr: Annotated[bool, typer.Option("--stderr", help="Show stderr instead of stdout.")] = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")] = False,
    batch: BatchOpt = None,
    remote: RemoteOpt = False,
    exec_python_config: ExecOpt = False,
) -> None:
    """Print a job's stdout (or stderr) from its host; --follow tails it live. With --remote (or `maestro:
    remote`): what its task run logged, from the Prefect API."""
    cfg, jobs = _load(config, exec_python_config)
    (spec,) = _select(jobs, [job])
    name = _batch_name(cfg, batch)
    if remote or cfg.maestro == "remote":
        from cloudsend_prefect.controller_cli import logs_remote

        logs_remote(spec, name)
        return
    with Connections() as connections:
        _print_log(cfg, spec, name, stderr, follow, *_find_jobs(cfg, name, connections))


def _print_log(
    cfg: BatchConfig,
    spec: JobSpec,
    name: str,
    stderr: bool,
    follow: bool,
    found: dict[str, tuple[str, JobStatus]],
    runtimes: dict[str, HostRuntime],
) -> None:
    """Print a job's log from the host that has it (``logs``), following it to the job's end when asked."""
    job = spec.name
    if spec.key not in found:
        console.print(f"[red]error:[/red] job {escape(job)} has not started on any host of batch {name}")
        raise typer.Exit(1)
    host, st = found[spec.key]
    runtime, stream, offset = runtimes[host], "stderr" if stderr else "stdout", 0
    sink = sys.stdout.buffer
    while True:
        # Chunk by chunk, as bytes: constant memory whatever the log's size, and exact offsets.
        while chunk := runtime.read_log(name, spec.key, stream, offset):
            sink.write(chunk)
            offset += len(chunk)
        sink.flush()
        if not follow or st.final:
            break
        time.sleep(cfg.poll_interval)
        st = runtime.status(name, [spec.key]).get(spec.key, st)
    if follow:
        console.print(f"[dim]{escape(job)}: {_styled(st.state)} {escape(st.reason)}[/dim]")


@app.command()
def cancel(
    config: ConfigArg,
    jobs: Annotated[list[str] | None, typer.Argument(help="Job names; none means every job of the batch.")] = None,
    every_batch: Annotated[bool, typer.Option("--all", help="Cancel every job of every batch on the hosts.")] = False,
    batch: BatchOpt = None,
    remote: RemoteOpt = False,
    exec_python_config: ExecOpt = False,
) -> None:
    """Cancel jobs: queued ones are dropped, running ones have their process group killed. With --remote (or
    `maestro: remote`): the controller's flow run of the batch is cancelled, and with it every job."""
    from cloudsend_prefect.providers import provision_all
    from cloudsend_prefect.runtime import HostRuntime

    cfg, specs = _load(config, exec_python_config)
    if remote or cfg.maestro == "remote":
        from cloudsend_prefect.controller_cli import cancel_remote

        cancel_remote(_batch_name(cfg, batch), jobs or [])
        return
    name = "*" if every_batch else _batch_name(cfg, batch)
    keys = [s.key for s in _select(specs, jobs or [])]
    names = {s.key: s.name for s in specs}
    with Connections() as connections:
        for host in provision_all(cfg, connections, create=False):
            cancelled = HostRuntime.for_host(host, connections, watching=False).cancel(name, keys)
            for key in cancelled:
                out.print(f"{host.name}: cancelled {escape(names.get(key, key))}")


@app.command()
def down(
    config: Annotated[Path | None, typer.Argument(help="Config file naming the project (or use --project).")] = None,
    project: Annotated[str | None, typer.Option(help="Project to remove (default: the config's).")] = None,
    region: RegionOpt = None,
    aws_credentials: CredsOpt = None,
    profile: ProfileOpt = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    exec_python_config: ExecOpt = False,
) -> None:
    """Remove everything a project created on AWS (instances, security group, key pair), found by its tags."""
    cfg = _project_config(config, project, exec_python_config, aws_credentials=aws_credentials, profile=profile)
    names = providers.project_providers(cfg, from_file=config is not None, creating=True)
    where = ", ".join(r or "the default region" for r in providers.places(cfg, names, region))
    if not yes and not typer.confirm(f"Terminate every instance of project {cfg.project} in {where}?"):
        raise typer.Exit(1)
    removed = providers.down(cfg, names, region)
    for item in removed:
        out.print(f"removed {item}")
    out.print(f"project {cfg.project}: {len(removed)} resource(s) removed" if removed else "nothing to remove")


def _project_config(
    config: Path | None,
    project: str | None,
    exec_python_config: bool,
    *,
    aws_credentials: str | None = None,
    profile: str | None = None,
) -> BatchConfig:
    """The config a fleet command acts on: the file's, or a bare one naming the project (AWS's default chain)."""
    if config is None and project is None:
        console.print("[red]error:[/red] give a config file or --project")
        raise typer.Exit(2)
    cfg = _load(config, exec_python_config)[0] if config else BatchConfig(project=project or "cloudsend")
    overrides = {"project": project, "aws_credentials": aws_credentials, "profile": profile}
    return cfg.model_copy(update={k: v for k, v in overrides.items() if v is not None})


@app.command()
def instances(
    config: OptionalConfig = None,
    project: ProjectOpt = None,
    region: RegionOpt = None,
    aws_credentials: CredsOpt = None,
    profile: ProfileOpt = None,
    as_json: JsonOpt = False,
    exec_python_config: ExecOpt = False,
) -> None:
    """List the project's instances on every provider: state, address, uptime and what they cost so far
    (aws: found by the project's tag, priced from the catalog since their last start; an upper bound)."""
    from cloudsend_prefect.providers.costs import usd

    cfg = _project_config(config, project, exec_python_config, aws_credentials=aws_credentials, profile=profile)
    try:
        rows = providers.machines(cfg, providers.project_providers(cfg, from_file=config is not None), region)
    except Exception as exc:  # credentials, network, permissions: said in one line, not a traceback
        console.print(f"[red]error:[/red] aws: {escape(str(exc))}")
        raise typer.Exit(1) from None
    if as_json:
        _json({"project": cfg.project, "instances": rows})
        return
    table = Table(title=f"instances of project {cfg.project}")
    for col in ("provider", "name", "id", "type", "region", "state", "address", "uptime", "$/h", "so far"):
        table.add_column(col, justify="right" if col in ("uptime", "$/h", "so far") else "left", no_wrap=col == "id")
    for row in rows:
        price, cost = row.get("usd_per_hour"), row.get("usd_so_far")
        table.add_row(
            str(row["provider"]),
            escape(str(row.get("name") or "-")),
            str(row.get("id") or "-"),
            str(row.get("type") or "-"),
            str(row.get("region") or "-"),
            _styled(str(row["state"])),
            escape(str(row.get("address") or "-")),
            reporting.human_duration(row.get("uptime")),
            usd(price) if isinstance(price, float) else "-",
            usd(cost) if isinstance(cost, float) else "-",
        )
    out.print(table)
    total = sum(c for c in (row.get("usd_so_far") for row in rows) if isinstance(c, float))
    if any(providers.creates_hosts(row["provider"]) for row in rows):
        out.print(f"running aws instances so far: about {usd(total)} (catalog list prices since their last start)")


def _set_running(
    running: bool,
    config: Path | None,
    ids: list[str] | None,
    project: str | None,
    region: list[str] | None,
    aws_credentials: str | None,
    profile: str | None,
    exec_python_config: bool,
) -> None:
    cfg = _project_config(config, project, exec_python_config, aws_credentials=aws_credentials, profile=profile)
    names = providers.project_providers(cfg, from_file=config is not None, creating=True)
    if not names:
        console.print(f"[yellow]note:[/yellow] project {cfg.project} has no aws instance type: nothing to do")
        return
    try:
        changed = providers.set_running(cfg, names, region, running=running, ids=ids or None)
    except Exception as exc:
        console.print(f"[red]error:[/red] aws: {escape(str(exc))}")
        raise typer.Exit(1) from None
    verb = "starting" if running else "stopping"
    for instance_id in changed:
        out.print(f"{verb} {instance_id}")
    if not changed:
        out.print(f"nothing to {'start' if running else 'stop'} in project {cfg.project}")


@app.command()
def stop(
    config: OptionalConfig = None,
    ids: IdsArg = None,
    project: ProjectOpt = None,
    region: RegionOpt = None,
    aws_credentials: CredsOpt = None,
    profile: ProfileOpt = None,
    exec_python_config: ExecOpt = False,
) -> None:
    """Stop the project's aws instances (their disks stay, and keep costing a little; the next run starts
    them again). Spot instances cannot be stopped: `cloudsend down` removes them."""
    _set_running(False, config, ids, project, region, aws_credentials, profile, exec_python_config)


@app.command()
def start(
    config: OptionalConfig = None,
    ids: IdsArg = None,
    project: ProjectOpt = None,
    region: RegionOpt = None,
    aws_credentials: CredsOpt = None,
    profile: ProfileOpt = None,
    exec_python_config: ExecOpt = False,
) -> None:
    """Start the project's stopped aws instances (each stops itself again after `idle_minutes` without a job)."""
    _set_running(True, config, ids, project, region, aws_credentials, profile, exec_python_config)


@app.command()
def prune(
    config: OptionalConfig = None,
    older_than: Annotated[
        str, typer.Option(help="Age of what is removed: 30m, 12h, 7d, 2w (a plain number is days).")
    ] = "7d",
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Remove what is listed (default: only list it).")] = False,
    as_json: JsonOpt = False,
    exec_python_config: ExecOpt = False,
) -> None:
    """List (and with --yes remove) what old batches left: stored outputs and cached results on this machine,
    and, with a config, the records of ended jobs on its hosts. Jobs not ended, and batches running now, are
    never touched; a pruned job runs again at its batch's next run."""
    from cloudsend_prefect import pruning

    try:
        age = pruning.parse_age(older_than)
    except ValueError as exc:
        console.print(f"[red]error:[/red] --older-than: {escape(str(exc))}")
        raise typer.Exit(2) from None
    with Connections() as connections:
        _prune(config, older_than, age, yes, as_json, exec_python_config, connections)


def _prune(
    config: Path | None,
    older_than: str,
    age: float,
    yes: bool,
    as_json: bool,
    exec_python_config: bool,
    connections: Connections,
) -> None:
    """``prune``, with the command's connections to the hosts."""
    from cloudsend_prefect import pruning
    from cloudsend_prefect.providers import provision_all

    items = pruning.client_items(age)
    hosts = {}
    if config is not None:
        cfg, _ = _load(config, exec_python_config)
        for host in provision_all(cfg, connections, create=False):
            try:
                items += pruning.host_items(host, age, connections)
                hosts[host.name] = host
            except Exception as exc:  # unreachable, stopped: its jobs stay, the rest goes on
                console.print(f"[yellow]{host.name}: skipped: {escape(str(exc))}[/yellow]")
    total = sum(item.size for item in items)
    if as_json:
        _json({"removed": yes, "bytes": total, "items": [vars(item) for item in items]})
    else:
        table = Table(title=f"older than {older_than}: {len(items)} item(s), {_size(total)}")
        for col in ("where", "what", "path", "age", "size"):
            table.add_column(col, justify="right" if col in ("age", "size") else "left")
        for item in items[:MAX_ROWS]:
            age_text = reporting.human_duration(item.age)
            table.add_row(item.where, item.kind, escape(item.path), age_text, _size(item.size))
        out.print(table)
        if len(items) > MAX_ROWS:
            out.print(f"… and {len(items) - MAX_ROWS} more (--json lists all)")
    if not yes:
        if items and not as_json:
            out.print(f"dry run: nothing removed; `--yes` removes these ({_size(total)})")
        return
    freed = pruning.remove(items, hosts, connections)
    if not as_json:
        out.print(f"removed {len(items)} item(s), {_size(freed)} freed")


def _size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    return f"{size} B"


@app.command()
def init(
    path: Annotated[Path, typer.Argument(help="The config file to write.")] = Path("cloudsend.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Replace the file if it exists.")] = False,
) -> None:
    """Write a commented starter config (runs as is on this machine), and the JSON Schema beside it for editors."""
    from cloudsend_prefect.schema import render, starter_config

    if path.exists() and not force:
        console.print(f"[red]error:[/red] {escape(str(path))} exists (--force replaces it)")
        raise typer.Exit(1)
    schema = path.parent / "cloudsend.schema.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(starter_config(schema.name), encoding="utf-8")
    schema.write_text(render(), encoding="utf-8")
    out.print(f"wrote {path} and {schema}; try `cloudsend validate {path}` then `cloudsend run {path}`")


# The controller instance and remote batches (controller_cli.py).
app.add_typer(controller_cli.app, name="controller")
app.command()(controller_cli.fetch)

if __name__ == "__main__":
    app()
