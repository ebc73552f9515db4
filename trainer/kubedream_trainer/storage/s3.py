"""S3 storage (AWS S3, MinIO, R2, Ceph) behind the same interface as a local folder.

boto3 does the protocol work: listing, ranged GETs, concurrent multipart uploads
(`TransferConfig`) and a first layer of retries (its `standard` mode: exponential backoff
with jitter over `KUBEDREAM_S3_MAX_ATTEMPTS` attempts, a few seconds in all). This module
adds what boto3 leaves to the caller:

- settings from `spec.storage` (endpoint, region, addressing style), else the standard AWS
  environment and credential chain (AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID...);
- a second, slower layer of retries bounded by a time budget (`retry.RetryPolicy`), so an
  S3 server that restarts, or a network that drops for a minute, does not end a run;
- listings paged by hand, so a failure on page 40 of a large root retries page 40;
- uploads verified after the fact: size and ETag from a HEAD (the ETag of a single-part
  upload is the MD5 of the file, that of a multipart upload the MD5 of its parts' MD5s,
  both computed locally with the same part size), and atomic local downloads;
- errors that name the endpoint, bucket and key, and `StorageAccessError` for the mistakes
  that retrying cannot fix (wrong credentials, no such bucket or prefix).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import boto3
from boto3.exceptions import Boto3Error, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from s3transfer.utils import ChunksizeAdjuster

from .base import ObjectInfo, Storage, StorageAccessError, StorageError
from .retry import RetryPolicy, is_transient

T = TypeVar("T")

MAX_ATTEMPTS = 5
"""Total tries per request inside boto3 (standard mode) unless KUBEDREAM_S3_MAX_ATTEMPTS says
otherwise; the outer `RetryPolicy` repeats these."""


def _env_int(name: str) -> int | None:
    try:
        value = int(os.environ.get(name, ""))
    except ValueError:
        return None
    return value if value > 0 else None


def max_attempts() -> int:
    """boto3's attempts per request: KUBEDREAM_S3_MAX_ATTEMPTS, else `MAX_ATTEMPTS`."""
    try:
        return max(1, int(os.environ.get("KUBEDREAM_S3_MAX_ATTEMPTS", MAX_ATTEMPTS)))
    except ValueError:
        return MAX_ATTEMPTS


TRANSFER = TransferConfig(
    multipart_threshold=64 * 1024 * 1024,
    multipart_chunksize=64 * 1024 * 1024,
    max_concurrency=8,
    use_threads=True,
)
"""Uploads and downloads: files from 64 MiB go in 64 MiB parts, 8 parts at a time."""

_MISSING_BUCKET = {"NoSuchBucket"}
_BAD_CREDENTIALS = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
    "403",
}
_MISSING_KEY = {"NoSuchKey", "404", "NotFound"}
_UNCHECKABLE_ETAG_ENCRYPTION = {"aws:kms", "aws:kms:dsse"}
"""Server-side encryption whose ETags are not MD5s (nor are SSE-C ones)."""


def split_s3_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/a/b -> ("bucket", "a/b")."""
    rest = uri[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    return bucket, prefix.strip("/")


_CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CONFIG_FILE",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_EC2_METADATA_DISABLED",
)
_clients: dict[tuple[object, ...], Any] = {}
_clients_lock = threading.Lock()


def make_client(
    settings: Any | None = None, attempts: int | None = None, *, shared: bool = True
) -> Any:
    """A boto3 S3 client from `spec.storage` (endpoint, region, addressingStyle) or the environment.

    Creating a client parses botocore's S3 model (0.1-0.4 s of CPU), and the loader opens
    storages per epoch, so clients are shared (they are thread-safe) between storages with
    the same settings and the same credential variables; `shared=False` makes a new one."""
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
        retries={"mode": "standard", "total_max_attempts": attempts or max_attempts()},
        s3={"addressing_style": style},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=64,
    )
    if not shared:
        return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
    credentials = tuple(
        hashlib.sha256(os.environ.get(name, "").encode()).hexdigest()
        for name in _CREDENTIAL_VARIABLES
    )
    key = (endpoint, region, style, attempts or max_attempts(), credentials)
    with _clients_lock:
        if key not in _clients:
            session = boto3.session.Session()
            _clients[key] = session.client("s3", endpoint_url=endpoint, config=config)
        return _clients[key]


def expected_etag(path: Path, transfer: TransferConfig = TRANSFER) -> str:
    """The ETag S3 gives `path` uploaded with `transfer`: the file's MD5 below the multipart
    threshold, else MD5(concatenated part MD5s)-<parts>, with s3transfer's part size."""
    size = path.stat().st_size
    if size < transfer.multipart_threshold:
        digest = hashlib.md5(usedforsecurity=False)
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(8 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    part_size = ChunksizeAdjuster().adjust_chunksize(transfer.multipart_chunksize, size)
    parts = []
    with path.open("rb") as fh:
        for part in iter(lambda: fh.read(part_size), b""):
            parts.append(hashlib.md5(part, usedforsecurity=False).digest())
    combined = hashlib.md5(b"".join(parts), usedforsecurity=False).hexdigest()
    return f"{combined}-{len(parts)}"


def _parts(etag: str) -> str:
    """The part count an ETag names ("1" for a single-part upload)."""
    return etag.rpartition("-")[2] if "-" in etag else "1"


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class S3Storage(Storage):
    """An s3://bucket/prefix root."""

    def __init__(
        self,
        uri: str,
        settings: Any | None = None,
        client: Any | None = None,
        *,
        transfer: TransferConfig | None = None,
        page_size: int | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.uri = uri.rstrip("/")
        self.settings = settings
        self.bucket, self.prefix = split_s3_uri(self.uri)
        if not self.bucket:
            raise StorageAccessError(f"{uri}: an S3 URI needs a bucket (s3://bucket/prefix)")
        self.client = client or make_client(settings)
        self.endpoint = str(self.client.meta.endpoint_url)
        self.transfer = transfer or TRANSFER
        self.page_size = page_size or _env_int("KUBEDREAM_S3_LIST_PAGE_SIZE")
        """Keys per listing request (None: the server's maximum, 1000 on AWS)."""
        self.retry = retry or RetryPolicy()

    def child(self, prefix: str) -> Storage:
        sub = prefix.strip("/")
        return S3Storage(
            f"{self.uri}/{sub}" if sub else self.uri,
            self.settings,
            self.client,
            transfer=self.transfer,
            page_size=self.page_size,
            retry=self.retry,
        )

    def _key(self, key: str) -> str:
        key = key.strip("/")
        if not self.prefix:
            return key
        return f"{self.prefix}/{key}" if key else self.prefix

    def _where(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)} (endpoint {self.endpoint})"

    def _call(self, action: str, key: str, operation: Callable[[], T]) -> T:
        """Run one S3 operation with the outer retries; map what escapes to our errors."""
        try:
            return self.retry.call(operation, f"{action} {self._where(key)}")
        except (ClientError, BotoCoreError, Boto3Error) as exc:
            raise self._error(exc, key, action) from None

    def _error(self, exc: BaseException, key: str, action: str) -> Exception:
        where = self._where(key)
        if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, ClientError):
            exc = exc.__context__
        if isinstance(exc, NoCredentialsError):
            return StorageAccessError(
                f"{action} {where}: no S3 credentials found; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (in a pod: spec.storage.credentialsSecret)"
            )
        if isinstance(exc, ClientError) and not is_transient(exc):
            code = _code(exc)
            if code in _MISSING_KEY:
                return FileNotFoundError(f"{where}: no such object")
            if code in _MISSING_BUCKET:
                return StorageAccessError(
                    f"{action} {where}: bucket {self.bucket!r} does not exist at {self.endpoint} "
                    "(create it, or fix the URI)"
                )
            if code in _BAD_CREDENTIALS:
                return StorageAccessError(
                    f"{action} {where}: access denied ({code}) for bucket {self.bucket!r} at "
                    f"{self.endpoint}; check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                    "(spec.storage.credentialsSecret) and the bucket policy"
                )
            return StorageError(f"{action} {where}: {code or _one_line(exc)}")
        attempts = getattr(exc, "kd_attempts", None)
        waited = getattr(exc, "kd_waited_s", None)
        gave_up = (
            f" (gave up after {attempts} tries over {waited:.0f}s, each with up to "
            f"{max_attempts()} boto3 attempts)"
            if attempts is not None and waited is not None
            else ""
        )
        return StorageError(f"{action} {where}: {_one_line(exc)}{gave_up}")

    def check_access(self, require: str | None = None) -> None:
        """Fail fast, before any GPU work, when the bucket is missing or credentials are wrong."""

        def head_bucket() -> None:
            self.client.head_bucket(Bucket=self.bucket)

        try:
            self.retry.call(head_bucket, f"cannot access {self._where('')}")
        except ClientError as exc:
            if _code(exc) in _MISSING_KEY:
                raise StorageAccessError(
                    f"bucket {self.bucket!r} does not exist at {self.endpoint} "
                    f"(create it, or fix the URI {self.uri})"
                ) from None
            raise self._error(exc, "", "cannot access") from None
        except (BotoCoreError, Boto3Error) as exc:
            raise self._error(exc, "", "cannot access") from None
        if require is None:
            return
        if require.strip("/") and self.exists(require):
            return
        if next(iter(self._pages(require, limit=1)), []):
            return
        raise StorageAccessError(
            f"nothing found at {self._where(require)}: no object with that key and no objects "
            f"under that prefix in bucket {self.bucket!r} (is the key or prefix right?)"
        )

    def _pages(self, prefix: str, limit: int | None = None) -> Iterator[list[ObjectInfo]]:
        """Pages of the listing under `prefix` + '/', each request retried on its own."""
        full = self._key(prefix)
        if full:
            full += "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        token: str | None = None
        while True:
            request: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full}
            page_size = limit or self.page_size
            if page_size:
                request["MaxKeys"] = page_size
            if token:
                request["ContinuationToken"] = token
            page = self._call(
                "cannot list",
                prefix,
                partial(self.client.list_objects_v2, **request),
            )
            yield [
                ObjectInfo(item["Key"][strip:], int(item["Size"]), str(item["ETag"]).strip('"'))
                for item in page.get("Contents", [])
            ]
            token = page.get("NextContinuationToken")
            if limit or not page.get("IsTruncated") or not token:
                return

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for page in self._pages(prefix):
            yield from page

    def read_bytes(self, key: str) -> bytes:
        def get() -> bytes:
            body: bytes = self.client.get_object(Bucket=self.bucket, Key=self._key(key))[
                "Body"
            ].read()
            return body

        return self._call("cannot read", key, get)

    def read_range(self, key: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""

        def get() -> bytes:
            try:
                response = self.client.get_object(
                    Bucket=self.bucket,
                    Key=self._key(key),
                    Range=f"bytes={start}-{start + length - 1}",
                )
            except ClientError as exc:
                if _code(exc) == "InvalidRange":  # start past the end (an empty object)
                    return b""
                raise
            data: bytes = response["Body"].read()
            return data

        return self._call("cannot read", key, get)

    def write_bytes(self, key: str, data: bytes) -> None:
        # A single PUT is atomic in S3: readers see the old object or the new one.
        self._call(
            "cannot write",
            key,
            lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data),
        )

    def upload_file(self, local_path: Path, key: str) -> None:
        # Multipart uploads become visible only on CompleteMultipartUpload, so a failed
        # upload never leaves a partial object behind under `key` (s3transfer aborts it).
        local_path = Path(local_path)
        etag = expected_etag(local_path, self.transfer)
        size = local_path.stat().st_size
        self._call(
            "cannot upload",
            key,
            lambda: self.client.upload_file(
                str(local_path), self.bucket, self._key(key), Config=self.transfer
            ),
        )
        head = self._call(
            "cannot verify",
            key,
            lambda: self.client.head_object(Bucket=self.bucket, Key=self._key(key)),
        )
        got_size, got_etag = int(head["ContentLength"]), str(head["ETag"]).strip('"')
        problem = None
        if got_size != size:
            problem = f"size {got_size}, expected {size}"
        elif (
            head.get("ServerSideEncryption") not in _UNCHECKABLE_ETAG_ENCRYPTION
            and not head.get("SSECustomerAlgorithm")
            and _parts(got_etag) == _parts(etag)
            and got_etag != etag
        ):  # same shape (single part, or as many parts) yet different content
            problem = f"ETag {got_etag}, expected {etag} from the local file"
        if problem:
            raise StorageError(
                f"upload of {local_path} to {self._where(key)} did not verify: {problem}"
            )

    def download_file(self, key: str, local_path: Path) -> None:
        local_path = Path(local_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = local_path.with_name(f".kd-tmp-{local_path.name}")
        try:
            self._call(
                "cannot download",
                key,
                lambda: self.client.download_file(
                    self.bucket, self._key(key), str(tmp), Config=self.transfer
                ),
            )
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, local_path)

    def _head(self, key: str) -> dict[str, Any] | None:
        def head() -> dict[str, Any] | None:
            try:
                reply: dict[str, Any] = self.client.head_object(
                    Bucket=self.bucket, Key=self._key(key)
                )
            except ClientError as exc:
                if _code(exc) in _MISSING_KEY:
                    return None
                raise
            return reply

        return self._call("cannot stat", key, head)

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def stat(self, key: str) -> ObjectInfo:
        head = self._head(key)
        if head is None:
            raise FileNotFoundError(f"{self._where(key)}: no such object")
        return ObjectInfo(key, int(head["ContentLength"]), str(head["ETag"]).strip('"'))

    def delete_prefix(self, prefix: str) -> None:
        keys = [self._key(obj.key) for obj in self.list(prefix)]
        if prefix.strip("/") and self.exists(prefix):
            keys.append(self._key(prefix))
        for start in range(0, len(keys), 1000):
            chunk = [{"Key": k} for k in keys[start : start + 1000]]
            reply = self._call(
                "cannot delete",
                prefix,
                partial(
                    self.client.delete_objects,
                    Bucket=self.bucket,
                    Delete={"Objects": chunk, "Quiet": True},
                ),
            )
            errors = reply.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    f"cannot delete {len(errors)} object(s) under {self._where(prefix)}: "
                    f"{first.get('Key')}: {first.get('Code')} {first.get('Message', '')}".rstrip()
                )
