"""Builders for the data-layer tests: tiny images on disk and synthetic datasets in memory."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from kubedream_trainer.data import Dataset, ImageRecord


def write_image(
    path: Path,
    size: tuple[int, int] = (64, 64),
    color: tuple[int, int, int] = (200, 30, 30),
    **save_args: object,
) -> Path:
    """A solid-colour image at `path` (format from the extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, **save_args)
    return path


def write_split_image(
    path: Path, size: tuple[int, int], left: tuple[int, int, int], right: tuple[int, int, int]
) -> Path:
    """An image whose left half is `left` and right half is `right` (to see flips and crops)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, left)
    img.paste(right, (size[0] // 2, 0, size[0], size[1]))
    img.save(path)
    return path


def write_text(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def synthetic_dataset(
    folders: dict[str, tuple[int, float]],
    *,
    buckets: tuple[tuple[int, int], ...] = ((512, 512),),
    batch_ids: dict[str, str] | None = None,
    resolution: int = 512,
) -> Dataset:
    """A Dataset without files: `folders` maps a folder to (image count, multiplier); images
    cycle through `buckets`."""
    images = []
    for folder, (count, multiplier) in folders.items():
        for i in range(count):
            bucket = buckets[i % len(buckets)]
            images.append(
                ImageRecord(
                    root_index=0,
                    root_uri="/data",
                    key=f"{folder}/{i:05d}.jpg",
                    caption=f"{folder} {i}",
                    width=bucket[0],
                    height=bucket[1],
                    bucket=bucket,
                    multiplier=multiplier,
                    flip_p=None,
                    cond_dropout=None,
                    batch_id=(batch_ids or {}).get(folder),
                    etag=f"etag-{folder}-{i}",
                    folder=folder,
                )
            )
    return Dataset(images=tuple(images), problems=(), folders=(), resolution=resolution)
