"""A scan saved next to the outputs: `<output>/dataset-manifest.json`, so a restarted or
resumed run does not scan a large root again.

Scanning reads every image header and caption sidecar: one or two requests per image,
minutes for 100,000 images in S3. Listing a root costs one request per 1,000 objects. So a
run lists its roots first and fingerprints the listings (every key, size and ETag, each
root's URI and multiplier, the resolution, and the source code of the scanner itself);
when `dataset-manifest.json` carries the same fingerprint, the `Dataset` is read from it
instead of scanned. Any change to a file (an image, a caption, a multiply.txt), to the
roots, or to the trainer's scanning code makes a different fingerprint and a fresh scan,
which then replaces the manifest. A manifest that cannot be read or written only costs a
scan (and a warning). The manifest holds the listing (keys, sizes, ETags), every usable
image with its caption and bucket, the folders, and every problem found.

Called by `epochs.load_dataset` with the run's output storage.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..storage import ObjectInfo, Storage, StorageError, join_uri, open_storage
from .records import Dataset, FolderInfo, ImageRecord, Problem
from .scan import scan_roots

if TYPE_CHECKING:
    from kubedream_operator.spec import DataRoot

log = logging.getLogger(__name__)

MANIFEST_KEY = "dataset-manifest.json"
FORMAT = "kubedream.io/dataset-manifest/v1"
_SCANNER_MODULES = (
    "buckets.py",
    "captions.py",
    "images.py",
    "multipliers.py",
    "records.py",
    "scan.py",
    "settings.py",
)
"""The code a scan's result depends on; a changed scanner invalidates every manifest."""


def _scanner_version() -> str:
    digest = hashlib.sha256()
    here = Path(__file__).parent
    for name in _SCANNER_MODULES:
        digest.update(name.encode() + b"\0" + (here / name).read_bytes())
    return digest.hexdigest()[:16]


def list_roots(
    roots: Sequence[DataRoot], storage_settings: object | None
) -> list[list[ObjectInfo]]:
    """One listing per root (every object, hidden ones included)."""
    return [list(open_storage(root.uri, storage_settings).list()) for root in roots]


def fingerprint(
    roots: Sequence[DataRoot], resolution: int, listings: Sequence[Sequence[ObjectInfo]]
) -> str:
    """Identity of a scan's inputs: roots, resolution, listings and the scanner's code."""
    blob = json.dumps(
        {
            "format": FORMAT,
            "scanner": _scanner_version(),
            "resolution": resolution,
            "roots": [
                {
                    "uri": root.uri,
                    "multiplier": root.multiplier,
                    "files": [[o.key, o.size, o.etag] for o in listing],
                }
                for root, listing in zip(roots, listings, strict=True)
            ],
        },
        sort_keys=True,
    )
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def to_json(
    dataset: Dataset,
    print_: str,
    roots: Sequence[DataRoot],
    listings: Sequence[Sequence[ObjectInfo]],
) -> dict[str, Any]:
    """The manifest document."""
    return {
        "format": FORMAT,
        "fingerprint": print_,
        "resolution": dataset.resolution,
        "roots": [
            {
                "uri": root.uri,
                "multiplier": root.multiplier,
                "listing": [[o.key, o.size, o.etag] for o in listing],
            }
            for root, listing in zip(roots, listings, strict=True)
        ],
        "images": [asdict(image) for image in dataset.images],
        "folders": [asdict(folder) for folder in dataset.folders],
        "problems": [asdict(problem) for problem in dataset.problems],
    }


def from_json(doc: dict[str, Any]) -> Dataset:
    """The Dataset a manifest holds. Raises KeyError/TypeError/ValueError for a malformed one."""
    images = tuple(
        ImageRecord(**{**image, "bucket": tuple(image["bucket"])}) for image in doc["images"]
    )
    return Dataset(
        images=images,
        problems=tuple(Problem(**problem) for problem in doc["problems"]),
        folders=tuple(FolderInfo(**folder) for folder in doc["folders"]),
        resolution=int(doc["resolution"]),
    )


def _cached(cache: Storage, print_: str) -> Dataset | None:
    try:
        doc = json.loads(cache.read_bytes(MANIFEST_KEY))
        if not isinstance(doc, dict) or doc.get("fingerprint") != print_:
            return None
        return from_json(doc)
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError, StorageError) as exc:
        log.warning("ignoring %s: %s", join_uri(cache.uri, MANIFEST_KEY), exc)
        return None


def scan_roots_cached(
    roots: Sequence[DataRoot],
    resolution: int,
    storage_settings: object | None = None,
    cache: Storage | None = None,
    *,
    write: bool = True,
    workers: int = 16,
) -> tuple[Dataset, bool]:
    """`scan_roots`, reusing `cache`'s manifest when the listings are unchanged; returns the
    dataset and whether it came from the manifest. A fresh scan is saved when `write`."""
    listings = list_roots(roots, storage_settings)
    print_ = fingerprint(roots, resolution, listings)
    if cache is not None:
        dataset = _cached(cache, print_)
        if dataset is not None:
            log.info(
                "data roots unchanged since the last scan: reusing %s (%d images)",
                join_uri(cache.uri, MANIFEST_KEY),
                len(dataset.images),
            )
            return dataset, True
    dataset = scan_roots(roots, resolution, storage_settings, workers, listings=listings)
    if cache is not None and write and dataset.images:
        document = json.dumps(to_json(dataset, print_, roots, listings), ensure_ascii=False)
        try:
            cache.write_text(MANIFEST_KEY, document)
        except (OSError, StorageError) as exc:
            log.warning("could not save %s: %s", join_uri(cache.uri, MANIFEST_KEY), exc)
    return dataset, False
