"""Epoch plans: one bucket and batch_id per batch, every drawn image once, ranks split evenly,
and an epoch resized mid-way (another number of GPUs) still trains every drawn image once."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from kubedream_trainer.data import Dataset, draw_epoch, plan_epoch
from kubedream_trainer.data.plan import count_batches, cut_batches, cut_entries, epoch_order

from .helpers import synthetic_dataset

BUCKETS = ((512, 512), (640, 384), (384, 640))


def test_every_batch_holds_one_bucket_and_the_right_size() -> None:
    dataset = synthetic_dataset({"a": (50, 1.0), "b": (31, 1.5)}, buckets=BUCKETS)
    batches = plan_epoch(dataset, 0, seed=1, batch_size=4)
    for batch in batches:
        assert len(batch) == 4
        assert len({dataset.images[i].bucket for i in batch}) == 1


def test_each_drawn_image_appears_once_when_buckets_divide_evenly() -> None:
    dataset = synthetic_dataset({"a": (24, 1.0), "b": (12, 2.0)}, buckets=BUCKETS)
    batches = plan_epoch(dataset, 3, seed=9, batch_size=4)
    assert Counter(i for batch in batches for i in batch) == Counter(draw_epoch(dataset, 3, seed=9))


def test_remainder_is_filled_with_images_of_the_same_bucket() -> None:
    # 10 images in one bucket, batch 4: two full batches and a runt of 2 filled with 2 repeats.
    dataset = synthetic_dataset({"a": (10, 1.0)})
    batches = plan_epoch(dataset, 0, seed=2, batch_size=4)
    assert len(batches) == 3
    counts = Counter(i for batch in batches for i in batch)
    assert set(counts) == set(range(10))
    assert sorted(counts.values()) == [1] * 8 + [2] * 2
    assert all(len(set(batch)) == len(batch) for batch in batches)  # no repeat within a batch


def test_tiny_bucket_repeats_its_only_image() -> None:
    dataset = synthetic_dataset({"a": (1, 1.0)})
    assert plan_epoch(dataset, 0, seed=0, batch_size=3) == [[0, 0, 0]]


def test_batch_ids_never_share_a_batch() -> None:
    dataset = synthetic_dataset({"x": (9, 1.0), "y": (9, 1.0)}, batch_ids={"x": "style-x"})
    for batch in plan_epoch(dataset, 0, seed=4, batch_size=2):
        assert len({dataset.images[i].batch_id for i in batch}) == 1


def test_batch_order_mixes_buckets_and_is_deterministic() -> None:
    dataset = synthetic_dataset({"a": (60, 1.0)}, buckets=BUCKETS)
    first = plan_epoch(dataset, 0, seed=5, batch_size=2)
    assert first == plan_epoch(dataset, 0, seed=5, batch_size=2)
    assert first != plan_epoch(dataset, 1, seed=5, batch_size=2)
    assert first != plan_epoch(dataset, 0, seed=6, batch_size=2)
    bucket_sequence = [dataset.images[batch[0]].bucket for batch in first]
    assert bucket_sequence != sorted(bucket_sequence)  # not grouped bucket after bucket
    assert len(set(bucket_sequence[:10])) > 1


def test_fractional_preservation_images_mix_into_batches() -> None:
    dataset = synthetic_dataset({"train": (40, 1.0), "pres": (100, 0.2)})
    batches = plan_epoch(dataset, 0, seed=3, batch_size=5)
    folders_per_batch = [{dataset.images[i].folder for i in batch} for batch in batches]
    assert sum(len(f) == 2 for f in folders_per_batch) >= 1
    assert sum(1 for batch in batches for i in batch if dataset.images[i].folder == "pres") == 20


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_shares_are_slices_of_the_global_batches(world_size: int) -> None:
    dataset = synthetic_dataset({"a": (37, 1.0), "b": (20, 0.5)}, buckets=BUCKETS)
    global_plan = plan_epoch(dataset, 1, seed=8, batch_size=2 * world_size)
    shares = [
        plan_epoch(dataset, 1, seed=8, batch_size=2, world_size=world_size, rank=r)
        for r in range(world_size)
    ]
    assert all(len(share) == len(global_plan) for share in shares)
    for position, global_batch in enumerate(global_plan):
        assert [i for share in shares for i in share[position]] == global_batch
        assert len({dataset.images[i].bucket for i in global_batch}) == 1


def test_ranks_train_each_image_once_when_counts_divide() -> None:
    dataset = synthetic_dataset({"a": (48, 1.0)}, buckets=BUCKETS)
    shares = [plan_epoch(dataset, 0, seed=0, batch_size=4, world_size=4, rank=r) for r in range(4)]
    seen = Counter(i for share in shares for batch in share for i in batch)
    assert seen == Counter(range(48))


@pytest.mark.parametrize(
    ("batch_size", "world_size", "rank"), [(0, 1, 0), (1, 0, 0), (1, 2, 2), (1, 2, -1)]
)
def test_bad_arguments_raise(batch_size: int, world_size: int, rank: int) -> None:
    dataset = synthetic_dataset({"a": (4, 1.0)})
    with pytest.raises(ValueError, match=r"must be|need"):
        plan_epoch(dataset, 0, seed=0, batch_size=batch_size, world_size=world_size, rank=rank)


def _mixed() -> Dataset:
    return synthetic_dataset(
        {"a": (23, 1.0), "b": (11, 1.5), "c": (40, 0.3)}, buckets=BUCKETS, batch_ids={"b": "style"}
    )


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_continuing_at_the_same_size_cuts_what_an_uninterrupted_run_cuts(size: int) -> None:
    order = epoch_order(_mixed(), 2, seed=7)
    whole = cut_batches(order, size)
    assert len(whole) == count_batches(_mixed(), 2, 7, size)
    for done in range(len(whole) + 1):
        assert cut_batches(order, size, [(size, done)]) == whole


@pytest.mark.parametrize("sizes", [(4, 2), (2, 4), (3, 8, 1), (6, 6, 4), (1, 5)])
def test_an_epoch_resized_mid_way_trains_every_drawn_image_once(sizes: tuple[int, ...]) -> None:
    """A run stops after some batches, the next continues at another batch size (another
    number of GPUs), maybe again: together they train each entry of the epoch's order once,
    the earlier runs' batches stay what those runs trained, and every batch holds one group."""
    dataset = _mixed()
    order = epoch_order(dataset, 1, seed=3)
    rng = random.Random(repr(sizes))
    done: list[tuple[int, int]] = []
    for size in sizes[:-1]:
        left = len(cut_entries(order, size, done)) - sum(count for _, count in done)
        done.append((size, rng.randrange(1, left)))
    batches = cut_entries(order, sizes[-1], done)
    trained = sorted(p for _, entries in batches for p in entries)
    assert trained == list(range(len(order.images)))
    for batch_size, entries in batches:
        assert 1 <= len(entries) <= batch_size
        assert len({order.groups[p] for p in entries}) == 1
    expected_sizes = [size for size, count in done for _ in range(count)]
    assert [size for size, _ in batches][: len(expected_sizes)] == expected_sizes
    assert {size for size, _ in batches[len(expected_sizes) :]} == {sizes[-1]}
    # What the first run trained is what it would have trained uninterrupted.
    first_size, first_count = done[0]
    resized = cut_batches(order, sizes[-1], done)
    assert resized[:first_count] == cut_batches(order, first_size)[:first_count]
    assert [len(b) for b in resized] == [size for size, _ in batches]
    assert Counter(i for b in resized for i in b) >= Counter(draw_epoch(dataset, 1, seed=3))


def test_the_order_does_not_depend_on_the_batch_size() -> None:
    dataset = _mixed()
    order = epoch_order(dataset, 0, seed=5)
    assert sorted(order.images) == draw_epoch(dataset, 0, seed=5)
    for size in (1, 4, 7):  # a group's batches take its images in the order's sequence
        for _, entries in cut_entries(order, size):
            assert entries == sorted(entries)
    assert epoch_order(dataset, 0, seed=5) == order
    assert epoch_order(dataset, 0, seed=6).images != order.images
