"""``cloudsend controller up|status|down``, ``cloudsend fetch``, and the ``--remote`` forms of run, status, logs
and cancel: batches run by the controller instance, followed through the Prefect API."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cloudsend_prefect import controller, remote, reporting
from cloudsend_prefect.controller import ControllerError, load_settings
from cloudsend_prefect.errors import ConfigError
from cloudsend_prefect.resolve import Batch
from cloudsend_prefect.specs import JobSpec

app = typer.Typer(help="The controller instance: a small EC2 instance whose Prefect worker runs your batches.")
console = Console(stderr=True)
out = Console()

ProjectOpt = Annotated[str | None, typer.Option(help="The controller's project (default: the last `up`'s).")]
POLL = 2.0  # seconds between two looks at a remote run with --wait


def _errors() -> tuple[type[Exception], ...]:
    """What a controller command explains instead of a traceback (the aws provider's, imported when used)."""
    from cloudsend_prefect.providers.aws.session import AwsError

    return (ControllerError, ConfigError, AwsError, ValueError)


def _fail(exc: Exception, code: int = 1) -> typer.Exit:
    console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
    return typer.Exit(code)


@app.command()
def up(
    project: ProjectOpt = None,
    pool: Annotated[str | None, typer.Option(help="Process work pool its worker serves.")] = None,
    instance_type: Annotated[str | None, typer.Option("--type", help="EC2 instance type (default t3.micro).")] = None,
    region: Annotated[str | None, typer.Option(help="EC2 region (default: AWS's default one).")] = None,
    img_id: Annotated[str | None, typer.Option(help="Image (default: the latest Ubuntu LTS).")] = None,
    address: Annotated[str | None, typer.Option(help="How to reach it: public (default) or private.")] = None,
    idle_minutes: Annotated[float | None, typer.Option(help="Powered off after this long with no flow run.")] = None,
    ssh_from: Annotated[list[str] | None, typer.Option(help="CIDR allowed SSH (default: this machine's).")] = None,
    aws_credentials: Annotated[str | None, typer.Option(help="AwsCredentials block to use.")] = None,
    profile: Annotated[str | None, typer.Option(help="AWS profile to use.")] = None,
    api_key_secret: Annotated[
        str | None, typer.Option(help="Secret block holding the Prefect API key (default: PREFECT_API_KEY).")
    ] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", help="A variable of this shell the worker also gets (repeat).")
    ] = None,
) -> None:
    """Start the controller (create it, or start the stopped one), install this cloudsend there, run its worker,
    and point the deployment cloudsend/batch at its pool."""

    try:
        settings = load_settings(
            project=project,
            pool=pool,
            instance_type=instance_type,
            region=region,
            img_id=img_id,
            address=address,
            idle_minutes=idle_minutes,
            ssh_from=ssh_from,
            aws_credentials=aws_credentials,
            profile=profile,
            api_key_secret=api_key_secret,
            pass_env=env,
        )
        missing = [name for name in settings.pass_env if name not in os.environ]
        if missing:
            raise ControllerError(f"--env: not set in this shell: {', '.join(missing)}")
        _warn_if_loopback()
        started = time.monotonic()
        result = controller.up(settings, passed={name: os.environ[name] for name in settings.pass_env})
    except _errors() as exc:
        raise _fail(exc) from None
    from cloudsend_prefect.providers.aws.hosts import aws_data

    host = result.host
    how = "created" if result.created else "reused"
    out.print(
        f"controller {host.machine_id} ({how}, {aws_data(host).instance_type}) at {host.address}: "
        f"worker {result.worker} "
        f"serves work pool {settings.pool}; cloudsend {'installed' if result.installed else 'already installed'}; "
        f"deployment {remote.DEPLOYMENT} runs there ({time.monotonic() - started:.0f}s)",
        highlight=False,
    )
    out.print(
        f"idle guard: it powers off after {settings.idle_minutes:g} min with no flow run running; "
        "`cloudsend controller down` removes it",
        highlight=False,
    )


def _warn_if_loopback() -> None:
    """An API on this machine's loopback is the instance's own loopback there: its worker would find nothing."""
    from urllib.parse import urlsplit

    from prefect.settings import get_current_settings

    url = get_current_settings().api.url or ""
    if urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1"):
        console.print(
            f"[yellow]note:[/yellow] PREFECT_API_URL is {escape(url)}: on the instance that is the instance "
            "itself; give an address it can reach (Prefect Cloud, or your server's public or VPC address)",
            highlight=False,
        )


@app.command()
def status(project: ProjectOpt = None, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """The controller instance (state, address, uptime) and its worker's last heartbeat (from the Prefect API)."""
    from cloudsend_prefect.providers.aws.controller import controller_view

    settings = load_settings(project=project)
    try:
        view = controller_view(settings.batch_config())
        beats = controller.heartbeats(settings.pool)
    except _errors() as exc:
        raise _fail(exc) from None
    now = time.time()
    uptime = now - view.launched if view and view.launched and view.state == "running" else None
    row: dict[str, Any] = {
        "project": settings.project,
        "instance": view.instance_id if view else None,
        "type": view.instance_type if view else None,
        "state": view.state if view else "none",
        "address": view.address if view else None,
        "uptime_s": round(uptime) if uptime is not None else None,
        "pool": settings.pool,
        "workers": [
            {"name": b.worker, "status": b.status, "last_heartbeat": b.last.isoformat() if b.last else None}
            for b in beats
        ],
    }
    if as_json:
        out.print_json(data=row)
        return
    if view is None:
        out.print(f"no controller for project {settings.project}: `cloudsend controller up` makes one")
    else:
        out.print(
            f"controller {view.instance_id} ({view.instance_type}, {view.region}): {view.state}"
            f"{f' at {view.address}' if view.address else ''}"
            f"{f', up {reporting.human_duration(uptime)}' if uptime is not None else ''}",
            highlight=False,
        )
    if not beats:
        out.print(f"work pool {settings.pool}: no worker has reported")
    for beat in beats:
        ago = f"{now - beat.last.timestamp():.0f}s ago" if beat.last else "never"
        out.print(f"worker {beat.worker}: {beat.status}, last heartbeat {ago}", highlight=False)


@app.command()
def down(
    project: ProjectOpt = None,
    stop: Annotated[bool, typer.Option("--stop", help="Stop it (its disk and results kept) instead.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Terminate the controller instance (or stop it). Batches it was running keep their jobs on their hosts."""
    from cloudsend_prefect.providers.aws.controller import remove_controller

    settings = load_settings(project=project)
    what = "Stop" if stop else "Terminate (its results folder with it)"
    if not yes and not typer.confirm(f"{what} the controller of project {settings.project}?"):
        raise typer.Exit(1)
    try:
        removed = remove_controller(settings.batch_config(), terminate=not stop)
    except _errors() as exc:
        raise _fail(exc) from None
    if removed is None:
        out.print(f"no controller for project {settings.project}")
    else:
        out.print(f"{'stopped' if stop else 'terminated'} controller {removed}")


def fetch(
    batch: Annotated[str, typer.Argument(help="Batch name, as `cloudsend run --remote` printed it.")],
    to: Annotated[Path, typer.Option(help="Results go to TO/<batch>/.")] = Path("cloudsend-results"),
    project: ProjectOpt = None,
    bucket: Annotated[str | None, typer.Option(help="From this S3Bucket block instead (run --results-bucket).")] = None,
) -> None:
    """Copy a remote batch's results from the controller's disk (over SSH), or from a bucket."""
    from cloudsend_prefect import buckets, remote

    try:
        if bucket:
            copied = buckets.download(bucket, batch, to)
        else:
            copied = remote.fetch(load_settings(project=project), batch, to)
    except _errors() as exc:
        raise _fail(exc) from None
    out.print(f"{len(copied)} file(s) of batch {batch} in {to / batch}/", highlight=False)


# -- the --remote forms of run, status, logs and cancel (cli.py hands them over) ------------------------------
def run_remote(
    config: Path,
    batch: str,
    *,
    rerun: bool,
    wait: bool,
    bucket: str | None,
    exec_python_config: bool,
    resolved: Batch | None = None,
) -> None:
    """Submit the batch to the controller's deployment and return (or, with ``wait``, follow it to its end);
    ``resolved``: the batch ``config`` describes, already resolved by the caller (not read again)."""
    from cloudsend_prefect.bundle import pack

    try:
        bundle = pack(config, resolved=resolved, allow_exec=exec_python_config)
        settings = load_settings()
        if not any(b.status == "ONLINE" for b in controller.heartbeats(settings.pool)):
            console.print(
                f"[yellow]note:[/yellow] no worker online in pool {settings.pool}: the run waits for one "
                "(`cloudsend controller up`)",
                highlight=False,
            )
        flow_run = remote.submit(bundle, batch, rerun=rerun, bucket=bucket, exec_python_config=exec_python_config)
    except (ConfigError, ControllerError) as exc:
        raise _fail(exc, 2 if isinstance(exc, ConfigError) else 1) from None
    out.print(
        f"submitted batch {batch}: flow run {flow_run.name} ({flow_run.id}) of {remote.DEPLOYMENT}. "
        f"`cloudsend status {config} --remote` follows it; `cloudsend fetch {batch}` gets its results",
        highlight=False,
    )
    if not wait:
        return
    seen = None
    while True:
        state = remote.flow_run(flow_run.id).state
        if state and state.name != seen:
            seen = state.name
            out.print(f"{datetime.now(UTC):%H:%M:%S} {batch}: {state.name}", highlight=False)
        if state and state.is_final():
            if state.message:
                out.print(state.message, highlight=False)
            if not state.is_completed():
                raise typer.Exit(1)
            return
        time.sleep(POLL)


def _flow_run(batch: str) -> Any:
    """The batch's newest flow run on the controller's deployment, or exit 1 saying there is none."""
    try:
        return remote.flow_run_of(batch)
    except ControllerError as exc:
        raise _fail(exc) from None


def status_remote(config: Path, jobs: list[JobSpec], batch: str, as_json: bool) -> None:
    """The batch's flow run and its jobs' task runs, from the Prefect API."""

    run = _flow_run(batch)
    runs = {r.name: r for r in remote.job_runs(run.id, {job.name for job in jobs})}
    rows = [{"job": job.name, "state": runs[job.name].state if job.name in runs else "not started"} for job in jobs]
    state = run.state.name if run.state else "?"
    if as_json:
        out.print_json(data={"batch": batch, "flow_run": str(run.id), "state": state, "jobs": rows})
        return
    table = Table(title=f"batch {batch} (flow run {run.name}: {state})")
    for col in ("job", "state"):
        table.add_column(col)
    for row in rows:
        table.add_row(escape(row["job"]), escape(row["state"]))
    out.print(table)


def logs_remote(job: JobSpec, batch: str) -> None:
    """What the job's task run logged (its live output for a job of more than a few seconds)."""

    run = _flow_run(batch)
    found = remote.job_runs(run.id, {job.name})
    if not found:
        raise _fail(ControllerError(f"job {job.name} has no task run in batch {batch} yet"))
    for line in remote.log_lines(found[0].id):
        out.print(line, highlight=False, markup=False)


def cancel_remote(batch: str, names: list[str]) -> None:
    """Cancel the batch's flow run: its jobs on their hosts are cancelled by the flow."""

    if names:
        raise _fail(ControllerError("a remote batch is cancelled whole: give no job names"), 2)
    run = _flow_run(batch)
    if run.state and run.state.is_final():
        out.print(f"batch {batch}: flow run {run.name} already ended ({run.state.name})")
        return
    remote.cancel(run.id)
    out.print(f"batch {batch}: cancelling flow run {run.name}; its jobs are cancelled on their hosts", highlight=False)
