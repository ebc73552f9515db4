"""Aspect-ratio buckets: computed sets obey the rules and images go to the nearest one."""

from __future__ import annotations

import math

import pytest

from kubedream_trainer.data.buckets import MAX_ASPECT, bucket_sizes, is_undersized, nearest_bucket

RESOLUTIONS = [64, 128, 256, 512, 768, 1024]


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_buckets_obey_side_area_and_ratio_rules(resolution: int) -> None:
    buckets = bucket_sizes(resolution)
    assert (resolution, resolution) in buckets
    for width, height in buckets:
        assert width % 64 == 0
        assert height % 64 == 0
        assert width * height <= resolution * resolution
        assert max(width, height) / min(width, height) <= MAX_ASPECT


@pytest.mark.parametrize("resolution", RESOLUTIONS)
def test_buckets_are_symmetric_and_use_the_pixel_budget(resolution: int) -> None:
    buckets = set(bucket_sizes(resolution))
    assert {(h, w) for w, h in buckets} == buckets
    budget = resolution * resolution
    for width, height in buckets:
        # Maximal in at least one side: one more step of 64 on it would break the area bound.
        assert (width + 64) * height > budget or width * (height + 64) > budget


def test_bucket_set_for_512_matches_hand_check() -> None:
    buckets = bucket_sizes(512)
    assert buckets[0] == (1024, 256)
    assert buckets[-1] == (256, 1024)
    assert {(512, 512), (576, 448), (640, 384), (768, 320), (448, 576)} <= set(buckets)
    assert len(buckets) == 17


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((512, 512), (512, 512)),
        ((4000, 4000), (512, 512)),
        ((1920, 1080), (640, 384)),
        ((1080, 1920), (384, 640)),
        ((3000, 100), (1024, 256)),  # beyond 4:1 clamps to the most extreme bucket
        ((100, 3000), (256, 1024)),
    ],
)
def test_nearest_bucket_examples(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert nearest_bucket(*size, 512) == expected


@pytest.mark.parametrize("resolution", [128, 512, 1024])
def test_nearest_bucket_minimises_log_aspect_distance(resolution: int) -> None:
    buckets = bucket_sizes(resolution)
    for width in range(40, 2400, 37):
        for height in (50, 333, 768, 1500):
            chosen = nearest_bucket(width, height, resolution)
            target = math.log(width / height)
            best = min(abs(math.log(w / h) - target) for w, h in buckets)
            assert abs(math.log(chosen[0] / chosen[1]) - target) == pytest.approx(best)


def test_bad_resolution_and_size_raise() -> None:
    with pytest.raises(ValueError, match="multiple of 64"):
        bucket_sizes(500)
    with pytest.raises(ValueError, match="positive"):
        nearest_bucket(0, 10, 512)


def test_undersized_is_below_half_the_bucket_area() -> None:
    assert is_undersized(100, 100, (512, 512))
    assert is_undersized(362, 362, (512, 512))  # 131044 < 131072
    assert not is_undersized(363, 363, (512, 512))
