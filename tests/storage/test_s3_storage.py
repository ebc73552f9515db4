"""S3Storage on the bed's real MinIO: paginated listing, ranged reads, verified multipart
uploads, prefix deletes, atomic downloads, and fail-fast access checks whose messages name
the endpoint, bucket and key."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from boto3.s3.transfer import TransferConfig

from kubedream_operator.devbed.bed import BedInfo
from kubedream_operator.spec import StorageSpec
from kubedream_trainer.storage import (
    StorageAccessError,
    StorageError,
    open_storage,
)
from kubedream_trainer.storage.s3 import S3Storage, expected_etag, make_client

pytestmark = [pytest.mark.testbed, pytest.mark.timeout(120)]

MIB = 1024 * 1024
SMALL_PARTS = TransferConfig(
    multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB, max_concurrency=3
)


def _count_calls(storage: S3Storage, operation: str) -> list[dict[str, Any]]:
    """Record the parameters of every `operation` request the storage sends (through a client
    of its own, as clients are shared between storages)."""
    storage.client = make_client(storage.settings, shared=False)
    calls: list[dict[str, Any]] = []

    def record(params: dict[str, Any], **_: Any) -> None:
        calls.append(dict(params))

    storage.client.meta.events.register(f"provide-client-params.s3.{operation}", record)
    return calls


def test_listing_pages_through_small_pages_in_key_order(bucket: str, settings: StorageSpec) -> None:
    storage = S3Storage(f"s3://{bucket}/root", settings, page_size=3)
    keys = [f"img{i:02d}.jpg" for i in range(8)] + ["sub/deeper/x.txt", "sub/y.txt"]
    for key in reversed(keys):
        storage.write_bytes(key, key.encode())
    storage.client.put_object(Bucket=bucket, Key="root-sibling.txt", Body=b"not under root/")
    calls = _count_calls(storage, "ListObjectsV2")
    listed = list(storage.list())
    assert [o.key for o in listed] == sorted(keys)
    assert [o.size for o in listed] == [len(k) for k in sorted(keys)]
    assert all(o.etag == hashlib.md5(o.key.encode()).hexdigest() for o in listed)
    assert len(calls) == 4, "10 keys in pages of 3"
    assert all(call["MaxKeys"] == 3 and call["Prefix"] == "root/" for call in calls)
    assert [o.key for o in storage.list("sub")] == ["sub/deeper/x.txt", "sub/y.txt"]
    assert list(storage.list("nothing-here")) == []


def test_ranged_reads(bucket: str, settings: StorageSpec) -> None:
    storage = open_storage(f"s3://{bucket}/r", settings)
    data = os.urandom(1000)
    storage.write_bytes("blob.bin", data)
    storage.write_bytes("empty.bin", b"")
    assert storage.read_range("blob.bin", 0, 10) == data[:10]
    assert storage.read_range("blob.bin", 990, 100) == data[990:], "clipped at the end"
    assert storage.read_range("blob.bin", 5000, 10) == b"", "past the end"
    assert storage.read_range("empty.bin", 0, 64) == b""
    assert storage.read_range("blob.bin", 0, 0) == b""
    with pytest.raises(FileNotFoundError, match=rf"s3://{bucket}/r/missing.bin"):
        storage.read_range("missing.bin", 0, 10)


def test_multipart_upload_above_the_threshold_is_verified_and_reads_back(
    bucket: str, settings: StorageSpec, tmp_path: Path
) -> None:
    storage = S3Storage(f"s3://{bucket}/ckpt", settings, transfer=SMALL_PARTS)
    big = tmp_path / "unet.safetensors"
    big.write_bytes(os.urandom(12 * MIB + 123))
    small = tmp_path / "config.json"
    small.write_bytes(b'{"a": 1}')
    parts = _count_calls(storage, "UploadPart")
    storage.upload_files([(big, "step-1/unet.safetensors"), (small, "step-1/config.json")])
    assert len(parts) == 3, "12 MiB in 5 MiB parts"
    info = storage.stat("step-1/unet.safetensors")
    assert info.size == big.stat().st_size
    assert info.etag.endswith("-3")
    assert info.etag == expected_etag(big, SMALL_PARTS)
    assert storage.stat("step-1/config.json").etag == hashlib.md5(b'{"a": 1}').hexdigest()
    back = tmp_path / "back" / "unet.safetensors"
    storage.download_file("step-1/unet.safetensors", back)
    assert back.read_bytes() == big.read_bytes()
    assert not list(back.parent.glob(".kd-tmp-*"))


def test_an_upload_that_does_not_match_the_local_file_is_reported(
    bucket: str, settings: StorageSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = S3Storage(f"s3://{bucket}/v", settings, make_client(settings, shared=False))
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    # The file changes between hashing and uploading: what landed is not what was hashed.
    real = storage.client.upload_file

    def racing_upload(filename: str, *args: Any, **kwargs: Any) -> None:
        Path(filename).write_bytes(b"abd")
        real(filename, *args, **kwargs)

    monkeypatch.setattr(storage.client, "upload_file", racing_upload)
    with pytest.raises(StorageError, match=r"did not verify: ETag .* expected"):
        storage.upload_file(path, "f.bin")


def test_delete_prefix_removes_only_that_folder(bucket: str, settings: StorageSpec) -> None:
    storage = open_storage(f"s3://{bucket}/out", settings)
    for key in ["ckpt/a", "ckpt/sub/b", "ckpt-other/x", "ckptx", "keep.txt"]:
        storage.write_bytes(key, b"1")
    storage.delete_prefix("ckpt/")
    assert [o.key for o in storage.list()] == ["ckpt-other/x", "ckptx", "keep.txt"]
    storage.delete_prefix("keep.txt")  # a single object
    assert not storage.exists("keep.txt")
    many = S3Storage(f"s3://{bucket}/many", settings, page_size=250)
    for i in range(1100):  # more than one DeleteObjects request (1000 keys each)
        many.client.put_object(Bucket=bucket, Key=f"many/{i:04d}", Body=b"")
    deletes = _count_calls(many, "DeleteObjects")
    many.delete_prefix("")
    assert list(many.list()) == []
    assert len(deletes) == 2


def test_objects_bytes_stat_and_children(bucket: str, settings: StorageSpec) -> None:
    storage = open_storage(f"s3://{bucket}/base/", settings)
    assert storage.uri == f"s3://{bucket}/base"
    child = storage.child("nested/dir")
    child.write_text("progress.json", '{"step": 1}')
    assert storage.read_text("nested/dir/progress.json") == '{"step": 1}'
    assert child.exists("progress.json")
    assert not child.exists("other.json")
    info = child.stat("progress.json")
    assert (info.key, info.size) == ("progress.json", 11)
    with pytest.raises(FileNotFoundError):
        child.stat("other.json")
    with pytest.raises(FileNotFoundError, match="no such object"):
        child.read_bytes("other.json")
    with pytest.raises(FileNotFoundError):
        child.download_file("other.json", Path("/nonexistent-never-written"))


def test_check_access_passes_for_a_good_root(bucket: str, settings: StorageSpec) -> None:
    storage = open_storage(f"s3://{bucket}/data", settings)
    storage.write_bytes("a.jpg", b"x")
    storage.check_access()
    storage.check_access(require="")
    storage.check_access(require="a.jpg")
    open_storage(f"s3://{bucket}", settings).check_access(require="data")


def test_check_access_names_endpoint_bucket_and_key_of_a_missing_prefix(
    bucket: str, settings: StorageSpec, bed: BedInfo
) -> None:
    storage = open_storage(f"s3://{bucket}/no/such/prefix", settings)
    storage.check_access()  # the bucket is there
    with pytest.raises(StorageAccessError) as caught:
        storage.check_access(require="")
    message = str(caught.value)
    assert f"s3://{bucket}/no/such/prefix" in message
    assert bed.s3_endpoint in message
    assert repr(bucket) in message


@pytest.mark.usefixtures("s3_env")
def test_check_access_reports_a_missing_bucket(settings: StorageSpec, bed: BedInfo) -> None:
    storage = open_storage("s3://no-such-bucket-kd/data", settings)
    with pytest.raises(StorageAccessError) as caught:
        storage.check_access(require="")
    message = str(caught.value)
    assert "bucket 'no-such-bucket-kd' does not exist" in message
    assert bed.s3_endpoint in message
    with pytest.raises(StorageAccessError, match="'no-such-bucket-kd' does not exist"):
        storage.read_bytes("x.jpg")


def test_wrong_credentials_fail_at_once_naming_what_to_fix(
    bucket: str, settings: StorageSpec, bed: BedInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    storage = S3Storage(f"s3://{bucket}/data", settings)
    calls = _count_calls(storage, "HeadBucket")
    with pytest.raises(StorageAccessError) as caught:
        storage.check_access(require="")
    message = str(caught.value)
    assert "access denied" in message
    assert "AWS_SECRET_ACCESS_KEY" in message
    assert bed.s3_endpoint in message
    assert bucket in message
    assert len(calls) == 1, "a permanent error is not retried"
    with pytest.raises(StorageAccessError, match=r"access denied \((SignatureDoesNotMatch|403)"):
        storage.write_bytes("a.txt", b"x")


def test_no_credentials_at_all(
    settings: StorageSpec, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    storage = open_storage("s3://any-bucket/data", settings)
    with pytest.raises(StorageAccessError, match="no S3 credentials found"):
        storage.check_access()
