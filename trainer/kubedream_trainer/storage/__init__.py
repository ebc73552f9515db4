"""Storage behind one interface: local folders and S3-compatible object stores."""

from .base import (
    ObjectInfo,
    Storage,
    StorageAccessError,
    StorageError,
    is_s3_uri,
    join_uri,
    open_storage,
)

__all__ = [
    "ObjectInfo",
    "Storage",
    "StorageAccessError",
    "StorageError",
    "is_s3_uri",
    "join_uri",
    "open_storage",
]
