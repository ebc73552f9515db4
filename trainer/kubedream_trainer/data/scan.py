"""Scanning data roots into a `Dataset`: one listing per root, then settings files, sidecar
captions and image headers read in a thread pool.

Only the `Storage` interface is used, so an s3:// root scans by the same code as a local
folder. Nothing here decodes pixels (image sizes come from headers), so a 100,000-image
root scans in seconds locally (bench/inspect_bench.py). Files and folders whose name
starts with "." are skipped. Bad files never stop a scan: each becomes a `Problem`.
Called by the trainer at start-up and by `kubedream dataset inspect`.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..storage import ObjectInfo, Storage, join_uri, open_storage
from .buckets import check_resolution, is_undersized, nearest_bucket
from .captions import CAPTION_SIDECARS, caption_from_filename, caption_from_text, caption_from_yaml
from .images import ImageLoadError, is_image_key, read_image_size
from .multipliers import per_epoch_count
from .records import Dataset, FolderInfo, ImageRecord, Problem
from .settings import (
    SETTING_FILES,
    Settings,
    SettingsTree,
    is_settings_file,
    load_yaml_mapping,
    settings_from_text,
    settings_from_yaml,
)

if TYPE_CHECKING:
    from kubedream_operator.spec import DataRoot


class DataRootError(ValueError):
    """A data root that cannot be used at all (missing, or holds no files)."""


@dataclass(frozen=True)
class _Root:
    index: int
    spec: DataRoot
    storage: Storage
    resolution: int


def _is_hidden(key: str) -> bool:
    return any(part.startswith(".") for part in key.split("/"))


def _read_layer(root: _Root, key: str) -> tuple[Settings, list[Problem]]:
    """The settings one file sets; a file it cannot use yields an empty layer and a problem."""
    path = join_uri(root.spec.uri, key)
    name = posixpath.basename(key)
    try:
        data = root.storage.read_bytes(key)
        if name in SETTING_FILES:
            return settings_from_text(SETTING_FILES[name], data), []
        layer, errors = settings_from_yaml(load_yaml_mapping(data))
    except (OSError, ValueError) as exc:
        return Settings(), [Problem(path, f"ignored: {exc}")]
    return layer, [Problem(path, error) for error in errors]


def _sidecar_caption(root: _Root, keys: list[str], problems: list[Problem]) -> str | None:
    """The first non-empty caption among the sidecars, in precedence order."""
    for key in keys:
        try:
            data = root.storage.read_bytes(key)
            if key.endswith((".yaml", ".yml")):
                caption = caption_from_yaml(load_yaml_mapping(data))
            else:
                caption = caption_from_text(data)
        except (OSError, ValueError) as exc:
            problems.append(Problem(join_uri(root.spec.uri, key), f"unreadable caption: {exc}"))
            continue
        if caption:
            return caption
    return None


def _scan_image(
    root: _Root, info: ObjectInfo, sidecars: list[str], settings: Settings
) -> tuple[ImageRecord | None, list[Problem]]:
    problems: list[Problem] = []
    folder, name = posixpath.split(info.key)
    path = join_uri(root.spec.uri, info.key)
    caption = _sidecar_caption(root, sidecars, problems) or settings.caption
    if caption is None:
        caption = caption_from_filename(posixpath.splitext(name)[0])
        if not caption:
            problems.append(
                Problem(
                    path, "no caption: no sidecar or yaml caption, and the file name gives none"
                )
            )
    try:
        width, height = read_image_size(root.storage, info.key)
    except ImageLoadError as exc:
        return None, [*problems, Problem(exc.path, f"skipped: {exc.reason}")]
    bucket = nearest_bucket(width, height, root.resolution)
    if is_undersized(width, height, bucket):
        problems.append(
            Problem(
                path,
                f"undersized: {width}x{height} is under half the area of its {bucket[0]}x{bucket[1]} bucket (upscaled)",
            )
        )
    multiply = 1.0 if settings.multiply is None else settings.multiply
    record = ImageRecord(
        root_index=root.index,
        root_uri=root.spec.uri,
        key=info.key,
        caption=caption,
        width=width,
        height=height,
        bucket=bucket,
        multiplier=multiply * root.spec.multiplier,
        flip_p=settings.flip_p,
        cond_dropout=settings.cond_dropout,
        batch_id=settings.batch_id,
        etag=info.etag,
        folder=folder,
    )
    return record, problems


def _scan_root(
    root: _Root, pool: ThreadPoolExecutor, listing: Sequence[ObjectInfo] | None
) -> tuple[list[ImageRecord], list[Problem]]:
    listed = root.storage.list() if listing is None else listing
    objects = [info for info in listed if not _is_hidden(info.key)]
    if not objects:
        raise DataRootError(
            f"data root {root.spec.uri}: no files found (missing folder or empty prefix)"
        )
    files: dict[str, dict[str, ObjectInfo]] = {}
    for info in objects:
        folder, name = posixpath.split(info.key)
        files.setdefault(folder, {})[name] = info

    tree = SettingsTree()
    problems: list[Problem] = []
    setting_files = [info for info in objects if is_settings_file(posixpath.basename(info.key))]
    for info, (layer, layer_problems) in zip(
        setting_files,
        pool.map(lambda info: _read_layer(root, info.key), setting_files),
        strict=True,
    ):
        tree.add(*posixpath.split(info.key), layer)
        problems.extend(layer_problems)

    jobs = []
    for folder in sorted(files):
        names = files[folder]
        image_names = [name for name in names if is_image_key(name)]
        if not image_names:
            continue
        settings = tree.resolve(folder)
        for name in image_names:
            stem = posixpath.splitext(name)[0]
            sidecars = [names[stem + ext].key for ext in CAPTION_SIDECARS if stem + ext in names]
            jobs.append((names[name], sidecars, settings))
    jobs.sort(key=lambda job: job[0].key)
    records: list[ImageRecord] = []
    for record, image_problems in pool.map(lambda job: _scan_image(root, *job), jobs):
        problems.extend(image_problems)
        if record is not None:
            records.append(record)
    if not jobs:
        problems.append(Problem(root.spec.uri, "no images found under this root"))
    return records, problems


def _folder_infos(records: list[ImageRecord]) -> list[FolderInfo]:
    counts: dict[tuple[int, str], list[ImageRecord]] = {}
    for record in records:
        counts.setdefault((record.root_index, record.folder), []).append(record)
    return [
        FolderInfo(
            root_index=root_index,
            root_uri=members[0].root_uri,
            path=folder,
            images=len(members),
            multiplier=members[0].multiplier,
            per_epoch=per_epoch_count(members[0].multiplier, len(members)),
        )
        for (root_index, folder), members in sorted(counts.items())
    ]


def scan_roots(
    roots: Sequence[DataRoot],
    resolution: int,
    storage_settings: object | None = None,
    workers: int = 16,
    listings: Sequence[Sequence[ObjectInfo]] | None = None,
) -> Dataset:
    """Scan every root (opened with `open_storage(root.uri, storage_settings)`) into a Dataset.

    `listings` (one per root, as `Storage.list()` returns it) saves listing a root again
    when the caller already has (data.manifest fingerprints the listings first).

    Raises DataRootError for a root without any file and ValueError for a resolution that
    is not a multiple of 64; every other problem is recorded in `Dataset.problems`.
    """
    check_resolution(resolution)
    records: list[ImageRecord] = []
    problems: list[Problem] = []
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="kd-scan") as pool:
        for index, spec in enumerate(roots):
            root = _Root(index, spec, open_storage(spec.uri, storage_settings), resolution)
            listing = None if listings is None else listings[index]
            root_records, root_problems = _scan_root(root, pool, listing)
            records.extend(root_records)
            problems.extend(root_problems)
    return Dataset(
        images=tuple(records),
        problems=tuple(sorted(set(problems), key=lambda p: (p.path, p.problem))),
        folders=tuple(_folder_infos(records)),
        resolution=resolution,
    )
