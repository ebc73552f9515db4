"""The storage interface: one API over a local folder and an S3 prefix.

Everything that touches data roots, base models or outputs goes through a `Storage`
(the data scanner, the loader, checkpoints, progress, samples, the model cache), so no S3
logic is scattered through the trainer. `open_storage(uri)` picks the implementation.
Failures surface as `StorageError` (the world's hiccup, after retries) or its subclass
`StorageAccessError` (the user's mistake: wrong credentials, a missing bucket or prefix).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ObjectInfo:
    """One object (file) under a storage root. `key` is relative to the root, '/'-separated."""

    key: str
    size: int
    etag: str
    """Content fingerprint: the S3 ETag, or size+mtime for local files."""


class StorageError(RuntimeError):
    """A storage operation failed for good (after retries); the message names the URI."""


class StorageAccessError(StorageError):
    """The storage cannot be used as configured: wrong credentials, access denied, a missing
    bucket, prefix or object. Retrying does not help; the message says what to fix."""


class Storage(ABC):
    """A root (local folder or s3://bucket/prefix) holding '/'-separated keys."""

    uri: str

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object under `prefix` (recursive), in key order."""

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """The whole object. Raises FileNotFoundError when it does not exist."""

    @abstractmethod
    def read_range(self, key: str, start: int, length: int) -> bytes:
        """Up to `length` bytes from offset `start` (a ranged GET on S3)."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write an object atomically: readers see the old or the new content, never a part."""

    @abstractmethod
    def upload_file(self, local_path: Path, key: str) -> None:
        """Copy a local file to `key` atomically (multipart on S3)."""

    @abstractmethod
    def download_file(self, key: str, local_path: Path) -> None:
        """Copy `key` to a local file (written to a temporary name, then renamed)."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether the object exists."""

    @abstractmethod
    def stat(self, key: str) -> ObjectInfo:
        """Size and fingerprint of one object. Raises FileNotFoundError when it does not exist."""

    @abstractmethod
    def check_access(self, require: str | None = None) -> None:
        """Fail fast (StorageAccessError naming what to fix) when this root cannot be read:
        wrong credentials or a missing bucket; with `require`, also when nothing exists at
        that key or under that prefix ("" for the root itself)."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under `prefix` (a checkpoint folder, say)."""

    def upload_files(self, items: Sequence[tuple[Path, str]], workers: int = 4) -> None:
        """`upload_file` for each (local path, key), `workers` at a time. On the first failure
        the uploads not yet started are cancelled and that failure is raised once the running
        ones have ended, so nothing is left uploading behind the caller's back."""
        if workers <= 1 or len(items) <= 1:
            for path, key in items:
                self.upload_file(path, key)
            return
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kd-upload") as pool:
            futures = [pool.submit(self.upload_file, path, key) for path, key in items]
            _, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for future in pending:
                future.cancel()
        for future in futures:  # every future is done or cancelled once the pool has shut down
            if not future.cancelled() and future.exception() is not None:
                future.result()  # raises the first failure in submission order

    def child(self, prefix: str) -> Storage:
        """A Storage rooted at `prefix` below this one."""
        return open_storage(join_uri(self.uri, prefix))

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode("utf-8"))

    def local_path(self, key: str) -> Path | None:
        """The file's path when the storage is a local folder, else None."""
        return None


def join_uri(uri: str, *parts: str) -> str:
    """Join a URI (local path or s3://) with '/'-separated parts."""
    out = uri.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def is_s3_uri(uri: str) -> bool:
    """Whether `uri` names an S3 location (s3://bucket[/prefix])."""
    return uri.startswith("s3://")


def open_storage(uri: str, settings: object | None = None, *, patient: bool = True) -> Storage:
    """A Storage for a local path or s3://bucket/prefix.

    `settings` is the job's `spec.storage` (StorageSpec) for S3 roots; None uses the
    standard AWS environment and credential chain. `patient=False` (for callers that must not
    block, such as the operator's status timer) makes one attempt per S3 request with no
    retries, so an outage fails fast instead of backing off.
    """
    if is_s3_uri(uri):
        from .retry import RetryPolicy
        from .s3 import S3Storage, make_client

        if patient:
            return S3Storage(uri, settings)
        return S3Storage(
            uri, settings, make_client(settings, attempts=1), retry=RetryPolicy(budget_s=0)
        )
    from .local import LocalStorage

    return LocalStorage(uri)
