"""Multipliers: how many times each image is drawn in an epoch (EveryDream's multiply.txt,
with exact counts).

A folder's effective multiplier m (its multiply value times the root's multiplier) has a
whole part and a fraction: every image of the folder is repeated floor(m) times, and
exactly round(frac * n) of its n images (half rounds up) are drawn without replacement,
afresh each epoch, from a generator seeded by (seed, epoch, root, folder). So 1000 images
at 0.025 give exactly 25 per epoch, 10 at 2.5 give 25, and 0 removes the folder.
EveryDream draws each image's fraction independently (a count that varies per epoch);
this module fixes that. Used by `plan_epoch` and `kubedream dataset inspect`.
"""

from __future__ import annotations

import math

from .records import Dataset
from .seeding import derive_rng


def fractional_repeats(multiplier: float, count: int) -> tuple[int, int]:
    """(times every image repeats, extra images drawn at random) for `count` images at `multiplier`."""
    if multiplier < 0 or not math.isfinite(multiplier):
        raise ValueError(f"multiplier must be a finite number >= 0, got {multiplier}")
    whole = math.floor(multiplier)
    extra = math.floor((multiplier - whole) * count + 0.5)
    return whole, min(extra, count)


def per_epoch_count(multiplier: float, count: int) -> int:
    """Images drawn per epoch from a folder of `count` images at `multiplier`."""
    whole, extra = fractional_repeats(multiplier, count)
    return whole * count + extra


def folder_groups(dataset: Dataset) -> dict[tuple[int, str], list[int]]:
    """Indices of `dataset.images` per (root index, folder), in dataset order."""
    groups: dict[tuple[int, str], list[int]] = {}
    for index, image in enumerate(dataset.images):
        groups.setdefault((image.root_index, image.folder), []).append(index)
    return groups


def draw_epoch(dataset: Dataset, epoch: int, seed: int) -> list[int]:
    """The epoch's images before bucketing: indices into `dataset.images`, repeated by their
    multipliers, sorted. A pure function of (dataset, epoch, seed)."""
    drawn: list[int] = []
    for (root_index, folder), members in folder_groups(dataset).items():
        # Every image of a folder shares the folder's multiplier (settings are per folder).
        whole, extra = fractional_repeats(dataset.images[members[0]].multiplier, len(members))
        drawn.extend(members * whole)
        if extra:
            rng = derive_rng("multiply", seed, epoch, root_index, folder)
            drawn.extend(rng.sample(members, extra))
    drawn.sort()
    return drawn
