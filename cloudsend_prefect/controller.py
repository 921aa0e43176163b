"""The controller off the laptop: a small EC2 instance whose Prefect worker runs the ``cloudsend/batch`` flow runs.

``cloudsend controller up`` makes (or reuses) the instance through the aws provider, installs cloudsend there at
this client's exact version (its own wheel, built here; dependencies from PyPI), writes the worker's settings to a
0600 env file and starts the worker as a systemd service; it also creates the work pool and points the
``cloudsend/batch`` deployment at it. A batch submitted to that deployment (``cloudsend run --remote``) then runs
with nobody's machine left on. The instance's dead-man switch counts it as idle while no flow run is running.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from cloudsend_prefect.config import BatchConfig, InstanceType
from cloudsend_prefect.providers import Connections, HostInfo
from cloudsend_prefect.transport import Transport

DEPLOYMENT_FLOW, DEPLOYMENT_NAME = "cloudsend", "batch"  # the deployment cloudsend/batch
UNIT = "cloudsend-worker.service"
# A flow run under a process worker is a `python -m prefect.engine` process; [p] keeps the check from matching the
# shell that runs it.
BUSY = "pgrep -f '[p]refect[.]engine' >/dev/null"
DIST = "cloudsend-prefect"


class ControllerError(RuntimeError):
    """A controller problem explained for the user (what failed, and what to do)."""


class ControllerSettings(BaseModel):
    """What the controller is; saved by ``up`` (no secret in it) so that the other commands find it again."""

    project: str = Field("cloudsend-controller", description="Its tag, key pair and security group's project.")
    pool: str = Field("cloudsend-controller", description="The process work pool its worker serves.")
    instance_type: str = "t3.micro"
    region: str | None = None
    img_id: str | None = None
    address: str = "public"
    idle_minutes: float = Field(60, gt=0, description="Powered off after this long with no flow run running.")
    ssh_from: list[str] | None = None
    aws_credentials: str | None = None
    profile: str | None = None
    api_key_secret: str | None = Field(None, description="Secret block holding the Prefect API key.")
    pass_env: list[str] = Field(default_factory=list, description="This client's variables the worker also gets.")

    def batch_config(self) -> BatchConfig:
        """The controller as the aws provider takes an instance: a project of one instance type, checked by the
        provider (an unknown address kind) before anything is created.

        Raises:
            ValueError: a setting the config or the aws provider refuses.
        """
        from cloudsend_prefect.providers.aws import validate

        inst = InstanceType(type=self.instance_type, region=self.region, img_id=self.img_id, address=self.address)
        config = BatchConfig(
            project=self.project,
            provider="aws",
            instances=[inst],
            idle_minutes=self.idle_minutes,
            ssh_from=self.ssh_from,
            aws_credentials=self.aws_credentials,
            profile=self.profile,
        )
        validate(config, 0, inst)
        return config


def settings_file() -> Path:
    """Where ``up`` saves the controller's settings: beside the aws keys, private to the user."""
    from cloudsend_prefect.providers.aws.session import config_dir

    return config_dir() / "controller.json"


def load_settings(**overrides: Any) -> ControllerSettings:
    """The settings ``up`` saved last, with the given (non-None) values over them."""
    path = settings_file()
    saved = json.loads(path.read_text()) if path.is_file() else {}
    return ControllerSettings.model_validate({**saved, **{k: v for k, v in overrides.items() if v is not None}})


def save_settings(settings: ControllerSettings) -> None:
    """Keep ``settings`` for the later ``controller`` commands and ``--remote`` runs (no secret is in them)."""
    path = settings_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(settings.model_dump_json(indent=2) + "\n")


# -- the Prefect side ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrefectApi:
    """The Prefect API the worker is pointed at; its ``repr`` never shows the key, so logging one leaks nothing."""

    url: str
    key: str | None

    def __repr__(self) -> str:  # never the key, whatever prints this
        return f"PrefectApi(url={self.url!r}, key={'set' if self.key else 'none'})"


def prefect_api(settings: ControllerSettings) -> PrefectApi:
    """The Prefect API this client uses, which the worker must use too: URL and key from the environment
    (PREFECT_API_URL, PREFECT_API_KEY), the key from a Secret block when one is named."""
    from prefect.settings import get_current_settings

    current = get_current_settings()
    url = current.api.url
    if not url:
        raise ControllerError(
            "no Prefect API: set PREFECT_API_URL to a server the instance can reach (Prefect Cloud, or a "
            "`prefect server start --host 0.0.0.0` of yours): this client's temporary server dies with it"
        )
    key = current.api.key.get_secret_value() if current.api.key else None
    if settings.api_key_secret:
        from prefect.blocks.system import Secret

        key = str(Secret.load(settings.api_key_secret).get())  # type: ignore[union-attr]
    return PrefectApi(url, key)


def worker_name(instance_id: str) -> str:
    """The worker's name in its pool, from its instance: heartbeats then say which instance is serving."""
    return f"cloudsend-controller-{instance_id}"


def register(settings: ControllerSettings, work_dir: str) -> None:
    """The process work pool (created if missing) and the deployment ``cloudsend/batch`` on it: the installed
    package's flow, run from ``work_dir`` on the controller (relative results folders land there)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    from cloudsend_prefect.flow import cloudsend

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(settings.pool)
        except ObjectNotFound:
            pool = None
        if pool is None:
            client.create_work_pool(WorkPoolCreate(name=settings.pool, type="process"))
        elif pool.type != "process":
            raise ControllerError(
                f"work pool {settings.pool} is of type {pool.type}: the controller needs a process pool"
            )
        flow_id = client.create_flow_from_name(DEPLOYMENT_FLOW)
        client.create_deployment(
            flow_id,
            DEPLOYMENT_NAME,
            work_pool_name=settings.pool,
            entrypoint="cloudsend_prefect.flow.cloudsend",  # a module path: the package installed on the controller
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": work_dir}}],
            parameter_openapi_schema=cloudsend.parameters.model_dump_for_openapi(),
            parameters={"results_dir": "cloudsend-results"},
            tags=["cloudsend"],
            description="Run a batch of jobs on the cluster's hosts (on the cloudsend controller instance).",
        )


@dataclass(frozen=True)
class Heartbeat:
    """One worker of the pool as the Prefect API last heard of it: how ``controller status`` tells a live worker."""

    worker: str
    status: str
    last: datetime | None


def heartbeats(pool: str) -> list[Heartbeat]:
    """The pool's workers as the Prefect API last heard of them (newest first)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            workers = client.read_workers_for_work_pool(pool)
        except ObjectNotFound:
            return []
    found = [Heartbeat(w.name, str(getattr(w.status, "value", w.status)), w.last_heartbeat_time) for w in workers]
    return sorted(found, key=lambda h: h.last.timestamp() if h.last else 0.0, reverse=True)


# -- the instance side --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Where the controller keeps its files on the instance (under the login's home)."""

    home: str
    user: str

    @property
    def root(self) -> str:
        """The folder everything of the controller's is under (0700)."""
        return f"{self.home}/.cloudsend/controller"

    @property
    def venv(self) -> str:
        """The virtual environment cloudsend and the worker are installed in."""
        return f"{self.root}/venv"

    @property
    def work(self) -> str:
        """The worker's working directory: relative results folders of flow runs land here."""
        return f"{self.root}/work"

    @property
    def env_file(self) -> str:
        """The worker's 0600 environment file (the Prefect API key is in it)."""
        return f"{self.root}/worker.env"

    @property
    def unit_file(self) -> str:
        """The systemd unit as written here, before it is installed into /etc."""
        return f"{self.root}/{UNIT}"

    @property
    def log(self) -> str:
        """The worker's log file."""
        return f"{self.root}/worker.log"

    def results(self, batch: str) -> str:
        """The results folder of ``batch`` on the instance: what ``cloudsend fetch`` copies back."""
        return f"{self.work}/cloudsend-results/{batch}"


def env_file_text(api: PrefectApi, layout: Layout, passed: dict[str, str]) -> str:
    """The worker's environment as systemd's EnvironmentFile (and a POSIX shell) reads it."""
    values = {
        **passed,
        "PREFECT_API_URL": api.url,
        **({"PREFECT_API_KEY": api.key} if api.key else {}),
        "CLOUDSEND_HOME": f"{layout.root}/home",
    }
    lines = []
    for name, value in values.items():
        if any(c in value for c in "'\n\r\0\\"):
            raise ControllerError(f"{name}: a quote, backslash or line break cannot go in the worker's env file")
        lines.append(f"{name}='{value}'")
    return "\n".join(lines) + "\n"


def exec_start(layout: Layout, pool: str, name: str) -> list[str]:
    """The worker's command line: no secret in it, since any user of the instance can read it."""
    return [f"{layout.venv}/bin/prefect", "worker", "start", "--pool", pool, "--name", name]


def unit_text(layout: Layout, pool: str, name: str) -> str:
    """The worker's systemd unit: it starts at every boot, restarts when it dies, reads its secrets from the
    0600 env file (never from its command line, which any user of the instance can see)."""
    return f"""[Unit]
Description=cloudsend controller: Prefect worker of work pool {pool}
Wants=network-online.target
After=network-online.target

[Service]
User={layout.user}
WorkingDirectory={layout.work}
EnvironmentFile={layout.env_file}
ExecStart={shlex.join(exec_start(layout, pool, name))}
Restart=always
RestartSec=10

[Install]
WantedBy=multi-user.target
"""


def systemd_start(layout: Layout, pool: str, name: str) -> str:
    """Install the unit and (re)start it: a new wheel or env file takes effect at once."""
    return (
        f"sudo install -m 0644 {shlex.quote(layout.unit_file)} /etc/systemd/system/{UNIT} && "
        f"sudo systemctl daemon-reload && sudo systemctl enable {UNIT} && sudo systemctl restart {UNIT}"
    )


# How the worker is started once its files are in place. Tests replace it (no systemd on a loopback sshd host).
START_WORKER: Callable[[Layout, str, str], str] = systemd_start


def build_wheel(out: Path) -> Path | None:
    """This client's own cloudsend as a wheel, built from the source tree it runs from: the exact code the
    client runs, uncommitted changes included, whatever version number it bears. None when it runs from an
    installed package: the controller then installs the same version from PyPI."""
    source = Path(__file__).resolve().parents[1]  # (this module is at the package's top level)
    if not (source / "pyproject.toml").is_file():
        return None
    import uv

    built = subprocess.run(
        [uv.find_uv_bin(), "build", "--out-dir", str(out), str(source)],  # the wheel from the sdist: no build/ here
        capture_output=True,
        text=True,
        timeout=600,
    )
    if built.returncode != 0:
        raise ControllerError(f"building cloudsend's wheel failed:\n{built.stderr[-3000:]}")
    wheels = sorted(out.glob("cloudsend_prefect-*.whl"))
    if not wheels:
        raise ControllerError(f"uv build made no wheel in {out}")
    return wheels[-1]


def wheel_digest(wheel: Path) -> str:
    """What the wheel holds, not when it was built: the hash of its RECORD (every file's own hash), the same for
    two builds of the same code, whose zip timestamps differ."""
    with zipfile.ZipFile(wheel) as archive:
        record = next(n for n in archive.namelist() if n.endswith(".dist-info/RECORD"))
        return hashlib.sha256(archive.read(record)).hexdigest()


def _must(transport: Transport, command: str, what: str, *, stdin: str | None = None, timeout: float = 120) -> str:
    result = transport.run(command, stdin=stdin, timeout=timeout)
    if result.exit_code != 0:
        raise ControllerError(f"{what} failed on the controller (exit {result.exit_code}):\n{result.stderr[-3000:]}")
    return result.stdout


def install(transport: Transport, layout: Layout, wheel: Path | None) -> bool:
    """cloudsend at this client's version in the controller's venv (uv: this client's binary when the platforms
    match, else uv's installer at the same version): the client's own wheel, else (``wheel`` None: the client
    runs from an installed package) that version from PyPI; whether it was (re)installed."""
    from cloudsend_prefect.runtime import client_uv

    q = shlex.quote
    _must(transport, f"mkdir -p {q(layout.work)} {q(layout.root)}/home && chmod 700 {q(layout.root)}", "mkdir")
    digest = wheel_digest(wheel) if wheel is not None else f"{DIST}=={version(DIST)}"
    marker = f"{layout.root}/installed.sha256"
    if transport.run(f"cat {q(marker)}").stdout.strip() == digest:
        return False
    uv_bin = f"{layout.root}/uv"
    if transport.run(f"test -x {q(uv_bin)}").exit_code != 0:
        local_uv = client_uv(_must(transport, "uname -s -m", "uname").split())
        if local_uv is not None:
            transport.put(local_uv, uv_bin)
            _must(transport, f"chmod 700 {q(uv_bin)}", "chmod uv")
        else:  # another OS or CPU than this client's: uv's own installer, at this client's uv version
            url = f"https://astral.sh/uv/{version('uv')}/install.sh"
            install_uv = f"curl -LsSf {q(url)} | env UV_UNMANAGED_INSTALL={q(layout.root)} sh"
            _must(transport, install_uv, "installing uv", timeout=300)
    if wheel is not None:
        requirement = f"{layout.root}/{wheel.name}"
        transport.put(wheel, requirement)
    else:
        requirement = digest
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    _must(
        transport,
        f"cd {q(layout.root)} && ./uv venv --allow-existing --python {python} venv && "
        f"./uv pip install --python venv/bin/python --reinstall-package {DIST} {q(requirement)} && "
        f"echo {digest} > installed.sha256",
        "installing cloudsend",
        timeout=900,
    )
    return True


def write_worker_files(transport: Transport, layout: Layout, env_text: str, unit: str) -> None:
    """The env file (0600 from its creation: the API key is in it) and the unit, each replaced whole."""
    q = shlex.quote
    _must(
        transport,
        f"umask 077 && cat > {q(layout.env_file)}.new && chmod 600 {q(layout.env_file)}.new && "
        f"mv -f {q(layout.env_file)}.new {q(layout.env_file)}",
        "writing the worker's env file",
        stdin=env_text,
    )
    _must(
        transport,
        f"cat > {q(layout.unit_file)}.new && chmod 644 {q(layout.unit_file)}.new && "
        f"mv -f {q(layout.unit_file)}.new {q(layout.unit_file)}",
        "writing the worker's unit",
        stdin=unit,
    )


def layout_of(transport: Transport) -> Layout:
    """The controller's layout on the host behind ``transport``, from its login's home and user name."""
    home, user = _must(transport, 'printf "%s\\n%s" "$HOME" "$(id -un)"', "reading the login's home").splitlines()
    return Layout(home, user)


@dataclass
class Up:
    """What ``up`` did, for the CLI to report.

    Attributes:
        host: The controller instance.
        created: Whether the instance was created now (else an existing one was reused).
        installed: Whether cloudsend was (re)installed on it (else the same code was already there).
        worker: The worker's name in its pool.
    """

    host: HostInfo
    created: bool
    installed: bool
    worker: str


def up(settings: ControllerSettings, *, passed: dict[str, str]) -> Up:
    """The controller running its worker, created or reused; the deployment pointed at its pool."""
    from cloudsend_prefect.providers.aws.controller import ensure_controller
    from cloudsend_prefect.runtime import HostRuntime

    api = prefect_api(settings)  # before anything is created: without an API there is nothing to run
    config = settings.batch_config()
    with Connections() as connections, tempfile.TemporaryDirectory(prefix="cloudsend-wheel-") as tmp:
        wheel = build_wheel(Path(tmp))
        host, created = ensure_controller(config, BUSY, connections)
        transport = connections.get(host)
        layout = layout_of(transport)
        installed = install(transport, layout, wheel)
        name = worker_name(host.machine_id or host.name)
        env_text = env_file_text(api, layout, passed)
        write_worker_files(transport, layout, env_text, unit_text(layout, settings.pool, name))
        # In contact: the dead-man switch counts from now, with the controller's own limit (see deadman.sh);
        # the runtime's install arms it as a batch's client does.
        HostRuntime.for_host(host, connections).install()
        register(settings, layout.work)
        _must(transport, START_WORKER(layout, settings.pool, name), "starting the worker")
    save_settings(settings)
    return Up(host, created, installed, name)
