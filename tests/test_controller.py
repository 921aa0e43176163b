"""The controller off the laptop, end to end and offline: `cloudsend controller up` makes the instance in moto's
EC2, reaches it (a loopback sshd host, through the address-resolver seam), installs this cloudsend there from its
own wheel (dependencies from PyPI, through uv's cache) and starts the Prefect worker of a real `prefect server` on
loopback; a batch is submitted by a `cloudsend run --remote` process that exits at once, the batch completes with
no client left, and `cloudsend fetch` brings its results back afterwards.

systemd cannot run on a loopback sshd host: the bootstrap's start command (``controller.START_WORKER``) is replaced
by a plain background start of the unit's own ExecStart with its env file, and the unit and env file written by
the bootstrap are checked for content and modes.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from cloudsend_prefect import controller
from cloudsend_prefect.bundle import Bundle, pack, unpack
from cloudsend_prefect.cli import app
from cloudsend_prefect.errors import ConfigError
from cloudsend_prefect.providers import aws
from cloudsend_prefect.providers.aws import boot as aws_boot
from cloudsend_prefect.providers.aws import controller as aws_controller
from tests.moto_server import LOOPBACK, AwsEnv, LoopbackResolver, ec2, linux_ami
from tests.sshd import SshdHost, sshd_hosts_running
from tests.test_deployment import Processes, start_server

CIDR = "203.0.113.5/32"
BIN = Path(sys.executable).parent


# -- the bundle: a config's files as content ------------------------------------------------------------------
def _project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "scripts").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "scripts" / "count.sh").write_text('wc -w < data/words.txt > count.txt\necho "$1" >> count.txt\n')
    (root / "scripts" / "count.sh").chmod(0o755)
    (root / "data" / "words.txt").write_text("one two three\n")
    (root / "requirements.txt").write_text("six\n")
    config = {
        "project": "remote-test",
        "instances": [{"cpus": 2}],
        "jobs": [
            {
                "name": "count",
                "run_script": "scripts/count.sh done",
                "upload_files": ["data/words.txt"],
                "output_files": ["count.txt"],
            },
            {"name": "slow", "run_command": "sleep 4; echo slow-output > slow.txt", "output_files": ["slow.txt"]},
        ],
    }
    (root / "batch.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root / "batch.yaml"


def test_a_bundle_carries_the_config_and_the_files_it_names(tmp_path: Path) -> None:
    config = _project(tmp_path)
    (config.parent / "unrelated.bin").write_bytes(b"x" * 1000)
    bundle = pack(config)
    assert sorted(bundle.files) == ["batch.yaml", "data/words.txt", "scripts/count.sh"]
    assert bundle.executable == ["scripts/count.sh"]
    # Through JSON, as a flow run parameter goes, and unpacked where nothing of the client's exists.
    again = Bundle.model_validate_json(bundle.model_dump_json())
    path = unpack(again, tmp_path / "elsewhere")
    assert path.name == "batch.yaml"
    assert (path.parent / "data" / "words.txt").read_text() == "one two three\n"
    assert os.access(path.parent / "scripts" / "count.sh", os.X_OK)
    assert unpack(again, tmp_path / "elsewhere") == path  # written once


def test_a_bundle_refuses_files_outside_the_config_folder_and_above_the_cap(tmp_path: Path) -> None:
    config = _project(tmp_path)
    outside = tmp_path / "outside.txt"
    outside.write_text("far\n")
    data = yaml.safe_load(config.read_text())
    data["jobs"][0]["upload_files"] = [str(outside)]
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="outside the config's folder"):
        pack(config)
    data["jobs"][0]["upload_files"] = ["data/words.txt"]
    config.write_text(yaml.safe_dump(data))
    (config.parent / "data" / "words.txt").write_bytes(os.urandom(64 * 1024))
    with pytest.raises(ConfigError, match="over 0 MiB compressed"):
        pack(config, max_bytes=1024)


def test_maestro_remote_refuses_a_batch_it_cannot_send_before_submitting_anything(tmp_path: Path) -> None:
    config = _project(tmp_path)
    outside = tmp_path / "outside.txt"
    outside.write_text("far\n")
    data = yaml.safe_load(config.read_text())
    data["maestro"] = "remote"
    data["jobs"][0]["upload_files"] = [str(outside)]
    config.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["run", str(config)])
    assert result.exit_code == 2, result.output
    assert "outside the config's folder" in " ".join(result.output.split())


def test_unpack_refuses_paths_that_climb(tmp_path: Path) -> None:
    bad = Bundle(config="batch.yaml", files={"../evil": "eJwDAAAAAAE="})
    with pytest.raises(ValueError, match="not a relative path"):
        unpack(bad, tmp_path / "b")
    assert not (tmp_path / "evil").exists()


def test_remote_listings_are_read_to_their_end_page_by_page() -> None:
    """The API returns at most a page per read: a batch's task runs or a job's log lines past the first 200 are
    read too, one page after another until a short one."""
    from cloudsend_prefect import remote

    rows, reads = list(range(2 * remote.PAGE + 50)), []

    def read(limit: int, offset: int) -> list[int]:
        reads.append(offset)
        return rows[offset : offset + limit]

    assert remote.paged(read) == rows
    assert reads == [0, remote.PAGE, 2 * remote.PAGE]
    assert remote.paged(lambda limit, offset: []) == []


def test_up_needs_a_prefect_api_the_instance_can_reach() -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}), pytest.raises(controller.ControllerError) as info:
        controller.prefect_api(controller.ControllerSettings())
    assert "set PREFECT_API_URL" in str(info.value)


def test_the_controller_user_data_counts_running_flow_runs_as_use() -> None:
    user_data = aws_boot.user_data(controller.ControllerSettings(idle_minutes=5).batch_config(), controller.BUSY)
    unit = yaml.safe_load(user_data)["write_files"][1]["content"]
    assert "Environment=\"CLOUDSEND_DEADMAN_BUSY=pgrep -f '[p]refect[.]engine' >/dev/null\"" in unit
    assert "ExecStart=/usr/local/bin/cloudsend-deadman 300" in unit


def test_the_busy_check_keeps_the_switch_from_powering_off(tmp_path: Path) -> None:
    """deadman.sh with CLOUDSEND_DEADMAN_BUSY: no power-off while the check succeeds, then one once it fails."""
    script = tmp_path / "deadman.sh"
    script.write_text(aws_boot.DEADMAN)
    flag, marker = tmp_path / "busy", tmp_path / "off"
    flag.touch()
    env = {
        **os.environ,
        "CLOUDSEND_DEADMAN_DIRS": str(tmp_path / "none"),
        "CLOUDSEND_DEADMAN_PERIOD": "0.2",
        "CLOUDSEND_POWEROFF": f"touch {marker}",
        "CLOUDSEND_DEADMAN_BUSY": f"test -e {flag}",
    }
    proc = subprocess.Popen(["sh", str(script), "1"], env=env, stdout=subprocess.DEVNULL)
    try:
        time.sleep(2.5)
        assert not marker.exists()
        flag.unlink()
        proc.wait(timeout=10)
        assert marker.exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()


# -- end to end ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A `prefect server` of its own on loopback; yields its clients' environment."""
    work = tmp_path_factory.mktemp("controller-server")
    (work / "logs").mkdir()
    procs = Processes(work / "logs")
    try:
        yield start_server(work, procs, timeout=120)
    finally:
        procs.stop_all()


@pytest.fixture
def instance_host(tmp_path: Path) -> Iterator[SshdHost]:
    """The controller "instance": a loopback sshd host of its own whose commands share this machine's uv cache
    (the install fetches from PyPI only what the cache lacks) and its TLS trust settings (PyPI may be reached
    through a proxy with a CA of its own here)."""
    env = {"UV_CACHE_DIR": os.environ.get("UV_CACHE_DIR") or str(Path.home() / ".cache" / "uv")}
    env.update(
        {k: os.environ[k] for k in ("SSL_CERT_FILE", "SSL_CERT_DIR", "HTTPS_PROXY", "https_proxy") if k in os.environ}
    )
    with sshd_hosts_running(tmp_path / "instance", 1, env=env) as hosts:
        yield hosts[0]


def _background_start(layout: controller.Layout, pool: str, name: str) -> str:
    """The unit's ExecStart with its EnvironmentFile, as a plain background process (no systemd here)."""
    command = shlex.join(controller.exec_start(layout, pool, name))
    return (
        f"cd {shlex.quote(layout.work)} && set -a && . {shlex.quote(layout.env_file)} && set +a && "
        f"{{ setsid {command} > {shlex.quote(layout.log)} 2>&1 < /dev/null & echo $! > ../worker.pid; }}"
    )


def _stop_worker(host: SshdHost, how: signal.Signals = signal.SIGINT) -> None:
    """Stop the worker started by ``_background_start`` and its flow runs (its session); the jobs they started
    on the local host are detached in sessions of their own and go on."""
    pid_file = host.home / ".cloudsend" / "controller" / "worker.pid"
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text())
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, how)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


SECRET = "pnu_cloudsend-test-secret-0123456789"  # the open-source server takes no key: it is ignored there


def _api(api: str) -> Any:
    """This test's server as the client's Prefect API, with an API key as Prefect Cloud would need."""
    from prefect.settings import PREFECT_API_KEY, PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: api, PREFECT_API_KEY: SECRET})


def _results_bucket(api: str, aws_env: AwsEnv) -> None:
    """An S3Bucket block named `results` on the test's server: a bucket of moto's S3, reached by endpoint."""
    import boto3
    from prefect_aws import AwsCredentials, S3Bucket
    from prefect_aws.client_parameters import AwsClientParameters

    boto3.client("s3", region_name=aws_env.region).create_bucket(
        Bucket="cloudsend-results", CreateBucketConfiguration={"LocationConstraint": aws_env.region}
    )
    credentials = AwsCredentials(
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name=aws_env.region,
        aws_client_parameters=AwsClientParameters(endpoint_url=aws_env.endpoint),
    )
    with _api(api):
        S3Bucket(bucket_name="cloudsend-results", credentials=credentials, bucket_folder="batches").save("results")


def _cloudsend(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """The CLI as a process of its own (it is gone once this returns)."""
    return subprocess.run(
        [str(BIN / "cloudsend"), *args], env=env, capture_output=True, text=True, timeout=300, cwd=cwd
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_batch_runs_on_the_controller_with_the_client_gone(
    tmp_path: Path,
    aws_env: AwsEnv,
    server: dict[str, str],
    instance_host: SshdHost,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    api = server["PREFECT_API_URL"]
    monkeypatch.setitem(aws.ADDRESS_RESOLVERS, LOOPBACK, LoopbackResolver([instance_host]))
    monkeypatch.setattr(controller, "START_WORKER", _background_start)
    for name, value in {
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "1",
        "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
    }.items():
        monkeypatch.setenv(name, value)
    image = linux_ami()
    runner = CliRunner()
    up_args = [
        "controller", "up", "--address", LOOPBACK, "--img-id", image["ImageId"], "--ssh-from", CIDR,
        "--idle-minutes", "20", "--pool", "controller-pool",
        "--env", "PREFECT_WORKER_QUERY_SECONDS", "--env", "PREFECT_WORKER_PREFETCH_SECONDS",
        "--env", "PREFECT_WORKER_HEARTBEAT_SECONDS",
    ]  # fmt: skip
    try:
        started = time.monotonic()
        with _api(api):
            result = runner.invoke(app, up_args)
        up_seconds = time.monotonic() - started
        assert result.exit_code == 0, result.output + repr(result.exception)
        assert "(created, t3.micro)" in result.output
        # This test's server is on loopback, which an instance would not reach: `up` says so (and goes on).
        assert "note: PREFECT_API_URL is http://127.0.0.1" in " ".join(result.output.split())

        # One on-demand t3.micro, tagged as the controller, with the switch counting flow runs as use.
        (reservation,) = ec2().describe_instances(
            Filters=[{"Name": "tag:cloudsend:project", "Values": ["cloudsend-controller"]}]
        )["Reservations"]
        (instance,) = reservation["Instances"]
        assert instance["InstanceType"] == "t3.micro" and "InstanceLifecycle" not in instance
        assert {"Key": "cloudsend:rank", "Value": "controller"} in instance["Tags"]

        # What the bootstrap left on the instance: the unit, the 0600 env file (the API's address in it, and
        # never on the worker's command line), the installed cloudsend of this client.
        root = instance_host.home / ".cloudsend" / "controller"
        env_file = root / "worker.env"
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
        assert f"PREFECT_API_URL='{api}'" in env_file.read_text().splitlines()
        assert f"PREFECT_API_KEY='{SECRET}'" in env_file.read_text().splitlines()
        unit = (root / controller.UNIT).read_text()
        assert f"EnvironmentFile={env_file}" in unit
        assert f"WorkingDirectory={root / 'work'}" in unit
        assert f"ExecStart={root / 'venv/bin/prefect'} worker start --pool controller-pool --name " in unit
        assert "User=" in unit and "Restart=always" in unit
        assert (root / "home").is_dir() and stat.S_IMODE(root.stat().st_mode) == 0o700
        assert (instance_host.home / ".cloudsend" / "contact").read_text().strip() == "1200"
        installed = subprocess.run(
            [str(root / "venv/bin/python"), "-c", "import cloudsend_prefect.controller as c; print(c.__file__)"],
            capture_output=True, text=True, check=True, cwd=root,
        )  # fmt: skip
        assert installed.stdout.startswith(str(root / "venv"))

        # status: the instance and the worker's heartbeat from the Prefect API.
        deadline = time.monotonic() + 60
        while True:
            with _api(api):
                status = runner.invoke(app, ["controller", "status", "--json"])
            assert status.exit_code == 0, status.output
            shown = __import__("json").loads(status.output)
            if shown["workers"] and shown["workers"][0]["last_heartbeat"]:
                break
            assert time.monotonic() < deadline, (root / "worker.log").read_text()[-4000:]
            time.sleep(1)
        assert shown["state"] == "running" and shown["type"] == "t3.micro"
        assert shown["workers"][0]["name"] == f"cloudsend-controller-{instance['InstanceId']}"

        # A second `up` reuses it: no second instance, nothing reinstalled.
        with _api(api):
            again = runner.invoke(app, up_args)
        assert again.exit_code == 0, again.output
        said = " ".join(again.output.split())
        assert "(reused, t3.micro)" in said and "cloudsend already installed" in said, said
        _stop_worker(instance_host)
        with _api(api):  # the reused controller's worker is started again by its `up`: here, by the seam
            assert runner.invoke(app, up_args).exit_code == 0

        # The batch, submitted by a process that ends at once.
        config = _project(tmp_path)
        client_env = {**server, "XDG_CONFIG_HOME": str(aws_env.config_home), "PATH": f"{BIN}:{os.environ['PATH']}"}
        _results_bucket(api, aws_env)
        submitted = time.monotonic()
        client = _cloudsend(["run", str(config), "--remote", "--results-bucket", "results"], client_env, tmp_path)
        client_gone, submit_seconds = time.time(), time.monotonic() - submitted
        assert client.returncode == 0, client.stdout + client.stderr
        assert "submitted batch remote-test" in client.stdout

        from cloudsend_prefect import remote

        deadline = time.monotonic() + 240
        while True:
            with _api(api):
                run = remote.flow_run_of("remote-test")
            if run.state.is_final():
                break
            assert time.monotonic() < deadline, (root / "worker.log").read_text()[-6000:]
            time.sleep(1)
        assert run.end_time is not None and client_gone < run.end_time.timestamp()  # gone before the batch ended
        assert run.state.is_completed(), f"{run.state}\n{(root / 'worker.log').read_text()[-6000:]}"

        # status from the API, as a user runs it.
        with _api(api):
            shown = runner.invoke(app, ["status", str(config), "--remote", "--json"])
        assert shown.exit_code == 0, shown.output
        jobs = __import__("json").loads(shown.output)["jobs"]
        assert jobs == [{"job": "count", "state": "Completed"}, {"job": "slow", "state": "Completed"}]

        # The results: on the controller's disk, then here with `cloudsend fetch`.
        on_instance = root / "work" / "cloudsend-results" / "remote-test"
        assert (on_instance / "count" / "count.txt").is_file()
        with _api(api):
            fetched = runner.invoke(app, ["fetch", "remote-test", "--to", str(tmp_path / "results")])
        assert fetched.exit_code == 0, fetched.output + repr(fetched.exception)
        batch = tmp_path / "results" / "remote-test"
        assert (batch / "count" / "count.txt").read_text().split() == ["3", "done"]
        assert (batch / "slow" / "slow.txt").read_text() == "slow-output\n"
        assert (batch / "joblog.tsv").is_file()
        # ... and from the bucket the run also uploaded them to (moto's S3), with no controller involved.
        with _api(api):
            from_bucket = runner.invoke(
                app, ["fetch", "remote-test", "--bucket", "results", "--to", str(tmp_path / "b")]
            )
        assert from_bucket.exit_code == 0, from_bucket.output + repr(from_bucket.exception)
        in_bucket = tmp_path / "b" / "remote-test"
        assert (in_bucket / "count" / "count.txt").read_text().split() == ["3", "done"]
        assert (in_bucket / "slow" / "slow.txt").read_text() == "slow-output\n"
        with _api(api):
            logged = runner.invoke(app, ["logs", str(config), "count", "--remote"])
        assert logged.exit_code == 0 and "done on" in logged.output, logged.output

        # --wait follows a run to its end, with the run's exit status.
        waited = _cloudsend(["run", str(config), "--remote", "--wait", "--batch", "waited"], client_env, tmp_path)
        assert waited.returncode == 0, waited.stdout + waited.stderr
        assert "waited: Completed" in waited.stdout

        # cancel --remote: the flow run is cancelled, and with it the job running on its host.
        data = yaml.safe_load(config.read_text())
        pid_file = tmp_path / "long.pid"  # the "instance" is this machine: the job's pid is readable here
        data["jobs"] = [{"name": "long", "run_command": f"echo $$ > {pid_file}; exec sleep 300"}]
        long_config = config.with_name("long.yaml")
        long_config.write_text(yaml.safe_dump(data))
        assert (
            _cloudsend(["run", str(long_config), "--remote", "--batch", "long"], client_env, tmp_path).returncode == 0
        )
        deadline = time.monotonic() + 120
        while True:
            with _api(api):
                shown = runner.invoke(app, ["status", str(long_config), "--remote", "--batch", "long", "--json"])
            if __import__("json").loads(shown.output)["jobs"][0]["state"] == "Running":
                break
            assert time.monotonic() < deadline, shown.output
            time.sleep(1)
        with _api(api):
            cancelled = runner.invoke(app, ["cancel", str(long_config), "--remote", "--batch", "long"])
        assert cancelled.exit_code == 0 and "cancelling flow run" in cancelled.output, cancelled.output
        deadline = time.monotonic() + 90
        while True:
            with _api(api):
                run = remote.flow_run_of("long")
            if run.state.is_final():
                break
            assert time.monotonic() < deadline, (root / "worker.log").read_text()[-6000:]
            time.sleep(1)
        assert run.state.is_cancelled(), run.state
        pid = int(pid_file.read_text())
        deadline = time.monotonic() + 15
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not Path(f"/proc/{pid}").exists(), "the job still runs after its batch was cancelled"

        # The controller lost mid-batch (its worker and flow run killed): the job goes on on its host; a new
        # controller run of the same batch re-attaches to it (it is not started twice) and completes the batch.
        starts = tmp_path / "starts"
        data["jobs"] = [
            {"name": "steady", "run_command": f"echo x >> {starts}; sleep 12; echo steady > steady.txt",
             "output_files": ["steady.txt"]},
        ]  # fmt: skip
        steady = config.with_name("steady.yaml")
        steady.write_text(yaml.safe_dump(data))
        assert _cloudsend(["run", str(steady), "--remote", "--batch", "steady"], client_env, tmp_path).returncode == 0
        deadline = time.monotonic() + 120
        while not starts.exists():
            assert time.monotonic() < deadline, (root / "worker.log").read_text()[-6000:]
            time.sleep(0.5)
        _stop_worker(instance_host, signal.SIGKILL)  # no goodbye: as a controller powered off would be
        with _api(api):
            assert runner.invoke(app, up_args).exit_code == 0
        assert _cloudsend(["run", str(steady), "--remote", "--batch", "steady"], client_env, tmp_path).returncode == 0
        deadline = time.monotonic() + 180
        while True:
            with _api(api):
                run = remote.flow_run_of("steady")
            if run.state.is_final():
                break
            assert time.monotonic() < deadline, (root / "worker.log").read_text()[-6000:]
            time.sleep(1)
        assert run.state.is_completed(), f"{run.state}\n{(root / 'worker.log').read_text()[-6000:]}"
        assert starts.read_text() == "x\n"  # re-attached, not run again
        assert (root / "work" / "cloudsend-results" / "steady" / "steady" / "steady.txt").read_text() == "steady\n"

        # The API key: in the 0600 env file only, never in what the commands printed or logged.
        assert SECRET not in unit and SECRET not in (root / "worker.log").read_text()
        assert SECRET not in result.output + again.output + caplog.text
        print(f"\ncontroller up {up_seconds:.1f}s; submit {submit_seconds:.1f}s")

        # down: the instance goes.
        with _api(api):
            gone = runner.invoke(app, ["controller", "down", "--yes"])
        assert gone.exit_code == 0 and "terminated controller" in gone.output
        assert aws_controller.controller_view(controller.load_settings().batch_config()) is None
    finally:
        _stop_worker(instance_host)
