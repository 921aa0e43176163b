"""What a new instance runs at its first boot: cloud-init user data installing the dead-man switch
(``providers/deadman.sh``) as a systemd service, so that an instance whose client died powers itself off."""

from __future__ import annotations

from importlib.resources import files

import yaml

from cloudsend_prefect.config import BatchConfig

DEADMAN = files("cloudsend_prefect.providers").joinpath("deadman.sh").read_text()  # see deadman.sh
DEADMAN_UNIT = "cloudsend-deadman.service"


def idle_seconds(config: BatchConfig) -> int:
    """``idle_minutes`` as the dead-man switch takes it: whole seconds, at least one."""
    return max(1, round(config.idle_minutes * 60))


def user_data(config: BatchConfig, busy: str | None = None) -> str:
    """cloud-init's instructions for a new instance: install the dead-man switch (deadman.sh) as a systemd
    service and enable it, so that it runs from every boot on. User data runs on the first boot only; an
    instance stopped at a batch's end and started by the next run must still power itself off if that run's
    client dies. ``busy``: a shell command that, while it succeeds, also keeps the instance up (a controller's
    running flow runs)."""
    limit = idle_seconds(config)
    # systemd's quoting: the whole assignment in double quotes, the command's own quotes escaped.
    check = "" if busy is None else 'Environment="CLOUDSEND_DEADMAN_BUSY=' + busy.replace('"', '\\"') + '"\n'
    unit = f"""[Unit]
Description=cloudsend dead-man switch: power off after {limit}s without a running job or a client

[Service]
{check}ExecStart=/usr/local/bin/cloudsend-deadman {limit}
Restart=always
RestartSec=30

[Install]
WantedBy=multi-user.target
"""
    cloud_config = {
        "write_files": [
            {"path": "/usr/local/bin/cloudsend-deadman", "permissions": "0755", "content": DEADMAN},
            {"path": f"/etc/systemd/system/{DEADMAN_UNIT}", "permissions": "0644", "content": unit},
        ],
        # --no-block: cloud-init's own unit is still starting; waiting for another unit from it could deadlock
        "runcmd": [["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", "--no-block", DEADMAN_UNIT]],
    }
    return "#cloud-config\n" + yaml.dump(cloud_config, Dumper=_Literal, sort_keys=False, width=1000)


class _Literal(yaml.SafeDumper):
    """YAML with multi-line strings as literal blocks: the user data stays readable on the instance
    (/var/lib/cloud/instance/user-data.txt)."""


def _text(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    """A string as YAML, multi-line ones as literal blocks."""
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_Literal.add_representer(str, _text)
