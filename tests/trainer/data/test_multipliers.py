"""Multipliers: exact per-epoch counts, fresh random fractions each epoch, reproducible draws."""

from __future__ import annotations

from collections import Counter

import pytest

from kubedream_trainer.data import draw_epoch
from kubedream_trainer.data.multipliers import fractional_repeats, per_epoch_count

from .helpers import synthetic_dataset


@pytest.mark.parametrize(
    ("multiplier", "count", "expected"),
    [
        (0.025, 1000, (0, 25)),
        (2.5, 10, (2, 5)),
        (0.0, 7, (0, 0)),
        (1.0, 3, (1, 0)),
        (0.5, 5, (0, 3)),
        (0.3 * 10, 4, (3, 0)),
    ],
)
def test_fractional_repeats(multiplier: float, count: int, expected: tuple[int, int]) -> None:
    assert fractional_repeats(multiplier, count) == expected


def test_negative_multiplier_is_rejected() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        fractional_repeats(-0.5, 3)


@pytest.mark.parametrize("epoch", range(6))
def test_fraction_draws_exact_count_every_epoch(epoch: int) -> None:
    dataset = synthetic_dataset({"pres": (1000, 0.025), "train": (7, 1.0)})
    drawn = draw_epoch(dataset, epoch, seed=555)
    per_folder = Counter(dataset.images[i].folder for i in drawn)
    assert per_folder == {"pres": 25, "train": 7}
    assert len(set(drawn)) == len(drawn)  # a fraction below 1 never repeats an image


def test_whole_part_repeats_every_image_and_fraction_adds_exactly() -> None:
    dataset = synthetic_dataset({"a": (10, 2.5)})
    for epoch in range(5):
        counts = Counter(draw_epoch(dataset, epoch, seed=1))
        assert sum(counts.values()) == 25
        assert sorted(counts.values()) == [2] * 5 + [3] * 5


def test_fraction_changes_across_epochs_but_is_reproducible() -> None:
    dataset = synthetic_dataset({"pres": (1000, 0.025)})
    epochs = [draw_epoch(dataset, epoch, seed=7) for epoch in range(4)]
    assert len({tuple(e) for e in epochs}) == 4
    assert draw_epoch(dataset, 2, seed=7) == epochs[2]
    assert draw_epoch(dataset, 2, seed=8) != epochs[2]


def test_zero_removes_a_folder() -> None:
    dataset = synthetic_dataset({"gone": (20, 0.0), "kept": (3, 1.0)})
    drawn = draw_epoch(dataset, 0, seed=0)
    assert {dataset.images[i].folder for i in drawn} == {"kept"}
    assert len(drawn) == 3


def test_folders_draw_independently() -> None:
    dataset = synthetic_dataset({"x": (100, 0.5), "y": (100, 0.5)})
    drawn = draw_epoch(dataset, 0, seed=3)
    per_folder = Counter(dataset.images[i].folder for i in drawn)
    assert per_folder == {"x": 50, "y": 50}
    x_offsets = sorted(i for i in drawn if dataset.images[i].folder == "x")
    y_offsets = sorted(i - 100 for i in drawn if dataset.images[i].folder == "y")
    assert x_offsets != y_offsets


def test_per_epoch_count_matches_draw() -> None:
    dataset = synthetic_dataset({"a": (13, 1.7)})
    assert per_epoch_count(1.7, 13) == len(draw_epoch(dataset, 0, seed=0)) == 13 + 9
