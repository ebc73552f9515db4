"""Storage behind one interface: local folders and S3-compatible object stores."""

from .base import ObjectInfo, Storage, StorageError, join_uri, open_storage

__all__ = ["ObjectInfo", "Storage", "StorageError", "join_uri", "open_storage"]
