"""The scanned data set: frozen records shared by the scanner, the epoch planner, the
loader and `kubedream dataset inspect`.

`scan_roots` builds a `Dataset` once per run; everything downstream (`draw_epoch`,
`plan_epoch`, `BatchLoader`) is a pure function of it plus (seed, epoch), so every rank
of a distributed job derives the same epochs from the same scan.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """Something wrong with one file; the scan (or the loader) goes on without it."""

    path: str
    """The file's full path: the root URI joined with the key (`s3://bucket/data/a.jpg`)."""
    problem: str
    """What is wrong, for a human: `not a readable image: cannot identify image file`."""


@dataclass(frozen=True)
class ImageRecord:
    """One usable image, its caption and the folder settings that apply to it."""

    root_index: int
    """Position of the image's data root in `spec.data.roots`."""
    root_uri: str
    """URI of that data root."""
    key: str
    """'/'-separated path of the image relative to its root."""
    caption: str
    """The resolved caption (before tag shuffling and conditioning dropout)."""
    width: int
    """Width in pixels, as displayed (after the EXIF orientation)."""
    height: int
    """Height in pixels, as displayed."""
    bucket: tuple[int, int]
    """(width, height) of the aspect-ratio bucket the image is trained at."""
    multiplier: float
    """Times per epoch: the folder's multiply value times the root's multiplier."""
    flip_p: float | None
    """Folder flip probability; None uses `spec.data.flipP`."""
    cond_dropout: float | None
    """Folder caption-dropout probability; None uses `spec.data.condDropout`."""
    batch_id: str | None
    """Images with different batch ids never share a batch."""
    etag: str
    """Content fingerprint from the storage listing (cache key for latents)."""
    folder: str
    """The image's folder relative to its root ('' for the root itself)."""


@dataclass(frozen=True)
class FolderInfo:
    """One folder that holds images, with its effective multiplier."""

    root_index: int
    """Position of the folder's data root in `spec.data.roots`."""
    root_uri: str
    """URI of that data root."""
    path: str
    """The folder relative to its root ('' for the root itself)."""
    images: int
    """Usable images directly in this folder."""
    multiplier: float
    """Folder multiply value times the root's multiplier."""
    per_epoch: int
    """Images drawn from this folder every epoch (exact: whole repeats plus the rounded fraction)."""


@dataclass(frozen=True)
class Dataset:
    """Every usable image of every root, in (root, key) order, and what was wrong."""

    images: tuple[ImageRecord, ...]
    """Usable images; indices into this tuple are what epochs and batches hold."""
    problems: tuple[Problem, ...]
    """Skipped files, bad settings files and undersized images, in path order."""
    folders: tuple[FolderInfo, ...]
    """Folders that hold at least one usable image, in (root, path) order."""
    resolution: int
    """Training resolution the buckets were computed for."""
