"""The real MinIO through boto3: multipart upload, paginated listing and ranged reads, the S3
calls the trainer's storage layer relies on."""

from __future__ import annotations

import os
import uuid
from typing import Any

import pytest

from kubedream_operator.devbed.bed import BedInfo

pytestmark = pytest.mark.testbed

PART = 5 * 1024 * 1024  # S3's minimum size for every part but the last


@pytest.fixture
def bucket(bed: BedInfo) -> Any:
    s3 = bed.s3_client()
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    yield s3, name
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
        for obj in page.get("Contents", []):
            s3.delete_object(Bucket=name, Key=obj["Key"])
    s3.delete_bucket(Bucket=name)


@pytest.mark.timeout(60)
def test_multipart_upload_then_ranged_get(bucket: Any) -> None:
    s3, name = bucket
    parts_data = [os.urandom(PART), os.urandom(PART), b"tail"]
    upload = s3.create_multipart_upload(Bucket=name, Key="ckpt/model.safetensors")
    parts = []
    for number, data in enumerate(parts_data, start=1):
        reply = s3.upload_part(
            Bucket=name,
            Key="ckpt/model.safetensors",
            UploadId=upload["UploadId"],
            PartNumber=number,
            Body=data,
        )
        parts.append({"PartNumber": number, "ETag": reply["ETag"]})
    s3.complete_multipart_upload(
        Bucket=name,
        Key="ckpt/model.safetensors",
        UploadId=upload["UploadId"],
        MultipartUpload={"Parts": parts},
    )
    whole = b"".join(parts_data)
    head = s3.head_object(Bucket=name, Key="ckpt/model.safetensors")
    assert head["ContentLength"] == len(whole)
    assert head["ETag"].strip('"').endswith("-3"), "a multipart ETag names its part count"
    start = PART - 10
    ranged = s3.get_object(
        Bucket=name, Key="ckpt/model.safetensors", Range=f"bytes={start}-{start + 19}"
    )
    assert ranged["ContentRange"] == f"bytes {start}-{start + 19}/{len(whole)}"
    assert ranged["Body"].read() == whole[start : start + 20]
    assert (
        s3.get_object(Bucket=name, Key="ckpt/model.safetensors", Range="bytes=-4")["Body"].read()
        == b"tail"
    )


@pytest.mark.timeout(60)
def test_listing_paginates_with_small_pages_and_prefixes(bucket: Any) -> None:
    s3, name = bucket
    keys = [f"data/img{i:02d}.jpg" for i in range(7)] + ["data/sub/x.txt", "other.txt"]
    for key in keys:
        s3.put_object(Bucket=name, Key=key, Body=key.encode())
    pages = list(
        s3.get_paginator("list_objects_v2").paginate(
            Bucket=name, Prefix="data/", PaginationConfig={"PageSize": 3}
        )
    )
    assert [len(p.get("Contents", [])) for p in pages] == [3, 3, 2]
    assert [o["Key"] for p in pages for o in p["Contents"]] == sorted(
        k for k in keys if k.startswith("data/")
    )
    first = s3.list_objects_v2(Bucket=name, Prefix="data/", MaxKeys=3)
    assert first["IsTruncated"] is True
    assert first["KeyCount"] == 3
    folders = s3.list_objects_v2(Bucket=name, Prefix="data/", Delimiter="/")
    assert [p["Prefix"] for p in folders["CommonPrefixes"]] == ["data/sub/"]
    assert len(folders["Contents"]) == 7


@pytest.mark.timeout(30)
def test_env_points_boto3_at_the_bed(bed: BedInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    for key, value in bed.env.items():
        monkeypatch.setenv(key, value)
    s3 = boto3.client("s3")
    assert s3.meta.endpoint_url == bed.s3_endpoint
    assert isinstance(s3.list_buckets()["Buckets"], list)
