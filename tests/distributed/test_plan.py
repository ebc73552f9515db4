"""The distributed epoch plan and launcher helpers, without launching anything."""

from __future__ import annotations

from collections import Counter
from itertools import chain
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from kubedream_operator.contract import PERMANENT_EXIT_CODES
from kubedream_operator.spec import load_job
from kubedream_trainer.data import scan_roots
from kubedream_trainer.distributed import PERMANENT_CODES, exit_code_of
from kubedream_trainer.epochs import batch_ids, epoch_batches, global_plan
from kubedream_trainer.state import Position

from .conftest import make_root, write_job


def _failures(*codes: int) -> dict[int, Any]:
    return {rank: SimpleNamespace(exitcode=code) for rank, code in enumerate(codes)}


def test_permanent_codes_match_the_operator_contract() -> None:
    assert set(PERMANENT_EXIT_CODES) == PERMANENT_CODES


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ((1, 3), 3),
        ((-9, 2), 2),
        ((143, 143), 143),
        ((4, 1), 4),
        ((-9,), 1),
        ((1, -15), 1),
        ((76, 76), 76),
        ((1, 76), 1),
        ((76, 4), 4),
        ((76, 143), 143),
    ],
)
def test_group_exit_code(codes: tuple[int, ...], expected: int) -> None:
    assert exit_code_of(_failures(*codes)) == expected


@pytest.mark.parametrize(("world", "accumulation"), [(1, 1), (2, 1), (1, 2), (3, 2), (4, 1)])
def test_ranks_split_each_step_batch(tmp_path: Path, world: int, accumulation: int) -> None:
    root = make_root(tmp_path / "data", count=11, size=(64, 64))
    make_root(tmp_path / "data" / "wide", count=5, size=(128, 64), seed=1)
    job = load_job(
        write_job(
            tmp_path / "job.yaml",
            root,
            tmp_path / "out",
            training={"batchSize": 2, "gradientAccumulation": accumulation},
        )
    )
    spec = job.spec
    dataset = scan_roots(spec.data.roots, spec.data.resolution)
    for epoch in range(3):
        plan = global_plan(dataset, spec, epoch, world)
        per_rank = [epoch_batches(dataset, spec, epoch, world, r) for r in range(world)]
        assert len({len(b) for b in per_rank}) == 1
        assert len(per_rank[0]) == len(plan) * accumulation
        for step, step_batch in enumerate(plan):
            micro = [
                per_rank[r][step * accumulation + a]
                for a in range(accumulation)
                for r in range(world)
            ]
            # Slot a × world + r, so the step's slices put back together are its step batch.
            slots = sorted(
                (a * world + r, per_rank[r][step * accumulation + a])
                for a in range(accumulation)
                for r in range(world)
            )
            assert list(chain.from_iterable(s for _, s in slots)) == step_batch
            assert len({dataset.images[i].bucket for b in micro for i in b}) == 1
        # Every image of the epoch's draw at least once; repeats only to fill a bucket's last batch.
        seen = Counter(i for batches in per_rank for b in batches for i in b)
        assert set(seen) == set(range(len(dataset.images)))
        ids = sorted(i for r in range(world) for i in batch_ids(len(per_rank[r]), spec, world, r))
        assert ids == list(range(len(plan) * world * accumulation))


def test_same_step_batch_same_plan_on_any_world(tmp_path: Path) -> None:
    root = make_root(tmp_path / "data", count=9)
    one = load_job(
        write_job(
            tmp_path / "a.yaml",
            root,
            tmp_path / "o",
            training={"batchSize": 1, "gradientAccumulation": 4},
        )
    ).spec
    four = load_job(
        write_job(tmp_path / "b.yaml", root, tmp_path / "o", training={"batchSize": 1})
    ).spec
    dataset = scan_roots(one.data.roots, one.data.resolution)
    assert global_plan(dataset, one, 0, 1) == global_plan(dataset, four, 0, 4)
    assert batch_ids(8, one, 1, 0) == list(range(8))


def test_position_across_step_batch_sizes() -> None:
    start = Position()
    two = start.advanced(1, 2, 10).advanced(1, 2, 10)  # two steps of step batch 2 (2 ranks)
    assert two.epoch_cuts == ((2, 2),)
    assert (two.epoch_images, two.images_seen) == (4, 4)
    # On one rank with accumulation 2 (the same step batch) the cuts stay, 4 micro-batches done.
    assert two.on_ranks(2, 2) == Position(2, 0, 4, 4, 4, ((2, 2),))
    # Resumed on 4 ranks: another step batch, a new run of cuts.
    four = two.on_ranks(4, 1).advanced(1, 4, 99)
    assert four.epoch_cuts == ((2, 2), (4, 1))
    assert four.batch_in_epoch == 3
    assert four.on_ranks(2, 1).batch_in_epoch == 3  # steps of any size count once each
    # The epoch's end starts the next one with no cuts.
    assert four.advanced(1, 4, 4) == Position(4, 1, 0, 12, 0, ())
    # Checkpoints from before epoch_cuts: the images (or micro-batches) done, at this size.
    assert Position(3, 1, 3, 14, 6).on_ranks(2, 1).epoch_cuts == ((2, 3),)
    assert Position(3, 0, 4, 8).on_ranks(2, 2).epoch_cuts == ((2, 2),)
    assert Position(3, 1).on_ranks(2, 1) == Position(3, 1, 0, 0, 0, ())
    assert Position.from_manifest(four.as_manifest()) == four


def test_a_resized_epoch_on_ranks(tmp_path: Path) -> None:
    """Two steps on 2 ranks × batch 2, then 3 ranks: every image of the epoch once, and the
    ranks' micro-batches after the resume point are slices of the re-cut step batches."""
    root = make_root(tmp_path / "data", count=19, size=(64, 64))
    spec = load_job(
        write_job(tmp_path / "job.yaml", root, tmp_path / "out", training={"batchSize": 2})
    ).spec
    dataset = scan_roots(spec.data.roots, spec.data.resolution)
    done = ((4, 2),)
    plan = global_plan(dataset, spec, 0, 3, done)
    assert plan[:2] == global_plan(dataset, spec, 0, 2)[:2]
    assert {len(b) for b in plan[2:]} == {6}
    seen = Counter(i for b in plan for i in b)
    assert set(seen) == set(range(19))
    assert sum(seen.values()) == 8 + 6 * (len(plan) - 2)
    per_rank = [epoch_batches(dataset, spec, 0, 3, r, done) for r in range(3)]
    for step in range(2, len(plan)):
        assert list(chain.from_iterable(b[step] for b in per_rank)) == plan[step]
