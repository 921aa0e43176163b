"""EC2 clients, made lazily: boto3 and prefect-aws are imported only when a client is made (the provider's
one adaptor to the SDK), so that importing the aws package costs nothing to a batch that never uses it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloudsend_prefect.config import BatchConfig

if TYPE_CHECKING:
    from mypy_boto3_ec2 import EC2Client
else:
    EC2Client = Any


class AwsError(RuntimeError):
    """An EC2 problem explained for the user (what failed, and what to do)."""


def config_dir() -> Path:
    """Keys and known hosts live here, never in the working directory."""
    return Path(os.environ.get("XDG_CONFIG_HOME", "~/.config")).expanduser() / "cloudsend"


def ec2_client(region: str | None, *, credentials: str | None = None, profile: str | None = None) -> EC2Client:
    """An EC2 client from the named AwsCredentials block, else the profile, else boto3's default chain."""
    return client("ec2", region, credentials=credentials, profile=profile)


def client(service: str, region: str | None, *, credentials: str | None = None, profile: str | None = None) -> Any:
    """A client of an AWS service (``ec2``, ``ssm``) from the named AwsCredentials block, else the profile, else
    boto3's default chain: every AWS call of the provider is made with the same credentials."""
    if credentials:
        from prefect_aws import AwsCredentials

        creds: Any = AwsCredentials.load(credentials)
        if region:
            creds = creds.model_copy(update={"region_name": region})
        if not creds.region_name:
            raise AwsError(f"no region: set `region` on the instance type or in block {credentials}")
        return creds.get_client(service)
    import boto3

    session = boto3.Session(profile_name=profile) if profile else boto3.Session()
    region = region or session.region_name
    if not region:
        raise AwsError("no region: set `region` on the instance type, in the AWS profile, or AWS_DEFAULT_REGION")
    return session.client(service, region_name=region)


def config_client(config: BatchConfig, region: str | None, service: str = "ec2") -> EC2Client:
    """A client of ``service`` (EC2 by default) for ``region`` with the config's credentials (its block, else its
    profile)."""
    return client(service, region, credentials=config.aws_credentials, profile=config.profile)


def error_code(exc: Exception) -> str:
    """EC2's error code of a botocore ``ClientError`` (``InvalidAMIID.NotFound``...), else ``""``."""
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
