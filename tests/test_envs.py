"""Environments of every kind built on real sshd hosts that look like stock cloud images, offline.

- pip (``env_pypi``) on a stock host (Debian's python3 without venv or pip, no uv: see tests/stock.py): the
  client sends its own uv, the venv is built with it; on a host of another architecture without root or sudo,
  the build fails saying what the host lacks.
- conda (``env_conda``): solved and installed by rattler on the host, from a ``file://`` channel this test
  builds (a noarch package made here, indexed with rattler's indexer). Only py-rattler itself comes from PyPI.
- Julia (``env_julia``): no Julia can be downloaded here, so a stand-in ``julia`` records how it is called,
  and a stand-in ``curl`` serves a tarball holding it, in place of the official download. What is checked: the
  URL the bootstrap asks for, the Pkg calls it makes, and that jobs' ``julia`` runs with the environment's
  project. What is not: a real Julia resolving and precompiling real packages.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import os
import re
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from rattler.index import index_fs

from cloudsend_prefect.errors import ConfigError
from cloudsend_prefect.flow import run_batch
from cloudsend_prefect.providers.aws import images as aws_images
from cloudsend_prefect.resolve import load_config
from cloudsend_prefect.runtime import HostRuntime
from cloudsend_prefect.specs import EnvSpec, expand_jobs
from tests.faults import ssh_instances, write_config
from tests.host_runtime import job, wait_final
from tests.sshd import SshdHost, sshd_hosts_running
from tests.stock import debian_python, host_env, other_machine, stand_in, stock_python

JULIA_TARBALL = "julia-1.11.5-linux-x86_64.tar.gz"  # what host.sh's JULIA_VERSION names on an x86_64 host


# -- what the tests install from: a wheel, a conda channel, a Julia tarball, all made here -------------------
def make_wheel(root: Path, name: str, value: str) -> Path:
    """A pure-Python wheel of package ``name`` whose ``VALUE`` is ``value``: installable with no index."""
    dist = f"{name}-1.0.dist-info"
    files = {
        f"{name}/__init__.py": f"VALUE = {value!r}\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: cloudsend-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
        f"{len(text.encode())}"
        for path, text in files.items()
    ]
    files[f"{dist}/RECORD"] = "\n".join([*record, f"{dist}/RECORD,,"]) + "\n"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        for rel, text in files.items():
            whl.writestr(rel, text)
    return path


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    tar.addfile(info, io.BytesIO(data))


def conda_package(
    channel: Path, subdir: str, name: str, version: str, files: dict[str, bytes], links: dict[str, str] | None = None
) -> None:
    """A conda package (``.tar.bz2``) in ``channel/subdir``: ``files`` (those under ``bin/`` executable) and
    symbolic ``links`` (path -> target), with the ``info/`` metadata an installer reads."""
    links = links or {}
    index = {"name": name, "version": version, "build": "0", "build_number": 0, "depends": [], "subdir": subdir}
    if subdir == "noarch":
        index["noarch"] = "generic"
    paths = [
        {"_path": p, "path_type": "hardlink", "sha256": hashlib.sha256(b).hexdigest(), "size_in_bytes": len(b)}
        for p, b in files.items()
    ] + [{"_path": p, "path_type": "softlink"} for p in links]
    (channel / subdir).mkdir(parents=True, exist_ok=True)
    with tarfile.open(channel / subdir / f"{name}-{version}-0.tar.bz2", "w:bz2") as tar:
        _add(tar, "info/index.json", json.dumps(index).encode())
        _add(tar, "info/paths.json", json.dumps({"paths": paths, "paths_version": 1}).encode())
        _add(tar, "info/files", "".join(f"{p}\n" for p in [*files, *links]).encode())
        for path, data in files.items():
            _add(tar, path, data, 0o755 if path.startswith("bin/") else 0o644)
        for path, target in links.items():
            info = tarfile.TarInfo(path)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)


def make_channel(root: Path, *, python: bool = False) -> str:
    """A conda channel indexed by rattler's indexer, holding ``cloudsend-hello`` 1.0 (noarch: its
    ``bin/cloudsend-hello`` prints a line) and, with ``python``, a ``python`` package for linux-64 made of
    Debian's interpreter (the binary, and links to its standard library: a relocatable Python, as conda's is).
    Returns its ``file://`` URL."""
    hello = b'#!/bin/sh\necho "hello from conda in $CONDA_PREFIX"\n'
    conda_package(root, "noarch", "cloudsend-hello", "1.0", {"bin/cloudsend-hello": hello})
    if python:
        binary, version, stdlib = debian_python()
        skip = ("ensurepip", "EXTERNALLY-MANAGED")  # conda's python has no pip marker of Debian's
        links = {"bin/python3": f"python{version}", "bin/python": f"python{version}"}
        links |= {f"lib/python{version}/{e.name}": str(e) for e in sorted(stdlib.iterdir()) if e.name not in skip}
        conda_package(root, "linux-64", "python", version, {f"bin/python{version}": binary.read_bytes()}, links)
    asyncio.run(index_fs(root))
    return f"file://{root}"


def fake_julia(log: Path) -> str:
    """A stand-in ``julia`` (Python, for an exact record): appends ``{"project": $JULIA_PROJECT, "args": [...]}``
    to ``log``; a script it is given, it says it ran."""
    return (
        "#!/usr/bin/python3\nimport json, os, sys\n"
        'project = os.environ.get("JULIA_PROJECT", "")\n'
        f"with open({str(log)!r}, 'a') as f:\n"
        '    f.write(json.dumps({"project": project, "args": sys.argv[1:]}) + "\\n")\n'
        'if sys.argv[1:] and not sys.argv[1].startswith("--project="):\n'
        "    print(f\"julia ran {sys.argv[1]} in {project or 'no project'}\")\n"
    )


def calls(log: Path) -> list[dict]:
    """What the stand-ins recorded, in order."""
    return [json.loads(line) for line in log.read_text().splitlines()]


def make_julia_tarball(root: Path, log: Path) -> Path:
    """The official tarball's layout (``julia-<version>/bin/julia``), holding the stand-in."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / JULIA_TARBALL
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "julia-1.11.5/bin/julia", fake_julia(log).encode(), 0o755)
    return path


# -- hosts ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stock_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshdHost]:
    """An sshd host whose PATH has a stock image's python3 (no venv, no pip) and no uv."""
    root = tmp_path_factory.mktemp("stock")
    image = stock_python(root / "image")
    with sshd_hosts_running(root / "sshd", 1, env=host_env(image)) as hosts:
        yield hosts[0]


@pytest.fixture(scope="module")
def julia_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SshdHost, SshdHost, Path]]:
    """Two hosts: one without julia (its curl is a stand-in serving the tarball), one with julia on PATH; and the
    log both stand-ins write to."""
    root = tmp_path_factory.mktemp("julia")
    log = root / "calls.log"
    tarball = make_julia_tarball(root / "download", log)
    bare, has = root / "bare-bin", root / "julia-bin"
    bare.mkdir()
    has.mkdir()
    serve = f'while [ $# -gt 1 ]; do [ "$1" = -o ] && cp {tarball} "$2"; shift; done\n'  # curl -o FILE URL
    stand_in(bare, "curl", f'printf \'{{"curl": "%s"}}\\n\' "$*" >> {log}\n{serve}')
    julia = has / "julia"
    julia.write_text(fake_julia(log))
    julia.chmod(0o755)
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(sshd_hosts_running(root / "sshd-bare", 1, env=host_env(bare)))
        second = stack.enter_context(sshd_hosts_running(root / "sshd-julia", 1, env=host_env(has)))
        yield first[0], second[0], log


def runtime_on(host: SshdHost, name: str) -> HostRuntime:
    rt = HostRuntime(host.transport(), f"{host.home}/{name}", capacity=2)
    rt.install()
    return rt


def build(rt: HostRuntime, env: EnvSpec, timeout: float = 240) -> str:
    """Build ``env`` as the flow's bootstrap task does; its final state."""
    state = rt.ensure_env(env)
    deadline = time.monotonic() + timeout
    while state == "building":
        assert time.monotonic() < deadline, rt.env_log_tail(env)
        time.sleep(0.3)
        state = rt.env_state(env)
    return state


def env_spec(files: dict[str, str], name: str = "e") -> EnvSpec:
    from cloudsend_prefect.hashing import digest

    return EnvSpec(name=name, hash=digest(files), files=files)


def run_one(rt: HostRuntime, env: EnvSpec, command: str, batch: str = "b") -> str:
    """Run ``command`` in ``env`` on the host; its stdout (the job must succeed)."""
    spec = job(f"j-{env.key}", command, outputs=["out.txt"], env=env)
    spec.command = f"({command}) > out.txt"
    rt.stage(batch, [spec])
    state = wait_final(rt, batch, [spec.key], timeout=60)[spec.key]
    assert state.state == "done", (state, rt.env_log_tail(env))
    return Path(rt.work_dir(batch, spec.key), "out.txt").read_text()


# -- stock images ---------------------------------------------------------------------------------------------
def test_the_stock_host_is_a_stock_image(stock_host: SshdHost) -> None:
    """The fixture is faithful: python3 there cannot make a venv, has no pip, and there is no uv."""
    t = stock_host.transport()
    venv = t.run("cd /tmp && python3 -m venv stock-venv-check; echo rc=$?; rm -rf stock-venv-check")
    assert "ensurepip is not\navailable" in venv.stdout + venv.stderr and "rc=1" in venv.stdout
    assert "No module named pip" in t.run("python3 -m pip --version").stderr
    assert t.run("command -v uv || echo none").stdout.strip() == "none"


def test_pip_environment_on_a_stock_image_uses_the_uv_the_client_sends(stock_host: SshdHost, tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path / "wheels", "cswheel", "from the wheel")
    rt = runtime_on(stock_host, "pip")
    env = env_spec({"requirements.txt": f"{wheel}\n"})
    assert build(rt, env) == "ready", rt.env_log_tail(env)
    assert Path(f"{stock_host.home}/pip/bin/uv").is_file()  # sent once, kept for the host's next builds
    out = run_one(rt, env, "python -c 'import cswheel, sys; print(cswheel.VALUE, sys.prefix)'")
    assert out == f"from the wheel {stock_host.home}/pip/envs/{env.key}/venv\n"
    assert rt.ensure_env(env) == "ready"  # reused by hash, not rebuilt


def test_a_failed_build_asked_again_starts_afresh(stock_host: SshdHost, tmp_path: Path) -> None:
    """A build that failed half-way (its wheel was missing) is built again when asked, over what it left."""
    wheel = tmp_path / "wheels" / "later-1.0-py3-none-any.whl"
    rt = runtime_on(stock_host, "retry")
    env = env_spec({"requirements.txt": f"{wheel}\n"})
    assert build(rt, env) == "failed"
    assert Path(f"{stock_host.home}/retry/envs/{env.key}/venv").is_dir()  # made before the install failed
    make_wheel(wheel.parent, "later", "there now")
    assert build(rt, env) == "ready", rt.env_log_tail(env)
    assert run_one(rt, env, "python -c 'import later; print(later.VALUE)'") == "there now\n"


def test_pip_environment_fails_clearly_where_nothing_can_be_sent_or_installed(tmp_path_factory) -> None:
    """A host of another architecture (the client's uv would not run there), without root or sudo."""
    root = tmp_path_factory.mktemp("arm")
    image = stock_python(root / "image")
    other_machine(image)
    with sshd_hosts_running(root / "sshd", 1, env=host_env(image)) as hosts:
        rt = runtime_on(hosts[0], "arm")
        env = env_spec({"requirements.txt": "six\n"})
        assert build(rt, env) == "failed"
        log = rt.env_log_tail(env)
        assert "apt-get needs root or passwordless sudo on this host" in log
        assert "install uv or python3-venv on it" in log and "(Linux aarch64)" in log
        assert not Path(f"{hosts[0].home}/arm/bin/uv").exists()


# -- conda ------------------------------------------------------------------------------------------------------
def test_conda_environment_from_a_local_channel(stock_host: SshdHost, tmp_path: Path) -> None:
    channel = make_channel(tmp_path / "channel")
    rt = runtime_on(stock_host, "conda")
    env = env_spec({"conda.txt": "cloudsend-hello >=1.0\n", "conda-channels.txt": f"{channel}\n"})
    assert build(rt, env) == "ready", rt.env_log_tail(env)
    assert "cloudsend-hello 1.0 0" in rt.env_log_tail(env)  # what the solver chose, in the bootstrap log
    prefix = f"{stock_host.home}/conda/envs/{env.key}/conda"
    assert run_one(rt, env, "cloudsend-hello") == f"hello from conda in {prefix}\n"
    # environment.yml: its own channels, its pip section into the environment's python, if it has one
    yml = env_spec(
        {"environment.yml": f"name: x\nchannels: [{channel}]\ndependencies:\n  - cloudsend-hello\n  - pip: [six]\n"}
    )
    assert build(rt, yml) == "failed"
    assert "pip packages need python in the conda environment: add python to env_conda" in rt.env_log_tail(yml)


def test_conda_environment_yml_with_python_and_pip_packages(stock_host: SshdHost, tmp_path: Path) -> None:
    channel = make_channel(tmp_path / "channel", python=True)
    wheel = make_wheel(tmp_path / "wheels", "cswheel", "from pip, in conda")
    rt = runtime_on(stock_host, "conda")
    yml = f"channels: [{channel}]\ndependencies:\n  - python\n  - cloudsend-hello\n  - pip:\n      - {wheel}\n"
    env = env_spec({"environment.yml": yml})
    assert build(rt, env) == "ready", rt.env_log_tail(env)
    prefix = f"{stock_host.home}/conda/envs/{env.key}/conda"
    out = run_one(rt, env, "cloudsend-hello; python -c 'import cswheel, sys; print(cswheel.VALUE, sys.prefix)'")
    assert out == f"hello from conda in {prefix}\nfrom pip, in conda {prefix}\n"


def test_conda_environment_that_cannot_be_solved_says_why(stock_host: SshdHost, tmp_path: Path) -> None:
    channel = make_channel(tmp_path / "channel")
    rt = runtime_on(stock_host, "conda")
    env = env_spec({"conda.txt": "cloudsend-hello >=2\n", "conda-channels.txt": f"{channel}\n"})
    assert build(rt, env) == "failed"
    log = rt.env_log_tail(env)
    assert "conda environment failed" in log and "cloudsend-hello" in log


def _python_older_than_3_10() -> Path:
    """An interpreter older than py-rattler supports (Amazon Linux 2023's python3 is 3.9), or a skip saying so."""
    found = sorted(Path("/").glob("root/.pyenv/versions/3.[6-9].*/bin/python3")) + sorted(
        Path("/usr/bin").glob("python3.[6-9]")
    )
    if not found:
        reason = "no Python older than 3.10 on this machine (pyenv's or /usr/bin's) to stand for a host's python3"
        if os.environ.get("CI"):  # CI's machine kind has one: there, not testing is a failure
            pytest.fail(reason)
        pytest.skip(reason)
    return found[-1]


def test_conda_on_a_host_whose_python3_is_too_old_for_rattler(tmp_path_factory, tmp_path: Path) -> None:
    """A python3 that makes venvs but is older than 3.10: the client sends uv (which finds or fetches a newer
    Python); where it cannot, the build says what is missing instead of failing in pip."""
    channel = make_channel(tmp_path / "channel")
    env = env_spec({"conda.txt": "cloudsend-hello\n", "conda-channels.txt": f"{channel}\n"})
    root = tmp_path_factory.mktemp("old")
    same, other = root / "same-bin", root / "other-bin"
    for bin_dir in (same, other):
        bin_dir.mkdir()
        (bin_dir / "python3").symlink_to(_python_older_than_3_10())
    other_machine(other)
    with contextlib.ExitStack() as stack:
        (near,) = stack.enter_context(sshd_hosts_running(root / "sshd-same", 1, env=host_env(same)))
        (far,) = stack.enter_context(sshd_hosts_running(root / "sshd-other", 1, env=host_env(other)))
        rt = runtime_on(near, "old")
        assert build(rt, env) == "ready", rt.env_log_tail(env)
        assert Path(f"{near.home}/old/bin/uv").is_file()
        rt = runtime_on(far, "old")
        assert build(rt, env) == "failed"
        log = rt.env_log_tail(env)
        assert "conda environments need Python 3.10 or newer here (for py-rattler), or uv, which fetches one:" in log
        assert "python3 is Python 3." in log


def test_a_batch_with_pip_and_conda_environments_on_a_stock_host(stock_host: SshdHost, tmp_path: Path) -> None:
    """What a user runs: a config with both kinds, jobs in each, through the flow."""
    wheel = make_wheel(tmp_path / "wheels", "cswheel", "42")
    channel = make_channel(tmp_path / "channel")
    files = {
        "reqs/requirements.txt": f"{wheel}\n",  # the predecessor's folder form: env_pypi names the folder
        "use.py": "import cswheel\nopen('out.txt', 'w').write(cswheel.VALUE + '\\n')\n",
    }
    config = {
        "project": "envs",
        "poll_interval": 0.2,
        "instances": ssh_instances([stock_host], 2, "flow"),
        "environments": [
            {"name": "py", "env_pypi": "reqs"},
            {"name": "cf", "env_conda": ["cloudsend-hello"], "env_conda_channels": [channel]},
        ],
        "jobs": [
            {"name": "pip-job", "run_script": "use.py", "env_name": "py", "output_files": ["out.txt"]},
            {
                "name": "conda-job",
                "run_command": "cloudsend-hello > out.txt",
                "env_name": "cf",
                "output_files": "out.txt",
            },
        ],
    }
    path = write_config(tmp_path / "proj", config, files)
    summary = run_batch(config=str(path), results_dir=str(tmp_path / "results"))
    assert summary.ok, [(j.name, j.reason) for j in summary.jobs if not j.ok]
    results = tmp_path / "results" / "envs"
    assert (results / "pip-job" / "out.txt").read_text() == "42\n"
    assert (results / "conda-job" / "out.txt").read_text().startswith("hello from conda in ")


# -- julia ------------------------------------------------------------------------------------------------------
def test_julia_is_installed_then_packages_added_and_jobs_run_in_the_project(julia_hosts, tmp_path: Path) -> None:
    bare, _, log = julia_hosts
    rt = runtime_on(bare, "jl")
    env = env_spec({"julia.txt": "Example\nJSON@0.21\n"})
    assert build(rt, env) == "ready", rt.env_log_tail(env)
    project = f"{bare.home}/jl/envs/{env.key}/julia"
    made = calls(log)
    url = f"https://julialang-s3.julialang.org/bin/linux/x64/1.11/{JULIA_TARBALL}"
    assert made[0]["curl"].startswith(f"-fsSL -o {bare.home}/jl/tools/julia-1.11.5.") and made[0]["curl"].endswith(url)
    add, instantiate = made[1], made[2]
    assert add["project"] == "" and add["args"][:2] == [f"--project={project}", "-e"]
    assert add["args"][2].startswith("using Pkg\nPkg.add(") and add["args"][3:] == ["Example", "JSON@0.21"]
    assert instantiate == {
        "project": "",
        "args": [f"--project={project}", "-e", "using Pkg; Pkg.instantiate(); Pkg.precompile()"],
    }
    out = run_one(rt, env, "echo 'println(1)' > run.jl && julia run.jl 7")
    assert out == f"julia ran run.jl in {project}\n"  # the installed julia, on the job's PATH, in the project
    assert calls(log)[-1] == {"project": project, "args": ["run.jl", "7"]}
    log.write_text("")
    again = env_spec({"julia.txt": "Example\n"})
    assert build(rt, again) == "ready"
    assert not any("curl" in call for call in calls(log))  # installed once per host


def test_julia_project_file_on_a_host_that_has_julia(julia_hosts, tmp_path: Path) -> None:
    _, has, log = julia_hosts
    log.write_text("")
    rt = runtime_on(has, "jlproj")
    project_toml = '[deps]\nExample = "7876af07-990d-54b4-ab0e-23690620f79a"\n'
    env = env_spec({"Project.toml": project_toml, "Manifest.toml": "# exact versions\n"})
    assert build(rt, env) == "ready", rt.env_log_tail(env)
    project = Path(f"{has.home}/jlproj/envs/{env.key}/julia")
    assert (project / "Project.toml").read_text() == project_toml and (project / "Manifest.toml").is_file()
    assert calls(log) == [  # nothing downloaded, nothing added: the project says it all
        {"project": "", "args": [f"--project={project}", "-e", "using Pkg; Pkg.instantiate(); Pkg.precompile()"]}
    ]
    assert run_one(rt, env, "julia run.jl") == f"julia ran run.jl in {project}\n"


# -- the config side: folders, project files, errors before anything is created ---------------------------------
def test_folders_and_project_files_name_environment_files(tmp_path: Path) -> None:
    files = {
        "pyenv/requirements.txt": "numpy\n",
        "condaenv/environment.yml": "dependencies: [numpy]\n",
        "jl/Project.toml": "[deps]\n",
        "jl/Manifest.toml": "# m\n",
        "run.sh": "true\n",
    }
    config = {
        "environments": [
            {"name": "a", "env_pypi": "pyenv", "env_conda": "condaenv/", "env_julia": "./jl"},
            {"name": "b", "env_julia": "jl/Project.toml"},
            {"name": "c", "env_julia": "Example, JSON"},
        ],
        "jobs": [{"run_script": "run.sh", "env_name": "a"}],
    }
    cfg = load_config(write_config(tmp_path, config, files))
    from cloudsend_prefect.specs import resolve_envs

    envs = resolve_envs(cfg)
    assert envs["a"].files == {
        "requirements.txt": "numpy\n",
        "environment.yml": "dependencies: [numpy]\n",
        "Project.toml": "[deps]\n",
        "Manifest.toml": "# m\n",
    }
    assert envs["b"].files == {"Project.toml": "[deps]\n", "Manifest.toml": "# m\n"}
    assert envs["c"].files == {"julia.txt": "Example\nJSON\n"}  # the predecessor's comma-separated list
    (tmp_path / "jl" / "Manifest.toml").write_text("# other versions\n")
    assert resolve_envs(load_config(tmp_path / "batch.yaml"))["b"].hash != envs["b"].hash


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"env_pypi": "empty"}, "environments[0].env_pypi: empty is a folder without requirements.txt"),
        ({"env_conda": "empty"}, "environments[0].env_conda: empty is a folder without environment.yml or"),
        ({"env_julia": "empty/"}, "environments[0].env_julia: empty/ is a folder without Project.toml or"),
        ({"env_julia": "nowhere/Project.toml"}, "environments[0].env_julia: file not found: nowhere/Project.toml"),
    ],
)
def test_a_folder_without_the_file_is_refused_before_anything_runs(tmp_path: Path, env: dict, message: str) -> None:
    (tmp_path / "empty").mkdir()
    path = write_config(tmp_path, {"environments": [env], "jobs": [{"run_command": "true"}]})
    with pytest.raises(ConfigError, match=re.escape(message)):
        expand_jobs(load_config(path))


# -- the aws provider's login user, per image -------------------------------------------------------------------
def test_img_username_defaults_to_the_images_own_user(aws_env) -> None:
    """Ubuntu images log in as ubuntu, Debian's as admin, Amazon Linux's as ec2-user; `img_username` overrides."""
    from tests.moto_server import ec2, linux_ami

    client = ec2()
    ubuntu = linux_ami(client)["ImageId"]
    amazon = client.describe_images(Owners=["amazon"], Filters=[{"Name": "name", "Values": ["al2023-ami-*"]}])
    debian = client.register_image(
        Name="debian-12-amd64-20251001-2250", Description="Debian 12 (20251001-2250)", RootDeviceName="/dev/xvda"
    )["ImageId"]
    users = {image: aws_images.image_user(client, aws_env.region, image) for image in (ubuntu, debian)}
    users[amazon["Images"][0]["ImageId"]] = aws_images.image_user(
        client, aws_env.region, amazon["Images"][0]["ImageId"]
    )
    assert sorted(users.values()) == ["admin", "ec2-user", "ubuntu"]
    assert users[ubuntu] == "ubuntu" and users[debian] == "admin"
    amazon_gpu = {"Name": "Deep Learning Base OSS Nvidia Driver GPU AMI (Amazon Linux 2023)"}
    assert aws_images.login_user(amazon_gpu) == "ec2-user"
    assert aws_images.login_user({"Name": "my-own-image"}) == aws_images.DEFAULT_USER == "ubuntu"
