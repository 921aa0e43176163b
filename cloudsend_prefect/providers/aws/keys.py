"""The project's SSH key pair per region: generated locally, kept private, imported to EC2, optionally kept in a
Prefect Secret block for workers on other machines."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

from cloudsend_prefect.config import BatchConfig
from cloudsend_prefect.providers.aws.session import EC2Client, config_dir
from cloudsend_prefect.providers.aws.tags import TAG_PROJECT


def _path_component(what: str, value: str) -> str:
    """``value`` if it can only ever name one file inside a directory: a project or region with a separator,
    a NUL or a leading dot (``..``) would put the private key (or unlink a file) outside ``keys/``."""
    unsafe = {"/", "\\", "\0", os.sep, os.altsep or "/"}
    if not value or value.startswith(".") or any(c in value for c in unsafe) or not value.isprintable():
        raise ValueError(
            f"{what} {value!r} cannot name a key file: it must be one file name component "
            "(no '/', '\\', NUL or control characters, and no leading '.')"
        )
    return value


def key_path(config: BatchConfig, region: str) -> Path:
    """``<config_dir>/keys/<project>-<region>.pem``. Checked here as well as in the config: whatever builds a
    ``BatchConfig`` (a test, a caller skipping validation), the key is never written or removed elsewhere."""
    keys = config_dir() / "keys"
    path = keys / f"{_path_component('project', config.project)}-{_path_component('region', region)}.pem"
    if path.resolve().parent != keys.resolve():  # e.g. a symlink planted as the key file's name
        raise ValueError(f"key file {path} resolves outside {keys}")
    return path


def ensure_key(ec2: EC2Client, config: BatchConfig, region: str) -> tuple[str, Path]:
    """This project's key pair in this region: generated locally (private key 0600), imported to EC2."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = key_path(config, region)
    secret = f"{config.key_secret}-{region}" if config.key_secret else None
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # mkdir's mode leaves an existing directory (or one made under a strict umask) as it is; ssh refuses a
    # private key others can read, and the directory holds every project's keys.
    if stat.S_IMODE(path.parent.stat().st_mode) != 0o700:
        path.parent.chmod(0o700)
    if path.exists() and stat.S_IMODE(path.stat().st_mode) & 0o077:
        path.chmod(0o600)
    if not path.exists():
        private = _secret_key(secret) or Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(private)
    if secret and _secret_key(secret) is None:
        from prefect.blocks.system import Secret

        Secret(value=path.read_text()).save(secret, overwrite=True)
    key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    # Named by the key's fingerprint: a lost local key gives a new pair instead of breaking or deleting the old.
    name = f"cloudsend-{config.project}-{hashlib.sha256(public).hexdigest()[:10]}"
    existing = ec2.describe_key_pairs(Filters=[{"Name": "key-name", "Values": [name]}])["KeyPairs"]
    if not existing:
        ec2.import_key_pair(
            KeyName=name,
            PublicKeyMaterial=public,
            TagSpecifications=[{"ResourceType": "key-pair", "Tags": [{"Key": TAG_PROJECT, "Value": config.project}]}],
        )
    return name, path


def _secret_key(name: str | None) -> bytes | None:
    """The private key held in a Prefect Secret block, so a worker on another machine can reach the instances."""
    if name is None:
        return None
    from prefect.blocks.system import Secret

    try:
        block: Any = Secret.load(name)
    except ValueError:  # no such block yet
        return None
    return str(block.get()).encode()
