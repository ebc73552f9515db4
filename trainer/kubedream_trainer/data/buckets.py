"""Aspect-ratio buckets, computed from the training resolution rather than hand tables.

A bucket is a (width, height) with both sides multiples of 64 (the VAE downsamples by 8
and the UNet by another 8), an area of at most resolution², and an aspect ratio no more
extreme than 4:1 (EveryDream's limit). For every width the tallest height that fits the
area is taken, and every bucket's transpose is a bucket too, so portrait and landscape
images are treated alike and buckets are as large as the pixel budget allows. An image goes to the
bucket nearest in log aspect ratio (so 2:1 and 1:2 are equally far from 1:1); the loader
scales it to cover the bucket and center-crops the rest. Called by the scanner.
"""

from __future__ import annotations

import math
from functools import lru_cache

SIDE_STEP = 64
"""Bucket sides are multiples of this (latent side multiple of 8)."""
MAX_ASPECT = 4.0
"""Most extreme aspect ratio of a bucket (long side / short side)."""
UNDERSIZED_FRACTION = 0.5
"""An image with less than this fraction of its bucket's area is reported as undersized."""


def check_resolution(resolution: int) -> None:
    """Raise ValueError unless resolution is a positive multiple of SIDE_STEP."""
    if resolution < SIDE_STEP or resolution % SIDE_STEP:
        raise ValueError(f"resolution must be a positive multiple of {SIDE_STEP}, got {resolution}")


@lru_cache(maxsize=32)
def bucket_sizes(resolution: int) -> tuple[tuple[int, int], ...]:
    """Every bucket for `resolution`, ordered from the widest-and-flattest to the tallest."""
    check_resolution(resolution)
    budget = resolution * resolution
    buckets: set[tuple[int, int]] = set()
    for width in range(SIDE_STEP, budget // SIDE_STEP + 1, SIDE_STEP):
        height = budget // width // SIDE_STEP * SIDE_STEP
        if height < SIDE_STEP:
            break
        if max(width, height) <= MAX_ASPECT * min(width, height):
            buckets.update({(width, height), (height, width)})
    return tuple(sorted(buckets, key=lambda wh: (wh[1] / wh[0], wh[0])))


@lru_cache(maxsize=8192)  # real roots repeat a few camera sizes many times
def nearest_bucket(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The bucket whose log aspect ratio is nearest the image's; ties go to the larger area."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    target = math.log(width / height)
    return min(
        bucket_sizes(resolution),
        key=lambda wh: (abs(math.log(wh[0] / wh[1]) - target), -wh[0] * wh[1]),
    )


def is_undersized(width: int, height: int, bucket: tuple[int, int]) -> bool:
    """Whether the image has less than UNDERSIZED_FRACTION of the bucket's pixels (it will be upscaled)."""
    return width * height < UNDERSIZED_FRACTION * bucket[0] * bucket[1]
