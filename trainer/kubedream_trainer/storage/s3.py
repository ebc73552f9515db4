"""S3 storage (AWS S3, MinIO, R2, Ceph) behind the same interface as a local folder.

boto3 does the protocol work: paginated listing, ranged GETs, concurrent multipart
uploads (`TransferConfig`), and retries of transient errors (5xx, throttling, timeouts,
connection resets) in its `standard` retry mode, which backs off exponentially with
jitter and is bounded by `max_attempts`. This module adds what boto3 leaves to the
caller: settings from `spec.storage` or the AWS environment, atomic local downloads, and
error messages that name the endpoint, bucket and key.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from .base import ObjectInfo, Storage, StorageError

MAX_ATTEMPTS = int(os.environ.get("KUBEDREAM_S3_MAX_ATTEMPTS", "8"))
"""Total tries per request (boto3 standard retry mode: exponential backoff with jitter)."""

TRANSFER = TransferConfig(
    multipart_threshold=64 * 1024 * 1024,
    multipart_chunksize=64 * 1024 * 1024,
    max_concurrency=8,
    use_threads=True,
)

_MISSING_BUCKET = {"NoSuchBucket"}
_BAD_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"}
_MISSING_KEY = {"NoSuchKey", "404", "NotFound"}


def split_s3_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/a/b -> ("bucket", "a/b")."""
    rest = uri[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    return bucket, prefix.strip("/")


def make_client(settings: Any | None = None) -> Any:
    """A boto3 S3 client from `spec.storage` (endpoint, region, addressingStyle) or the environment."""
    endpoint = (
        getattr(settings, "endpoint", None)
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    region = (
        getattr(settings, "region", None)
        or os.environ.get("AWS_DEFAULT_REGION")
        or os.environ.get("AWS_REGION", "us-east-1")
    )
    style = getattr(settings, "addressing_style", "auto") or "auto"
    if style == "auto" and endpoint:
        # Self-hosted stores (MinIO, Ceph) rarely have wildcard DNS for virtual-hosted buckets.
        style = "path"
    config = Config(
        region_name=region,
        retries={"mode": "standard", "max_attempts": MAX_ATTEMPTS},
        s3={"addressing_style": style},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=64,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3Storage(Storage):
    """An s3://bucket/prefix root."""

    def __init__(self, uri: str, settings: Any | None = None, client: Any | None = None) -> None:
        self.uri = uri.rstrip("/")
        self.settings = settings
        self.bucket, self.prefix = split_s3_uri(self.uri)
        self.client = client or make_client(settings)
        self.endpoint = str(self.client.meta.endpoint_url)

    def child(self, prefix: str) -> Storage:
        sub = prefix.strip("/")
        return S3Storage(f"{self.uri}/{sub}" if sub else self.uri, self.settings, self.client)

    def _key(self, key: str) -> str:
        key = key.strip("/")
        if not self.prefix:
            return key
        return f"{self.prefix}/{key}" if key else self.prefix

    def _error(self, exc: ClientError | BotoCoreError, key: str, action: str) -> Exception:
        where = f"s3://{self.bucket}/{self._key(key)} at {self.endpoint}"
        if isinstance(exc, ClientError):
            code = _code(exc)
            if code in _MISSING_KEY:
                return FileNotFoundError(f"{where}: no such object")
            if code in _MISSING_BUCKET:
                return StorageError(
                    f"{action} {where}: bucket {self.bucket!r} does not exist (create it, or fix the URI)"
                )
            if code in _BAD_CREDENTIALS:
                return StorageError(
                    f"{action} {where}: access denied ({code}); check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                    "or spec.storage.credentialsSecret"
                )
            return StorageError(f"{action} {where}: {code or exc}")
        return StorageError(f"{action} {where}: {exc} (gave up after {MAX_ATTEMPTS} attempts)")

    def check_access(self) -> None:
        """Fail fast, before any GPU work, when the bucket is missing or credentials are wrong."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            if isinstance(exc, ClientError) and _code(exc) in _MISSING_KEY:
                raise StorageError(
                    f"bucket {self.bucket!r} does not exist at {self.endpoint} (create it, or fix the URI {self.uri})"
                ) from None
            raise self._error(exc, "", "cannot access") from None

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full = self._key(prefix)
        if full:
            full += "/"
        paginator = self.client.get_paginator("list_objects_v2")
        strip = len(self.prefix) + 1 if self.prefix else 0
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for item in page.get("Contents", []):
                    yield ObjectInfo(
                        item["Key"][strip:], int(item["Size"]), str(item["ETag"]).strip('"')
                    )
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, prefix, "cannot list") from None

    def read_bytes(self, key: str) -> bytes:
        try:
            body: bytes = self.client.get_object(Bucket=self.bucket, Key=self._key(key))[
                "Body"
            ].read()
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, key, "cannot read") from None
        return body

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        try:
            response = self.client.get_object(
                Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start}-{start + length - 1}"
            )
            data: bytes = response["Body"].read()
        except ClientError as exc:
            if _code(exc) == "InvalidRange":
                return b""
            raise self._error(exc, key, "cannot read") from None
        except BotoCoreError as exc:
            raise self._error(exc, key, "cannot read") from None
        return data

    def write_bytes(self, key: str, data: bytes) -> None:
        # A single PUT is atomic in S3: readers see the old object or the new one.
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, key, "cannot write") from None

    def upload_file(self, local_path: Path, key: str) -> None:
        # Multipart uploads become visible only on CompleteMultipartUpload, so a failed
        # upload never leaves a partial object behind under `key`.
        try:
            self.client.upload_file(str(local_path), self.bucket, self._key(key), Config=TRANSFER)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, key, "cannot upload") from None
        except boto3.exceptions.S3UploadFailedError as exc:
            raise StorageError(
                f"cannot upload {local_path} to s3://{self.bucket}/{self._key(key)}: {exc}"
            ) from None

    def download_file(self, key: str, local_path: Path) -> None:
        local_path = Path(local_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = local_path.with_name(f".kd-tmp-{local_path.name}")
        try:
            self.client.download_file(self.bucket, self._key(key), str(tmp), Config=TRANSFER)
        except (ClientError, BotoCoreError) as exc:
            tmp.unlink(missing_ok=True)
            raise self._error(exc, key, "cannot download") from None
        os.replace(tmp, local_path)

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _code(exc) in _MISSING_KEY:
                return False
            raise self._error(exc, key, "cannot stat") from None
        except BotoCoreError as exc:
            raise self._error(exc, key, "cannot stat") from None
        return True

    def delete_prefix(self, prefix: str) -> None:
        keys = [self._key(obj.key) for obj in self.list(prefix)]
        if prefix.strip("/") and self.exists(prefix):
            keys.append(self._key(prefix))
        for start in range(0, len(keys), 1000):
            chunk = [{"Key": k} for k in keys[start : start + 1000]]
            try:
                self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": chunk, "Quiet": True}
                )
            except (ClientError, BotoCoreError) as exc:
                raise self._error(exc, prefix, "cannot delete") from None
