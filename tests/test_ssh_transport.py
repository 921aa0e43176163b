"""SSHTransport against real sshd processes on loopback ports (see tests/sshd.py)."""

from __future__ import annotations

import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from cloudsend_prefect.transport import TransportError
from tests.sshd import SshdHost, _write_keypair, sshd_hosts  # noqa: F401  (fixture)

FAST_RETRY = (0.1, 0.2)


@pytest.fixture
def hosts(sshd_hosts: list[SshdHost]) -> list[SshdHost]:  # noqa: F811
    for h in sshd_hosts:  # a failed fault-injection test must not leave a host down for the next
        h.start()
    return sshd_hosts


@pytest.fixture
def host(hosts: list[SshdHost]) -> SshdHost:
    return hosts[0]


@pytest.fixture(scope="module", autouse=True)
def real_ssh_dir_untouched() -> object:
    ssh_dir = Path.home() / ".ssh"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in ssh_dir.iterdir()) if ssh_dir.exists() else None
    yield
    after = sorted((p.name, p.stat().st_mtime_ns) for p in ssh_dir.iterdir()) if ssh_dir.exists() else None
    assert after == before, "the tests modified the user's ~/.ssh"


def test_run_returns_exit_code_and_output(host: SshdHost) -> None:
    t = host.transport()
    try:
        ok = t.run("echo hello")
        assert (ok.exit_code, ok.stdout, ok.stderr, ok.ok) == (0, "hello\n", "", True)
        failed = t.run("echo out; echo err >&2; exit 3")
        assert (failed.exit_code, failed.stdout, failed.stderr, failed.ok) == (3, "out\n", "err\n", False)
        # quoting survives the trip through the login shell; commands start in the login home
        assert t.run("""printf '%s|' "it's" '$HOME' "a  b"; pwd""").stdout == f"it's|$HOME|a  b|{host.home}\n"
        assert t.run("exit 255").exit_code == 255
        assert t.round_trips == 4
    finally:
        t.close()


def test_stdin_is_fed_and_large_streams_do_not_deadlock(host: SshdHost) -> None:
    t = host.transport()
    try:
        assert t.run("wc -l", stdin="a\nb\nc\n").stdout.strip() == "3"
        assert t.run("cat").stdout == ""  # no stdin: EOF at once, not a hang
        # 3 MB each way is more than paramiko's 2 MB window: input, output and errors must interleave
        big = "x" * 3_000_000
        r = t.run("cat; head -c 3000000 /dev/zero | tr '\\0' e >&2", stdin=big, timeout=30)
        assert r.exit_code == 0
        assert r.stdout == big
        assert r.stderr == "e" * 3_000_000
    finally:
        t.close()


def test_put_get_roundtrip(host: SshdHost, tmp_path: Path) -> None:
    data = os.urandom(300_000)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    t = host.transport()
    try:
        assert t.run("mkdir -p sub").ok
        t.put(src, "sub/file.bin")  # relative to the login home
        assert (host.home / "sub" / "file.bin").read_bytes() == data
        got = tmp_path / "deep" / "dir" / "got.bin"
        t.get("~/sub/file.bin", got)
        assert got.read_bytes() == data
        t.put(src, str(host.home / "abs.bin"))
        t.get(str(host.home / "abs.bin"), got)
        assert got.read_bytes() == data
        with pytest.raises(FileNotFoundError):
            t.get("sub/missing", tmp_path / "missing")
        assert not (tmp_path / "missing").exists()
        assert not list(tmp_path.glob("**/.*.part"))
        assert t.round_trips == 6
        assert t.connections_opened == 1
    finally:
        t.close()


def test_concurrent_runs_share_one_connection_within_the_channel_bound(host: SshdHost) -> None:
    t = host.transport(max_channels=8)
    results: list[str] = []
    errors: list[BaseException] = []

    def job(i: int) -> None:
        try:
            r = t.run(f"date +%s.%N; sleep 0.3; date +%s.%N; echo {i}")
            assert r.exit_code == 0, r
            results.append(r.stdout)
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=job, args=(i,)) for i in range(20)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
        assert not errors
        assert sorted(int(r.split()[2]) for r in results) == list(range(20))
        assert t.connections_opened == 1
        assert t.round_trips == 20
        # the host saw at most 8 commands at once, and did run them in parallel
        spans = [(float(r.split()[0]), float(r.split()[1])) for r in results]
        overlap = max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)
        assert 2 <= overlap <= 8
    finally:
        t.close()


def test_many_short_commands_never_drop_the_connection(host: SshdHost) -> None:
    # Commands that exit without reading their input race their own stdin EOF against the server's
    # close; an EOF after the close makes sshd drop the whole connection.
    t = host.transport()
    try:
        with ThreadPoolExecutor(12) as pool:
            codes = list(pool.map(lambda i: t.run("exit 4", stdin="x" * (i % 3) * 40_000).exit_code, range(300)))
        assert codes == [4] * 300
        assert t.connections_opened == 1
    finally:
        t.close()


def test_channels_refused_by_max_sessions_are_retried(host: SshdHost) -> None:
    # more channels than the host's MaxSessions (20): the extra ones are refused, then retried
    t = host.transport(max_channels=30)
    try:
        with ThreadPoolExecutor(30) as pool:
            results = list(pool.map(lambda i: t.run(f"sleep 0.3; echo {i}"), range(30)))
        assert [r.stdout for r in results] == [f"{i}\n" for i in range(30)]
        assert t.connections_opened == 1
    finally:
        t.close()


def test_round_trip_on_a_reused_connection_is_fast(host: SshdHost) -> None:
    t = host.transport()
    try:
        t.run("true")
        times = []
        for _ in range(30):
            start = time.perf_counter()
            t.run("true")
            times.append(time.perf_counter() - start)
        median_ms = statistics.median(times) * 1000
        print(f"median run('true') round trip: {median_ms:.1f} ms")
        # ~3 ms on loopback; 40+ ms means Nagle (no TCP_NODELAY) or a slow ~/.bashrc is back
        assert median_ms < 25
    finally:
        t.close()


def test_unknown_host_key_is_refused_with_instructions(host: SshdHost, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    t = host.transport(known_hosts=str(empty), retry_delays=FAST_RETRY)
    with pytest.raises(TransportError) as info:
        t.run("true")
    message = str(info.value)
    assert f"127.0.0.1:{host.port}" in message
    assert "unknown host key" in message
    assert "ssh-keyscan" in message and "host_key=" in message and "accept_new_host_key" in message
    assert empty.read_text() == ""


def test_mismatching_host_key_is_refused(hosts: list[SshdHost], tmp_path: Path) -> None:
    host, other = hosts[0], hosts[1]
    with pytest.raises(TransportError, match=r"HOST KEY MISMATCH") as info:
        host.transport(host_key=other.host_public_key).run("true")
    assert f"127.0.0.1:{host.port}" in str(info.value)
    # a known_hosts entry with another key for this host:port is refused the same way
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{host.port} {other.host_public_key}\n")
    with pytest.raises(TransportError, match=r"HOST KEY MISMATCH"):
        host.transport(known_hosts=str(wrong)).run("true")
    # ...even when accepting new keys
    with pytest.raises(TransportError, match=r"HOST KEY MISMATCH"):
        host.transport(known_hosts=str(wrong), accept_new_host_key=True).run("true")
    # and the right pinned key works without any known_hosts file
    pinned = host.transport(host_key=host.host_public_key, known_hosts=str(tmp_path / "none"))
    assert pinned.run("echo pinned").stdout == "pinned\n"
    pinned.close()


def test_accept_new_host_key_records_it(host: SshdHost, tmp_path: Path) -> None:
    known_hosts = tmp_path / "ssh" / "known_hosts"
    t = host.transport(known_hosts=str(known_hosts), accept_new_host_key=True)
    assert t.run("echo hi").stdout == "hi\n"
    t.close()
    assert known_hosts.read_text() == f"[127.0.0.1]:{host.port} {host.host_public_key}\n"
    # the recorded key is now trusted without the opt-in
    strict = host.transport(known_hosts=str(known_hosts))
    assert strict.run("echo again").stdout == "again\n"
    strict.close()
    assert known_hosts.read_text().count("\n") == 1


def test_wrong_client_key_fails_fast_with_an_auth_error(host: SshdHost, tmp_path: Path) -> None:
    _write_keypair(tmp_path / "stranger", "stranger")
    t = host.transport(key_file=str(tmp_path / "stranger"))
    start = time.monotonic()
    with pytest.raises(TransportError, match=r"authentication as 'root'|authentication as") as info:
        t.run("true")
    assert time.monotonic() - start < 2  # not retried: a retry cannot fix credentials
    assert "authorized_keys" in str(info.value)


def test_stopped_host_gives_transport_error_naming_it(hosts: list[SshdHost]) -> None:
    host = hosts[2]
    t = host.transport(retry_delays=FAST_RETRY)
    host.stop()
    try:
        with pytest.raises(TransportError) as info:
            t.run("true")
        assert info.value.host.endswith(f"127.0.0.1:{host.port})")
        assert f"127.0.0.1:{host.port}" in str(info.value)
        assert "3 attempt(s)" in str(info.value)
    finally:
        host.start()
    assert t.run("echo up").stdout == "up\n"
    t.close()


def test_restarted_host_is_reconnected_transparently(hosts: list[SshdHost], tmp_path: Path) -> None:
    host = hosts[1]
    src = tmp_path / "f.txt"
    src.write_text("before")
    t = host.transport()
    try:
        assert t.run("echo before").stdout == "before\n"
        t.put(src, "f.txt")
        host.stop()  # kills the sessions too, so the client's connection really drops
        host.start()
        assert t.run("echo after").stdout == "after\n"
        src.write_text("after")
        t.put(src, "f.txt")  # the SFTP client is reopened on the new connection
        assert (host.home / "f.txt").read_text() == "after"
        assert t.connections_opened == 2
    finally:
        t.close()


def test_timeout_raises_and_leaves_the_connection_usable(host: SshdHost) -> None:
    t = host.transport()
    try:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            t.run("echo $$ > timed_out.pid; exec sleep 20", timeout=0.5)
        assert time.monotonic() - start < 2
        # The transport asks sshd to SIGTERM the command, but sshd refuses signals for root logins
        # (no privilege-separated child), so here the command may outlive its timeout.
        pid = t.run("cat timed_out.pid").stdout.strip()
        assert pid
        t.run(f"kill {pid}")
        assert t.connections_opened == 1
    finally:
        t.close()


def test_detached_job_returns_at_once_and_survives_close(host: SshdHost) -> None:
    t = host.transport()
    start = time.monotonic()
    r = t.run("{ setsid nohup sleep 30 > /dev/null 2>&1 < /dev/null & } ; echo $!")
    assert time.monotonic() - start < 1
    pid = int(r.stdout)
    t.close()
    again = host.transport()
    try:
        assert again.run(f"kill -0 {pid}").exit_code == 0
        assert again.connections_opened == 1
    finally:
        again.run(f"kill {pid}")
        again.close()
