"""GPU jobs: `gpus_req` packed by CPUs and GPUs, each job given its own devices in CUDA_VISIBLE_DEVICES.

The hosts are real sshd hosts on loopback with a made-up GPU count (`gpus` on the instance type): nothing
here needs a GPU, since what is checked is which devices each job was handed, and when.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cloudsend_prefect import providers
from cloudsend_prefect.config import BatchConfig
from cloudsend_prefect.errors import ConfigError
from cloudsend_prefect.flow import run_batch
from cloudsend_prefect.loading import parse_config
from cloudsend_prefect.planning import plan, planned
from cloudsend_prefect.providers import aws
from cloudsend_prefect.providers.aws import session as aws_session
from cloudsend_prefect.resolve import load_config
from cloudsend_prefect.specs import expand_jobs
from tests.faults import ssh_instances, write_config
from tests.moto_server import CONNECTIONS, LOOPBACK, AwsEnv, linux_ami
from tests.sshd import SshdHost

# Each job writes where it ran, the devices it was given and when, then holds them a moment.
RECORD = (
    'python3 -c "import json, os, time; s = time.time(); time.sleep(1.5); '
    "print(json.dumps({'gpus': os.environ.get('CUDA_VISIBLE_DEVICES'), 'start': s, 'end': time.time()}))\" "
    "> used.json"
)


def _config(tmp_path: Path, instances: list[dict[str, Any]], jobs: list[dict[str, Any]]) -> BatchConfig:
    """The config as a run loads it: read, then checked by its providers (the aws catalog's GPU counts)."""
    path = write_config(tmp_path / "proj", {"project": "gpus", "instances": instances, "jobs": jobs})
    config = load_config(path)
    providers.validate(config)
    return config


def test_gpu_jobs_get_their_own_devices_and_run_only_where_gpus_are(tmp_path: Path, sshd_hosts: list[SshdHost]) -> None:
    gpu_host, cpu_host = sshd_hosts[:2]
    instances = [
        {**ssh_instances([gpu_host], 8, "gpus")[0], "gpus": 2},
        ssh_instances([cpu_host], 8, "gpus")[0],
    ]
    jobs = [
        {
            "name": "one-{i}",
            "run_command": RECORD + " # {i}",
            "output_files": ["used.json"],
            "gpus_req": 1,
            "matrix": {"i": [1, 2, 3, 4]},
        },
        {
            "name": "two-{i}",
            "run_command": RECORD + " # {i}",
            "output_files": ["used.json"],
            "gpus_req": 2,
            "matrix": {"i": [1, 2]},
        },
        {
            "name": "cpu-{i}",
            "run_command": RECORD + " # {i}",
            "output_files": ["used.json"],
            "matrix": {"i": [1, 2, 3, 4]},
        },
    ]
    config = write_config(
        tmp_path / "proj", {"project": "gpus", "poll_interval": 0.2, "instances": instances, "jobs": jobs}
    )
    summary = run_batch(config=str(config), results_dir=str(tmp_path / "results"))
    assert summary.ok, [(j.name, j.reason) for j in summary.jobs if not j.ok]
    used = {
        job.name: (job.host, json.loads((tmp_path / "results" / "gpus" / job.name / "used.json").read_text()))
        for job in summary.jobs
    }
    gpu_jobs = {name: record for name, (host, record) in used.items() if not name.startswith("cpu")}
    assert {used[name][0] for name in gpu_jobs} == {gpu_host.name}  # never on the host without GPUs
    for name, record in gpu_jobs.items():
        devices = record["gpus"].split(",")
        assert len(devices) == (2 if name.startswith("two") else 1) and set(devices) <= {"0", "1"}, (name, record)
    # No device was ever held by two jobs at once, so never more than the host's two were in use.
    spans = [(r["start"], r["end"], set(r["gpus"].split(","))) for r in gpu_jobs.values()]
    overlapping = [
        (devices, other)
        for i, (start, end, devices) in enumerate(spans)
        for other_start, other_end, other in spans[i + 1 :]
        if start < other_end and other_start < end
    ]
    assert overlapping, spans  # the host did run GPU jobs side by side (so the check below checks something)
    assert not [pair for pair in overlapping if pair[0] & pair[1]], spans
    # CPU jobs: on the GPU host they see no GPU (they asked for none); on the other, nothing is set.
    for name, (host, record) in used.items():
        if name.startswith("cpu"):
            assert record["gpus"] == ("" if host == gpu_host.name else None), (name, host, record)


def test_a_job_needing_more_gpus_than_any_instance_is_refused_before_anything_starts(tmp_path: Path) -> None:
    jobs = [{"run_command": "true", "gpus_req": 3}]
    with pytest.raises(ConfigError, match=r"jobs\[0\]\.gpus_req: 3 GPUs fit no instance \(the most any has is 2\)"):
        _config(tmp_path, [{"cpus": 2, "gpus": 2}], jobs)
    with pytest.raises(ConfigError, match=r"the most any has is 1\)"):  # g5.xlarge has one, per the catalog
        _config(tmp_path, [{"provider": "aws", "type": "g5.xlarge"}], [{"run_command": "true", "gpus_req": 2}])
    with pytest.raises(ConfigError, match="the most any has is 0"):
        _config(tmp_path, [{"cpus": 2}], [{"run_command": "true", "gpus_req": 1}])


def test_the_retired_elastic_gpu_key_is_accepted_and_explained(tmp_path: Path) -> None:
    config = _config(
        tmp_path, [{"provider": "aws", "type": "c6i.large", "gpu": "eg1.medium"}], [{"run_command": "true"}]
    )
    assert any("AWS retired Elastic GPUs" in note for note in config.notes), config.notes


def test_the_plan_puts_gpu_jobs_on_gpu_hosts_by_their_free_gpus(tmp_path: Path) -> None:
    instances = [{"name": "gpu", "cpus": 8, "gpus": 2}, {"name": "cpu", "cpus": 8}]
    jobs = [
        {"name": "g{i}", "run_command": "echo {i}", "gpus_req": 1, "expected_duration": 10, "matrix": {"i": [1, 2, 3]}},
        {"name": "c", "run_command": "true", "expected_duration": 10},
    ]
    config = _config(tmp_path, instances, jobs)
    hosts = planned(config)
    assert {h.name: h.gpus for h in hosts} == {"gpu": 2, "cpu": 0}
    placements = {p.job: p for p in plan(expand_jobs(config), hosts)}
    assert [(placements[g].host, placements[g].start) for g in ("g1", "g2", "g3")] == [
        ("gpu", 0.0),
        ("gpu", 0.0),
        ("gpu", 10.0),  # both GPUs busy until then, though 6 CPUs are free
    ]
    assert placements["c"].start == 0.0  # a job waiting for a GPU holds back none that needs no GPU


def test_aws_hosts_of_a_gpu_type_carry_its_gpus_and_boot_the_gpu_image_by_default(
    tmp_path: Path, aws_env: AwsEnv
) -> None:
    ami = linux_ami()

    def config(*instances: dict[str, Any]) -> BatchConfig:
        data = {"project": "gpu-aws", "provider": "aws", "ssh_from": ["203.0.113.5/32"], "instances": instances}
        return parse_config(data, source=str(tmp_path / "batch.yaml"), base_dir=tmp_path)

    given = config(
        {"type": "g5.xlarge", "img_id": ami["ImageId"], "address": LOOPBACK},  # 4 vCPUs, 1 GPU (EC2's type data)
        {"name": "cpu-only", "type": "g5.xlarge", "img_id": ami["ImageId"], "address": LOOPBACK, "gpus": 0},
    )
    hosts = aws.provision(given, list(enumerate(given.instances)), CONNECTIONS)
    assert [(h.name, h.cpus, h.gpus) for h in hosts] == [("aws-0", 4, 1), ("cpu-only", 4, 0)]
    # Without img_id a GPU type boots AWS's Deep Learning Base image (NVIDIA driver, CUDA), never plain Ubuntu
    # without a driver; moto publishes no such image, which shows as a clear error.
    default = config({"type": "g5.xlarge", "address": LOOPBACK})
    missing = r"cannot find the latest Deep Learning Base GPU image in \S+: set `img_id`"
    with pytest.raises(aws_session.AwsError, match=missing):
        aws.provision(default, list(enumerate(default.instances)), CONNECTIONS)
