"""host.sh function by function: sourced (``HOST_SH_LIBRARY`` set, so its main runs nothing) in a temporary
runtime directory, each function called with ``sh`` as a client's command would reach it. No Prefect, no host:
each test is a few shell processes.

Also: the shell scripts carry exactly the protocol names of protocol.py, and the host starts jobs by the same
placement rule as planning and the dispatcher (placement.fits).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from importlib.resources import files
from pathlib import Path

import pytest

from cloudsend_prefect import protocol
from cloudsend_prefect.placement import Amount, can_host, fits
from cloudsend_prefect.protocol import JobStatus
from cloudsend_prefect.specs import EnvSpec, FileSpec, JobSpec

HOST_SH = Path(str(files("cloudsend_prefect.runtime").joinpath("host.sh")))
DEADMAN_SH = Path(str(files("cloudsend_prefect.providers").joinpath("deadman.sh")))
SHELLS = [shell for shell in ("dash", "bash", "busybox") if shutil.which(shell)]


def sh(base: Path, script: str, *args: str, stdin: str | None = None, shell: str = "sh") -> str:
    """Run ``script`` after sourcing host.sh and making the runtime directory ``base``; its stdout."""
    command = [shell, "sh", "-c"] if shell == "busybox" else [shell, "-c"]
    prelude = '. "$HOST_SH" && init "$1" && shift && '
    proc = subprocess.run(
        [*command, prelude + script, "host.sh", str(base), *args],
        env={**os.environ, "HOST_SH_LIBRARY": "1", "HOST_SH": str(HOST_SH)},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


def record(base: Path, batch: str, key: str) -> JobStatus:
    return JobStatus.model_validate_json((base / protocol.JOBS / batch / key / "status").read_text())


def spec(key: str, command: str = "true", **fields: object) -> JobSpec:
    return JobSpec.model_validate(
        {"index": 0, "name": key, "key": key, "hash": key, "command": command, "files": [], "outputs": []}
        | {"cpus": 1, "env": None}
        | fields
    )


# -- the protocol's names ------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", [HOST_SH, DEADMAN_SH], ids=["host.sh", "deadman.sh"])
def test_the_scripts_carry_the_protocol_block_exactly(script: Path) -> None:
    text = script.read_text()
    start, end = text.find(protocol.BLOCK_START), text.find(protocol.BLOCK_END)
    assert 0 < start < end, f"{script.name} has no protocol block"
    block = text[start : end + len(protocol.BLOCK_END) + 1]
    names = re.findall(r"^([A-Z_]+)=", block, re.M)
    expected = protocol.shell_block(names)
    assert block == expected, f"{script.name}: replace its protocol block with\n{expected}"
    for name in names:  # every name of the block is used (shellcheck would say so too)
        assert re.search(rf"\${{?{name}\b|\"\${name}", text[end:]), name


def test_host_sh_writes_every_state_and_cause_from_the_protocol_and_nothing_else() -> None:
    text = HOST_SH.read_text()
    names = set(re.findall(r"^([A-Z_]+)=", text[text.find(protocol.BLOCK_START) :], re.M))
    assert {f"S_{state.upper()}" for state in protocol.JOB_STATES} <= names
    assert {"C_FENCED", "C_CANCELLED", "C_ENV"} <= names
    assert {protocol.SHELL_NAMES[n] for n in ("C_FENCED", "C_CANCELLED", "C_ENV")} == set(protocol.CAUSES)
    # Every state or cause write_status is given is one of the block's variables, never a literal word.
    calls = re.findall(r"write_status \"\$\w+\" (\S+)", text)
    assert calls and all(state.startswith('"$S_') for state in calls), calls


# -- JSON -----------------------------------------------------------------------------------------------------
NASTY = [
    "",
    "plain words",
    'a "quoted" name',
    'back\\slash and \\" both',
    "line\nbreak",
    "tab\there",
    "\r\n",
    "control \x01 \x1b[31m \x1f \x7f",
    "only\n",
    "ünïcødé ✓ 😀",
    '{"key":"x","state":"running"}',
    "'single' $HOME `cmd` *",
]


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("text", NASTY, ids=range(len(NASTY)))
def test_json_str_gives_a_json_string_of_any_text(tmp_path: Path, shell: str, text: str) -> None:
    out = sh(tmp_path, 'json_str "$1" && printf "%s" "$js"', text, shell=shell)
    assert json.loads(out) == text


def test_write_status_gives_a_valid_record_whatever_the_name_reason_or_files(tmp_path: Path) -> None:
    for i, text in enumerate(NASTY[1:]):
        key = f"k{i}-{text}".replace("/", "_")
        job = tmp_path / protocol.JOBS / "b" / key
        job.mkdir(parents=True)
        (job / protocol.PID).write_text("12x\n")  # not a number (a job wrote it): null, the record stays valid
        (job / "start").write_text("1700000000.25\n")
        (job / protocol.STDERR).write_text("something\n")
        sh(tmp_path, 'write_status "$1" "$S_ABORTED" "$2" "$C_CANCELLED"', str(job), text)
        got = record(tmp_path, "b", key)
        assert (got.key, got.state, got.reason, got.cause) == (key, "aborted", text, "cancelled")
        assert (got.pid, got.start, got.end, got.logs, got.cancelled) == (None, 1700000000.25, None, "e", True)
        assert not (job / "status.tmp").exists()
    sh(
        tmp_path,
        'write_status "$1" "$S_QUEUED" "waiting" "" new',
        str(tmp_path / protocol.JOBS / "b" / "k0-plain words"),
    )
    assert record(tmp_path, "b", "k0-plain words").cause is None


@pytest.mark.parametrize(
    ("line", "state"),
    [
        ('{"key":"a","state":"running","pid":1,"reason":""}', "running"),
        ('{"key":"a\\",\\"state\\":\\"running","state":"queued","reason":""}', "queued"),  # a key that says it
        ('{"key":"a","state":"done","reason":"\\"state\\":\\"running\\""}', "done"),  # a reason that says it
        ('{"key":"a","state":"runningX","reason":""}', "runningX"),  # not a state: matches none
        ("", ""),
        ("garbage", ""),
    ],
)
def test_record_state_reads_the_state_field_whole(tmp_path: Path, line: str, state: str) -> None:
    out = sh(tmp_path, 'record_state "$1"; printf "%s|" "$rs"; case $rs in "$S_RUNNING") echo running ;; esac', line)
    assert out == f"{state}|" + ("running\n" if state == "running" else "")


# -- the host's resources --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("gcap", "gused", "want", "devs"),
    [
        (2, "", 1, "0"),
        (2, ",0", 1, "1"),
        (2, ",0", 2, None),
        (4, ",0,2", 2, "1,3"),
        (4, ",1", 3, "0,2,3"),
        (0, "", 1, None),
    ],
)
def test_free_gpus_hands_out_devices_not_in_use(
    tmp_path: Path, gcap: int, gused: str, want: int, devs: str | None
) -> None:
    out = sh(
        tmp_path,
        'gcap=$1 gused=$2; if free_gpus "$3"; then echo "$devs"; else echo none; fi',
        str(gcap),
        gused,
        str(want),
    )
    assert out.strip() == (devs or "none")


def test_the_lock_excludes_a_second_holder_and_a_dead_owners_lock_is_taken(tmp_path: Path) -> None:
    assert sh(tmp_path, "trylock && echo got") == "got\n"
    assert sh(tmp_path, "trylock && echo got || echo busy") == "busy\n"
    sh(tmp_path, "unlock")
    assert not (tmp_path / "lock").exists()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "lock").write_text(f"{dead.pid}\n")  # its owner died holding it
    assert sh(tmp_path, "steal_dead_lock; trylock && echo got") == "got\n"
    (tmp_path / "lock").write_text(f"{os.getpid()}\n")  # a live owner's lock stays
    assert sh(tmp_path, "steal_dead_lock; trylock && echo got || echo busy") == "busy\n"


def test_renew_sets_the_leases_expiry_and_zero_leaves_it(tmp_path: Path) -> None:
    lease = tmp_path / protocol.LEASES / "b"
    before = time.time()
    sh(tmp_path, "renew b 100")
    assert before + 100 <= lease.stat().st_mtime <= time.time() + 102  # at least the seconds asked
    expiry = lease.stat().st_mtime
    sh(tmp_path, "renew b 0; renew b ''; renew b 1x")
    assert lease.stat().st_mtime == expiry


# -- stage: the manifest -------------------------------------------------------------------------------------
def _store(base: Path, content: bytes, name: str) -> FileSpec:
    sha = hashlib.sha256(content).hexdigest()
    (base / protocol.FILES / sha).write_bytes(content)
    return FileSpec(local=name, rel=name, sha256=sha)


def test_stage_makes_each_job_of_the_manifest_and_queues_it(tmp_path: Path) -> None:
    sh(tmp_path, ":")
    data = _store(tmp_path, b"data\n", "in/data.txt")
    tool = _store(tmp_path, b"#!/bin/sh\necho tool\n", "tool.sh").model_copy(update={"executable": True})
    env = EnvSpec(name="e", hash="e" * 64, files={})
    jobs = [
        spec("one", "echo one\necho 'two lines'", files=[data, tool], outputs=["out.txt", "sub/o.txt"], cpus=3, gpus=1),
        spec("two", env=env, timeout=2.5, max_output_bytes=1000),
    ]
    flags = {data.sha256: protocol.file_flags(False, False), tool.sha256: protocol.file_flags(True, False)}
    manifest = "".join(protocol.manifest_job("b", job, 0, flags) for job in jobs)
    sh(tmp_path, "dispatch() { :; }; stage 4:1 60", stdin=manifest)  # nothing started: the queue is looked at
    one, two = tmp_path / protocol.JOBS / "b" / "one", tmp_path / protocol.JOBS / "b" / "two"
    assert (one / "cpus").read_text() == "3\n" and (one / "gpus").read_text() == "1\n"
    assert (one / "env").read_text() == "-\n" and not (one / "timeout").exists()
    assert (one / "cmd.sh").read_text() == "echo one\necho 'two lines'\n"
    assert (one / "outputs").read_text() == "out.txt\nsub/o.txt\n"
    assert (one / protocol.WORK / "in" / "data.txt").read_bytes() == b"data\n"
    assert os.access(one / protocol.WORK / "tool.sh", os.X_OK)
    assert not os.access(one / protocol.WORK / "in" / "data.txt", os.X_OK)
    assert (two / "env").read_text() == f"{env.key}\n" and (two / "timeout").read_text() == "2.5\n"
    assert (two / "maxout").read_text() == "1000\n" and not (two / "gpus").exists()
    assert record(tmp_path, "b", "one").state == record(tmp_path, "b", "two").state == "queued"
    queue = sorted((tmp_path / protocol.QUEUE).iterdir())
    assert [q.read_text() for q in queue] == ["b one\n", "b two\n"]  # in manifest order
    assert (tmp_path / "capacity").read_text() == "4 1\n"
    assert (tmp_path / protocol.LEASES / "b").stat().st_mtime > time.time() + 50


@pytest.mark.parametrize(
    ("ended", "rerun", "replaced"),
    [
        ("done", 0, False),
        ("done", protocol.RERUN_FAILED, False),
        ("done", protocol.RERUN_ANY, True),
        ("failed", 0, False),
        ("failed", protocol.RERUN_FAILED, True),
        ("aborted", protocol.RERUN_FAILED, True),
        ("running", protocol.RERUN_ANY, False),  # never started twice
    ],
)
def test_stage_replaces_a_known_record_only_as_rerun_asks(
    tmp_path: Path, ended: str, rerun: int, replaced: bool
) -> None:
    job = tmp_path / protocol.JOBS / "b" / "k"
    job.mkdir(parents=True)
    sh(tmp_path, 'write_status "$1" "$2" "before"', str(job), ended)
    manifest = protocol.manifest_job("b", spec("k"), rerun, {})
    sh(tmp_path, "dispatch() { :; }; stage 1 60", stdin=manifest)
    assert record(tmp_path, "b", "k").state == ("queued" if replaced else ended)
    assert len(list((tmp_path / protocol.QUEUE).iterdir())) == (1 if replaced else 0)


# -- dispatch_pass: packing -----------------------------------------------------------------------------------
def _queue(base: Path, key: str, cpus: int, gpus: int, order: int) -> None:
    job = base / protocol.JOBS / "b" / key
    (job / protocol.WORK).mkdir(parents=True)
    (job / "cpus").write_text(f"{cpus}\n")
    (job / "gpus").write_text(f"{gpus}\n")
    (job / "env").write_text("-\n")
    (base / protocol.QUEUE / f"1.{order}").write_text(f"b {key}\n")


# One pass, as a process that took the lock runs it; ``detach`` records the key of what it would start.
PASS = 'detach() { echo "$6" >>"$BASE/started"; }; chain= && trylock && dispatch_pass'


def _pass(base: Path) -> list[str]:
    """One dispatch pass with ``detach`` recording what it would start; the keys started."""
    (base / protocol.LEASES / "b").touch()
    os.utime(base / protocol.LEASES / "b", (time.time() + 600, time.time() + 600))
    sh(base, PASS)
    started = base / "started"
    return started.read_text().split() if started.exists() else []


CASES = [
    (used_cpus, used_gpus, cpus, gpus)
    for used_cpus in (0, 1, 3, 4)
    for used_gpus in (0, 1, 2)
    for cpus in (1, 3, 4, 8)
    for gpus in (0, 1, 2)
    if used_cpus or not used_gpus  # a job holding GPUs holds a CPU too
]


@pytest.mark.parametrize(("used_cpus", "used_gpus", "cpus", "gpus"), CASES)
def test_the_host_starts_a_job_exactly_when_placement_says_it_fits(
    tmp_path: Path, used_cpus: int, used_gpus: int, cpus: int, gpus: int
) -> None:
    """A host of 4 CPUs and 2 GPUs, some in use, and one queued job: started iff ``placement.fits``."""
    sh(tmp_path, ":")
    (tmp_path / "capacity").write_text("4 2\n")
    if used_cpus:
        devices = ",".join(str(i) for i in range(used_gpus)) or "-"
        (tmp_path / protocol.RUNNING / f"b{protocol.RUN_SEP}busy").write_text(f"{used_cpus} {devices}\n")
    _queue(tmp_path, "job", cpus, gpus, 1)
    expected = fits(Amount(cpus, gpus), Amount(4, 2), used_cpus, used_gpus)
    assert _pass(tmp_path) == (["job"] if expected else [])
    if expected:
        entry = (tmp_path / protocol.RUNNING / f"b{protocol.RUN_SEP}job").read_text().split()
        assert int(entry[0]) == cpus and len(entry[1].split(",")) == (gpus or 1)


def test_a_job_needing_more_gpus_than_the_host_has_is_aborted_as_placement_says(tmp_path: Path) -> None:
    sh(tmp_path, ":")
    (tmp_path / "capacity").write_text("4 2\n")
    _queue(tmp_path, "greedy", 1, 3, 1)
    assert not can_host(Amount(4, 2), Amount(1, 3))
    assert _pass(tmp_path) == []
    got = record(tmp_path, "b", "greedy")
    assert (got.state, got.reason) == ("aborted", "needs 3 GPUs; this host has 2")
    assert not list((tmp_path / protocol.QUEUE).iterdir())


def test_a_pass_packs_queued_jobs_first_fit_in_queue_order(tmp_path: Path) -> None:
    sh(tmp_path, ":")
    (tmp_path / "capacity").write_text("4 1\n")
    for order, (key, cpus, gpus) in enumerate([("a", 2, 0), ("big", 3, 0), ("g", 1, 1), ("c", 1, 0), ("d", 1, 0)]):
        _queue(tmp_path, key, cpus, gpus, order)
    assert _pass(tmp_path) == ["a", "g", "c"]  # big waits for 3 free CPUs; the ones behind it that fit start
    assert sorted(q.read_text() for q in (tmp_path / protocol.QUEUE).iterdir()) == ["b big\n", "b d\n"]
    assert not (tmp_path / "lock").exists()  # the pass releases the lock


def test_a_pass_fences_jobs_whose_lease_expired_and_frees_ended_entries(tmp_path: Path) -> None:
    sh(tmp_path, ":")
    (tmp_path / "capacity").write_text("2 0\n")
    (tmp_path / protocol.RUNNING / f"b{protocol.RUN_SEP}old").write_text("0\n")  # ended: its CPUs are free
    _queue(tmp_path, "late", 1, 0, 1)
    (tmp_path / protocol.LEASES / "b").touch()
    os.utime(tmp_path / protocol.LEASES / "b", (time.time() - 5, time.time() - 5))
    sh(tmp_path, PASS)
    got = record(tmp_path, "b", "late")
    assert got.fenced and got.state == "aborted" and not (tmp_path / "started").exists()
    assert not list((tmp_path / protocol.RUNNING).iterdir()) and not list((tmp_path / protocol.QUEUE).iterdir())


# -- status and cancel ----------------------------------------------------------------------------------------
def _running(base: Path, key: str, pid: int) -> Path:
    job = base / protocol.JOBS / "b" / key
    (job / protocol.WORK).mkdir(parents=True)
    (job / protocol.PID).write_text(f"{pid}\n")
    (base / protocol.RUNNING / f"b{protocol.RUN_SEP}{key}").write_text("1 -\n")
    sh(base, 'write_status "$1" "$S_RUNNING" ""', str(job))
    return job


def test_status_reports_a_vanished_process_aborted_and_frees_its_cpus(tmp_path: Path) -> None:
    sh(tmp_path, ":")
    dead = subprocess.Popen(["true"])
    dead.wait()
    _running(tmp_path, "gone", dead.pid)
    out = sh(tmp_path, "dispatch() { :; }; status b 0")
    got = JobStatus.model_validate_json(out)
    assert (got.state, got.reason) == ("aborted", "process vanished (killed, or the host restarted)")
    assert not list((tmp_path / protocol.RUNNING).iterdir())


def test_cancel_drops_queued_jobs_and_kills_running_ones(tmp_path: Path) -> None:
    sh(tmp_path, ":")
    queued = tmp_path / protocol.JOBS / "b" / "q"
    queued.mkdir(parents=True)
    sh(tmp_path, 'write_status "$1" "$S_QUEUED" "waiting for free CPUs"', str(queued))
    (tmp_path / protocol.QUEUE / "1.1").write_text("b q\n")
    done = tmp_path / protocol.JOBS / "b" / "d"
    done.mkdir(parents=True)
    sh(tmp_path, 'write_status "$1" "$S_DONE" ""', str(done))
    victim = subprocess.Popen(["sleep", "30"], start_new_session=True)  # its own process group, as run makes
    try:
        _running(tmp_path, "r", victim.pid)
        out = sh(tmp_path, "dispatch() { :; }; cancel b")
        assert sorted(out.split()) == ["q", "r"]  # the done job is left alone
        assert victim.wait(timeout=5) == -signal.SIGTERM
    finally:
        victim.kill()
    for key in ("q", "r"):
        got = record(tmp_path, "b", key)
        assert (got.state, got.reason, got.cancelled) == ("aborted", "cancelled", True)
    assert record(tmp_path, "b", "d").state == "done"
    assert not list((tmp_path / protocol.QUEUE).iterdir()) and not list((tmp_path / protocol.RUNNING).iterdir())


def test_sourcing_runs_nothing_and_an_unknown_command_is_refused(tmp_path: Path) -> None:
    assert sh(tmp_path, ":") == ""
    proc = subprocess.run(["sh", str(HOST_SH), "nope", str(tmp_path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "unknown command nope" in proc.stderr


def test_a_spot_interruption_notice_is_printed_as_json_and_read_as_text(tmp_path: Path) -> None:
    """EC2's notice (JSON itself) comes back whole inside the tick's line; the client shows its fields."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "curl").write_text('#!/bin/sh\necho \'{"action": "terminate", "time": "2026-01-01T00:00:00Z"}\'\n')
    (bin_dir / "curl").chmod(0o755)
    out = sh(tmp_path / "base", 'PATH="$1:$PATH" notice http://imds', str(bin_dir))
    assert json.loads(out) == {"interruption": '{"action": "terminate", "time": "2026-01-01T00:00:00Z"}'}
    assert protocol.parse_interruption(f"{out}\n") == "action: terminate, time: 2026-01-01T00:00:00Z"
    assert protocol.parse_interruption('{"interruption":""}\n') == "no details"
    assert protocol.parse_interruption('{"key":"a","state":"done"}\n') is None


def test_old_lists_ended_jobs_of_batches_no_client_runs_and_forget_removes_only_those(tmp_path: Path) -> None:
    """``old`` (what prune may remove): ended over the age, lease expired. ``forget`` removes a listed job only
    if it has still ended, and nothing outside jobs/ whatever name it is given."""
    base, jobs = tmp_path / "rt", tmp_path / "rt" / protocol.JOBS
    sh(base, "true")
    ended_at = int(time.time()) - 7200  # two hours ago, as the record's end file says (and its mtime)
    for batch, key, ended in [("b1", "old", True), ("b1", "running", False), ("live", "old", True)]:
        d = jobs / batch / key
        d.mkdir(parents=True)
        (d / "stdout").write_text("x" * 5000)
        if ended:
            (d / protocol.END).write_text(f"{ended_at}.5\n")
            os.utime(d / protocol.END, (ended_at, ended_at))
    sh(base, 'renew live 600 && renew b1 0 && touch -d "@$(($(date +%s) - 60))" "$BASE/$D_LEASES/b1"')
    now, rows = protocol.parse_old_jobs(sh(base, "old 60"))
    assert abs(now - time.time()) < 5
    assert [(end, rel) for _, end, rel in rows] == [(float(ended_at), "b1/old")]
    assert rows[0][0] >= 4096  # its size, in bytes
    assert protocol.parse_old_jobs(sh(base, "old 180"))[1] == []  # not old enough
    (tmp_path / "outside").mkdir()
    sh(base, "forget b1/old b1/running ../outside b1/old/x /tmp .hidden/x")
    assert sorted(p.name for p in (jobs / "b1").iterdir()) == ["running"]  # running: not ended, kept
    assert (tmp_path / "outside").is_dir() and (jobs / "live" / "old").is_dir()
    sh(base, "forget live/old")
    assert not (jobs / "live").exists()  # its batch folder went with its last job
