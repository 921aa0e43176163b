"""A batch's results folder in an S3 bucket (a prefect-aws ``S3Bucket`` block): where a controller that may be
gone by then leaves them, and where ``cloudsend fetch --bucket`` finds them."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _bucket(block: str) -> Any:
    from prefect_aws import S3Bucket

    return S3Bucket.load(block)


def upload(block: str, folder: Path, batch: str) -> str:
    """Every file of ``folder`` under ``<the block's folder>/<batch>/`` in the bucket; where they went."""
    bucket = _bucket(block)
    bucket.upload_from_folder(str(folder), to_folder=batch)
    prefix = "/".join(part.strip("/") for part in (bucket.bucket_folder, batch) if part)
    return f"s3://{bucket.bucket_name}/{prefix}/"


def download(block: str, batch: str, dest: Path) -> list[Path]:
    """The batch's files from the bucket into ``dest/<batch>/``; the files written."""
    target = dest / batch
    _bucket(block).download_folder_to_path(batch, target)
    return sorted(p for p in target.rglob("*") if p.is_file())
