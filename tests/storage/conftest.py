"""Fixtures for the storage tests: throwaway buckets on the bed's MinIO, the AWS variables
that point the trainer's S3 client at it, and a MinIO of a test's own that may be stopped
and restarted (devbed.minio)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubedream_operator.devbed.bed import BedInfo
from kubedream_operator.devbed.minio import StandaloneMinio
from kubedream_operator.spec import StorageSpec


def empty_bucket(s3: Any, name: str) -> None:
    """Delete every object (and unfinished multipart upload) of a bucket, then the bucket."""
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
        for obj in page.get("Contents", []):
            s3.delete_object(Bucket=name, Key=obj["Key"])
    for upload in s3.list_multipart_uploads(Bucket=name).get("Uploads", []):
        s3.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
    s3.delete_bucket(Bucket=name)


@pytest.fixture
def s3_env(bed: BedInfo, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The bed's AWS_* variables set in this process (the standard credential chain)."""
    for key, value in bed.env.items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    return {k: v for k, v in bed.env.items() if k.startswith("AWS_")}


@pytest.fixture
def bucket(bed: BedInfo, s3_env: dict[str, str]) -> Iterator[str]:
    """A fresh, empty bucket on the bed's MinIO (deleted afterwards)."""
    s3 = bed.s3_client()
    name = f"st-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    yield name
    empty_bucket(s3, name)


@pytest.fixture
def settings(bed: BedInfo) -> StorageSpec:
    """spec.storage for the bed's MinIO (credentials come from the environment)."""
    return StorageSpec(endpoint=bed.s3_endpoint, region=bed.s3_region, addressing_style="path")


@pytest.fixture
def own_minio(bed: BedInfo, tmp_path: Path) -> Iterator[StandaloneMinio]:
    """A MinIO of this test's own (the bed's binary), that the test may stop and restart."""
    server = StandaloneMinio(tmp_path / "minio", bed.binaries.minio)
    server.start()
    yield server
    server.stop()
