"""What a job cannot do: corrupt the upload store, the runtime's records, the client or another job.

Each test is a job written to do harm (by accident or not) run through the real host runtime, on the local
machine and on a real sshd host, or through the flow; it asserts what a user would check afterwards.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cloudsend_prefect import runtime as runtime_module
from cloudsend_prefect.cli import app
from cloudsend_prefect.errors import ConfigError
from cloudsend_prefect.flow import run_batch
from cloudsend_prefect.resolve import load_config
from cloudsend_prefect.results import BatchSummary, tail_lines
from cloudsend_prefect.runtime import HostRuntime
from cloudsend_prefect.specs import FileSpec, JobSpec, expand_jobs
from cloudsend_prefect.transport import FileRefused
from cloudsend_prefect.transport.local import LocalTransport
from tests.faults import CLOUDSEND, assert_done_once, counted_jobs, driver_args, start_client, write_config
from tests.host_runtime import job, wait_final


def upload(path: Path, rel: str | None = None) -> FileSpec:
    return FileSpec(local=str(path), rel=rel or path.name, sha256=hashlib.sha256(path.read_bytes()).hexdigest())


def with_files(spec: JobSpec, *files: FileSpec) -> JobSpec:
    return spec.model_copy(update={"files": list(files)})


def host_base(rt: HostRuntime) -> Path:
    return Path(os.path.expanduser(rt.base))


# -- 1. the upload store -------------------------------------------------------------------------------------
def test_a_job_rewriting_its_upload_changes_only_its_own_copy(runtime: HostRuntime, tmp_path: Path) -> None:
    data = tmp_path / "input.txt"
    data.write_text("original\n")
    cmd = tmp_path / "cmd.sh"  # uploads named like the runtime's own files
    cmd.write_text("# user's file\n")
    out = tmp_path / "stdout"
    out.write_text("user's stdout file\n")
    files = [upload(data), upload(cmd), upload(out)]
    vandal = with_files(job("vandal", "echo TAMPERED > input.txt; echo appended >> cmd.sh; echo printed"), *files)
    runtime.stage("b1", [vandal])
    assert wait_final(runtime, "b1", ["vandal"])["vandal"].state == "done"
    reader = with_files(job("reader", "cat input.txt cmd.sh stdout > seen.txt", outputs=["seen.txt"]), *files)
    runtime.stage("b2", [reader])  # a later batch, same content: served from the store
    assert wait_final(runtime, "b2", ["reader"])["reader"].state == "done"
    runtime.fetch("b2", "reader", ["seen.txt"], tmp_path / "got")
    assert (tmp_path / "got" / "seen.txt").read_text() == "original\n# user's file\nuser's stdout file\n"
    assert (tmp_path / "got" / "stdout.log").read_text() == ""  # the job's own stdout, not the upload
    for spec in files:  # the store still holds each file under its hash
        stored = host_base(runtime) / "files" / spec.sha256
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == spec.sha256


def test_a_corrupted_store_file_is_sent_again(tmp_path: Path) -> None:
    rt = HostRuntime(LocalTransport(), str(tmp_path / "host"), capacity=1)
    rt.install()
    data = tmp_path / "input.txt"
    data.write_text("original\n")
    spec = upload(data)
    assert rt.upload([spec]) == 1
    rt.stage("b", [with_files(job("first", "true"), spec)])
    stored = tmp_path / "host" / "files" / spec.sha256
    stored.chmod(0o600)
    stored.write_text("rotten\n")  # e.g. a disk error, or an older runtime's linked upload written through
    fresh = HostRuntime(LocalTransport(), str(tmp_path / "host"), capacity=1)  # the next run's client
    assert fresh.upload([spec]) == 1
    fresh.stage("b", [with_files(job("second", "cat input.txt > seen.txt", outputs=["seen.txt"]), spec)])
    assert wait_final(fresh, "b", ["second"])["second"].state == "done"
    fresh.fetch("b", "second", ["seen.txt"], tmp_path / "got")
    assert (tmp_path / "got" / "seen.txt").read_text() == "original\n"


# -- 2. the runtime's files are not in the job's way -------------------------------------------------------
def test_files_named_like_the_runtimes_do_not_confuse_it(runtime: HostRuntime, tmp_path: Path) -> None:
    names = ["status", "pid", "cmd.sh", "stdout", "stderr", "exit", "start", "end", "outputs", "cpus", "env"]
    scribbler = job("scribbler", "; ".join(f"echo garbage > {n}" for n in names) + "; echo log-line")
    runtime.stage("b", [scribbler])
    state = wait_final(runtime, "b", ["scribbler"])["scribbler"]
    assert (state.state, state.exit) == ("done", 0)
    runtime.fetch("b", "scribbler", [], tmp_path / "got")
    assert (tmp_path / "got" / "stdout.log").read_text() == "log-line\n"
    # outputs named like runtime files exist only if the job makes them
    lazy, mine = job("lazy", "true", outputs=["status"]), job("mine", "echo mine > stdout", outputs=["stdout"])
    runtime.stage("b", [lazy, mine])
    states = wait_final(runtime, "b", ["lazy", "mine"])
    assert states["lazy"].state == "aborted" and "missing output file: status" in states["lazy"].reason
    assert states["mine"].state == "done"
    runtime.fetch("b", "mine", ["stdout"], tmp_path / "mine")
    assert (tmp_path / "mine" / "stdout").read_text() == "mine\n"  # its file, not its log
    assert (tmp_path / "mine" / "stdout.log").read_text() == ""


def test_a_job_writing_a_pid_file_cannot_make_cancel_kill_another_process(runtime: HostRuntime) -> None:
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        liar = job("liar", f"echo {bystander.pid} > pid; sleep 30")
        runtime.stage("b", [liar])
        deadline = time.monotonic() + 10
        while runtime.status("b")["liar"].state != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)  # the job has written its ./pid
        assert runtime.cancel("b") == ["liar"]
        assert runtime.status("b")["liar"].state == "aborted"
        assert bystander.poll() is None  # alive
        pid = runtime.status("b")["liar"].pid
        assert pid is not None and pid != bystander.pid
    finally:
        bystander.kill()


# -- 3. fetching trusts nothing ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "why"),
    [
        ("ln -s /dev/zero out", "symbolic link"),
        ("ln -s /etc/shadow out", "symbolic link"),
        ("mkfifo out", "not a regular file"),
        ("mkdir out", "not a regular file"),
        ("mkdir real; ln -s real sub; echo x > sub/out", "symbolically linked directory"),
    ],
)
def test_only_regular_files_inside_the_job_are_fetched(runtime: HostRuntime, make: str, why: str) -> None:
    out = "sub/out" if "sub/out" in make else "out"
    runtime.stage("b", [job("sneaky", make, outputs=[out])])
    state = wait_final(runtime, "b", ["sneaky"])["sneaky"]
    assert state.state == "aborted" and why in state.reason, state


def test_outputs_over_the_limit_are_refused(runtime: HostRuntime, tmp_path: Path) -> None:
    big = job("big", "head -c 5000 /dev/zero > a; head -c 6000 /dev/zero > b", outputs=["a", "b"])
    runtime.stage("b", [big.model_copy(update={"max_output_bytes": 10_000})])
    state = wait_final(runtime, "b", ["big"])["big"]
    assert state.state == "aborted" and "over the limit of 10000 bytes" in state.reason
    with pytest.raises(FileRefused, match="output limit"):  # and the client holds the line on its own
        runtime.fetch("b", "big", ["a", "b"], tmp_path / "got", max_bytes=10_000)


def test_the_client_refuses_links_fifos_and_devices_whatever_the_host_said(
    runtime: HostRuntime, tmp_path: Path
) -> None:
    """A job's leftover process could swap an output after the job's end was checked: the client's own
    checks refuse it at once (no endless read of /dev/zero, no wait on a FIFO)."""
    runtime.stage("b", [job("ok", "echo fine > out", outputs=["out"])])
    assert wait_final(runtime, "b", ["ok"])["ok"].state == "done"
    out = host_base(runtime) / "jobs" / "b" / "ok" / "work" / "out"
    for swap in (lambda: out.symlink_to("/dev/zero"), lambda: os.mkfifo(out)):
        out.unlink()
        swap()
        started = time.monotonic()
        with pytest.raises(FileRefused):
            runtime.fetch("b", "ok", ["out"], tmp_path / "got")
        assert time.monotonic() - started < 10
    assert not (tmp_path / "got" / "out").exists()


def test_fetched_copies_get_the_users_umask_not_the_hosts_modes(runtime: HostRuntime, tmp_path: Path) -> None:
    runtime.stage("b", [job("modes", "echo x > out; chmod 4777 out", outputs=["out"])])
    assert wait_final(runtime, "b", ["modes"])["modes"].state == "done"
    old = os.umask(0o027)
    try:
        runtime.fetch("b", "modes", ["out"], tmp_path / "got")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "got" / "out").stat().st_mode) == 0o640


# -- 4. client memory --------------------------------------------------------------------------------------
def test_a_huge_stderr_is_read_from_its_end_in_constant_memory(tmp_path: Path) -> None:
    log = tmp_path / "stderr.log"
    with log.open("wb") as f:
        for i in range(200_000):
            f.write(b"x" * 500 + f" line {i}\n".encode())
    tracemalloc.start()
    lines = tail_lines(log, 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert lines[-1].endswith("line 199999") and len(lines) == 20
    assert peak < 2_000_000, peak  # the file is 100 MB


def test_logs_streams_a_big_stdout_in_constant_memory(tmp_path: Path, cloudsend_home: Path) -> None:
    config = write_config(
        tmp_path,
        {
            "project": "bigout",
            "instances": [{"cpus": 1}],
            "jobs": [{"name": "chatty", "run_command": "head -c 60000000 /dev/zero | tr '\\0' 'a'"}],
        },
    )
    summary = run_batch(config=str(config), results_dir=str(tmp_path / "results"))
    assert summary.jobs[0].state == "done"
    env = {**os.environ, "CLOUDSEND_HOME": str(cloudsend_home)}
    # The peak memory of `cloudsend logs` alone: a small Python starts it and reports its children's peak
    # (a child of this test would report this big process's peak too: Linux keeps it across fork and exec).
    measure = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); " + (
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)"
    )
    args = [sys.executable, "-c", measure, str(CLOUDSEND), "logs", str(config), "chatty"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdout is not None and proc.stderr is not None
    got = sum(len(chunk) for chunk in iter(lambda: proc.stdout.read(1 << 20), b""))  # type: ignore[union-attr]
    peak_kib = int(proc.stderr.read().split()[-1])
    assert proc.wait() == 0
    assert got == 60_000_000
    assert peak_kib < 250_000, f"{peak_kib} KiB"  # its imports alone take ~100 MB; the log is 60 MB


# -- 8. what crosses from the client to a job --------------------------------------------------------------
def test_local_jobs_see_only_login_and_pass_env_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client's secrets never reach a local job; what `pass_env` names does."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-leak")
    monkeypatch.setenv("PREFECT_API_KEY", "do-not-leak-either")
    monkeypatch.setenv("OTHER_SECRET", "hidden")
    monkeypatch.setenv("MYAPP_MODE", "fast")
    config = write_config(
        tmp_path,
        {
            "project": "envleak",
            "pass_env": ["MYAPP_*"],
            "instances": [{"cpus": 1}],
            "jobs": [{"name": "env", "run_command": "env > env.txt", "output_files": ["env.txt"]}],
        },
    )
    summary = run_batch(config=str(config), results_dir=str(tmp_path / "results"))
    seen = (tmp_path / "results" / "envleak" / "env" / "env.txt").read_text()
    assert summary.jobs[0].state == "done"
    assert "do-not-leak" not in seen and "hidden" not in seen
    assert "PATH=" in seen and "HOME=" in seen and "MYAPP_MODE=fast" in seen


def test_output_limit_and_log_names_come_from_the_config(tmp_path: Path) -> None:
    jobs = [{"name": "j", "run_command": "true", "output_files": ["o"], "max_output_mb": 0.5}]
    config = write_config(tmp_path, {"project": "limits", "jobs": jobs})
    (spec,) = expand_jobs(load_config(config))
    assert spec.max_output_bytes == 512 * 1024
    clash = write_config(tmp_path / "clash", {"jobs": [{"run_command": "true", "output_files": ["stdout.log"]}]})
    with pytest.raises(ConfigError, match=r"jobs\[0\]\.output_files: 'stdout.log' is the name of the job's own log"):
        load_config(clash)


def test_host_files_are_private_to_the_user(tmp_path: Path, cloudsend_home: Path) -> None:
    data = tmp_path / "data.txt"
    data.write_text("secret data\n")
    config = write_config(
        tmp_path,
        {
            "project": "modes",
            "instances": [{"cpus": 1, "name": "box"}],
            "jobs": [
                {
                    "name": "j",
                    "run_command": "cat data.txt > out.txt",
                    "upload_files": ["data.txt"],
                    "output_files": ["out.txt"],
                }
            ],
        },
    )
    assert run_batch(config=str(config), results_dir=str(tmp_path / "results")).jobs[0].state == "done"
    base = cloudsend_home / "hosts" / "box"
    loose = [str(p) for p in [base, *base.rglob("*")] if not p.is_symlink() and stat.S_IMODE(p.stat().st_mode) & 0o077]
    assert not loose, loose


# -- 9. fencing -------------------------------------------------------------------------------------------
def test_queued_jobs_start_only_while_their_batchs_lease_runs(runtime: HostRuntime, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    first, second = job("first", "sleep 2.5"), job("second", f"touch {marker}", cpus=2)  # waits for first
    runtime.stage("b", [first, second], lease=1)  # nobody renews: the client is gone, or cut off
    states = wait_final(runtime, "b", ["first", "second"])
    assert states["first"].state == "done"  # a running job goes on to its end
    assert states["second"].state == "aborted" and "its batch's lease expired" in states["second"].reason
    assert states["second"].fenced and not marker.exists()
    # a client that renews keeps its queue going
    runtime.stage("c", [first, second], lease=1)
    deadline = time.monotonic() + 30
    while not all(s.final for s in runtime.status("c", lease=1).values()):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert {k: s.state for k, s in runtime.status("c").items()} == {"first": "done", "second": "done"}
    assert marker.exists()


# -- 8. two runs of the same config at once ----------------------------------------------------------------
def test_two_runs_of_the_same_config_at_once_both_finish_and_each_job_runs_once(
    tmp_path: Path, cloudsend_home: Path
) -> None:
    counters, results = tmp_path / "counters", tmp_path / "results"
    config = write_config(
        tmp_path / "proj",
        {"project": "twice", "poll_interval": 0.2, "instances": [{"cpus": 4}], "jobs": counted_jobs(counters, 8, 0.5)},
    )
    summaries = [tmp_path / f"summary-{i}.json" for i in range(2)]
    clients = [
        start_client(driver_args(config, results, summary), tmp_path / f"client-{i}.log", cloudsend_home)
        for i, summary in enumerate(summaries)
    ]
    for client in clients:
        try:
            client.proc.wait(timeout=180)
        finally:
            client.stop()
        assert client.proc.returncode == 0, client.output()
    for summary in summaries:  # the second run re-attaches to the first one's jobs (or finds them done)
        assert_done_once(BatchSummary.model_validate_json(summary.read_text()), counters, results / "twice", 8)


def test_exec_python_config_reaches_the_flow(tmp_path: Path) -> None:
    config = tmp_path / "computed.py"
    config.write_text(
        "config = {'project': 'computed', 'instances': [{'cpus': 2}],\n"
        "          'jobs': [{'name': f'sq{i}', 'run_command': f'echo $(({i} * {i})) > out.txt',\n"
        "                    'output_files': ['out.txt']} for i in range(3)]}\n"
    )
    result = CliRunner().invoke(app, ["run", str(config), "--exec-python-config", "--results-dir", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert [(tmp_path / "r" / "computed" / f"sq{i}" / "out.txt").read_text() for i in range(3)] == ["0\n", "1\n", "4\n"]


def test_large_uploads_are_shared_read_only_and_checked_before_reuse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large upload is not copied per job (hard link to the read-only store file, or a reflink): a job can
    replace it but, unless it runs as root, not write into it; what root writes through is caught by the
    next client's hash check, and the file is sent again."""
    monkeypatch.setattr(runtime_module, "SHARE_ABOVE", 10)
    data = tmp_path / "big.bin"
    data.write_text("original large content\n")
    spec = upload(data)
    rt = HostRuntime(LocalTransport(), str(tmp_path / "host"), capacity=1)
    rt.install()
    writer = with_files(job("writer", "echo TAMPERED > big.bin 2>/dev/null; rm big.bin; echo new > big.bin"), spec)
    rt.stage("b", [writer])
    assert wait_final(rt, "b", ["writer"])["writer"].state == "done"
    stored = tmp_path / "host" / "files" / spec.sha256
    assert not stat.S_IMODE(stored.stat().st_mode) & 0o222  # read-only
    if os.geteuid() != 0:
        assert stored.read_text() == "original large content\n"
    fresh = HostRuntime(LocalTransport(), str(tmp_path / "host"), capacity=1)
    fresh.stage("c", [with_files(job("reader", "cat big.bin > seen.txt", outputs=["seen.txt"]), spec)])
    assert wait_final(fresh, "c", ["reader"])["reader"].state == "done"
    fresh.fetch("c", "reader", ["seen.txt"], tmp_path / "got")
    assert (tmp_path / "got" / "seen.txt").read_text() == "original large content\n"


# -- 5. names shown as text --------------------------------------------------------------------------------
def test_rich_markup_in_names_is_shown_as_text(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        {
            "project": "markup",
            "instances": [{"cpus": 1}],
            "jobs": [{"name": "[bold]x", "run_command": "echo '[red]x[/red]' >&2; exit 3"}],
        },
    )
    runner = CliRunner()
    for args in (["validate"], ["plan"], ["run"], ["status"]):
        result = runner.invoke(app, [*args, str(config)])
        assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exception)
        assert result.exit_code in (0, 1), (args, result.output)
        if args != ["validate"]:
            assert "[bold]x" in result.output, (args, result.output)
