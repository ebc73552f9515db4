"""Base models in S3: a diffusers folder under s3://bucket/prefix, downloaded once into a
local cache and reused by every later run.

The cache folder is `<cache>/models/<key>/`, where `<cache>` is `KUBEDREAM_CACHE_DIR`
(else `~/.cache/kubedream`) and `<key>` a hash of the URI and the listing (every file's
key, size and ETag): replacing any file in S3 makes a new key, so a stale copy is never
used, while an unchanged model costs one listing. Only `model_index.json` and the component
folders it names are fetched, so a KubeDream checkpoint (which also holds
`training_state/` and a single-file export) can be a base model without downloading its
optimizer state. Files download several at once (each large one in concurrent parts) into
a temporary folder, are checked against the listing's sizes, and the folder is renamed
into place: concurrent runs on one node each download and the first rename wins, and a
crash never leaves a half-filled cache entry.

Called by `models.resolve_model_dir` for s3:// bases.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .errors import JobError
from .storage import ObjectInfo, Storage, StorageAccessError, open_storage
from .tiny import default_cache_dir

INDEX = "model_index.json"
SOURCE = ".kubedream-source.json"
"""Written into each cache entry: where it came from and what was listed."""
DOWNLOAD_WORKERS = 4
_FORMAT_VERSION = 1
"""Bump when the cache layout changes (part of the key)."""


def _components(index: dict[str, object]) -> list[str]:
    """Folders model_index.json names: entries like "unet": ["diffusers", "UNet2DConditionModel"]."""
    return sorted(
        name
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and value and value[0] is not None
    )


def model_files(storage: Storage) -> tuple[list[ObjectInfo], list[str]]:
    """The files a diffusers folder needs (model_index.json first) and its component names.

    Raises JobError when model_index.json is missing or unreadable, or a component folder
    named in it holds no files."""
    listing = list(storage.list())
    index_info = next((info for info in listing if info.key == INDEX), None)
    if index_info is None:
        raise JobError(
            f"spec.model.base: {storage.uri}/{INDEX} not found; expected a diffusers folder "
            "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
        )
    try:
        index = json.loads(storage.read_bytes(INDEX))
    except ValueError as exc:
        raise JobError(f"spec.model.base: {storage.uri}/{INDEX} is not JSON: {exc}") from None
    if not isinstance(index, dict):
        raise JobError(f"spec.model.base: {storage.uri}/{INDEX} is not a JSON object")
    components = _components(index)
    wanted = [info for info in listing if info.key.split("/", 1)[0] in components]
    missing = [name for name in components if not any(i.key.startswith(f"{name}/") for i in wanted)]
    if missing:
        raise JobError(
            f"spec.model.base: {storage.uri} lacks the folder(s) {', '.join(missing)} that "
            f"{INDEX} names"
        )
    return [index_info, *wanted], components


def cache_key(uri: str, files: list[ObjectInfo]) -> str:
    """Changes whenever any needed file changes (its ETag or size) or the URI does."""
    blob = json.dumps(
        {
            "uri": uri.rstrip("/"),
            "files": sorted((f.key, f.size, f.etag) for f in files),
            "format": _FORMAT_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def fetch_model(uri: str, settings: object | None = None, cache_dir: Path | None = None) -> Path:
    """The local diffusers folder for an s3:// model, downloaded unless already cached."""
    storage = open_storage(uri, settings)
    try:
        files, _ = model_files(storage)
    except StorageAccessError as exc:
        raise JobError(f"spec.model.base: {exc}") from None
    root = (cache_dir or default_cache_dir()) / "models"
    target = root / cache_key(uri, files)
    if (target / SOURCE).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".download-", dir=root))
    try:
        with ThreadPoolExecutor(DOWNLOAD_WORKERS, thread_name_prefix="kd-model") as pool:
            list(pool.map(lambda f: storage.download_file(f.key, staging / f.key), files))
        wrong = [
            f"{f.key} ({(staging / f.key).stat().st_size} bytes, listed {f.size})"
            for f in files
            if (staging / f.key).stat().st_size != f.size
        ]
        if wrong:
            raise JobError(
                f"spec.model.base: {uri} changed while downloading: {', '.join(wrong)}; try again"
            )
        source = {"uri": uri, "files": [[f.key, f.size, f.etag] for f in files]}
        (staging / SOURCE).write_text(json.dumps(source, indent=2) + "\n")
        try:
            staging.rename(target)
        except OSError:
            if not (target / SOURCE).is_file():  # not a concurrent winner: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
