"""The epoch plan: which images go together in which batch, for every rank.

An epoch starts as its *order*: the epoch's draw (`draw_epoch`) shuffled once, a pure
function of (dataset, seed, epoch). Batches are cut from that order by one walk: every
image joins its group's pending list (a group is a (batch_id, bucket) pair, so a batch
never mixes aspect ratios or batch ids), and a group's pending list becomes the next batch
when it holds `size` images, or when the walk passes the group's last image (a short batch,
filled EveryDream style by repeating images of the same group chosen at random, preferring
images not already in it, rather than dropped: small buckets still train every epoch).
Preservation images are just other images here: they mix randomly into their bucket's
batches.

Under torchrun the batches are cut at the step batch size (batchSize × world size ×
gradientAccumulation) and every rank computes the same plan itself (no communication);
rank r trains its slices of each (see `epochs.epoch_batches`), so each drawn image is
trained exactly once across ranks.

The order does not depend on the batch size, which is what lets a run resumed with another
step batch (another number of GPUs) continue the *same* epoch: the interrupted run's
batches are re-cut from the order (`done`: the sizes and counts it trained), which marks
the images they consumed, and the walk goes on over the images left at the new size.
Because a batch always takes its group's earliest pending images, what a run consumed is a
prefix of each group's images in the order, and continuing at an unchanged size cuts
exactly the batches an uninterrupted run cuts.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from .multipliers import draw_epoch
from .records import Dataset
from .seeding import derive_rng

GroupKey = tuple[str, tuple[int, int]]


def _group_key(dataset: Dataset, index: int) -> GroupKey:
    image = dataset.images[index]
    return (image.batch_id or "", image.bucket)


@dataclass(frozen=True)
class EpochOrder:
    """One epoch's drawn images in their random order, with each one's group."""

    images: tuple[int, ...]
    """Indices into `dataset.images`, an image repeated as often as its multiplier draws it."""
    groups: tuple[int, ...]
    """The group number of each entry of `images`."""
    members: tuple[tuple[int, ...], ...]
    """Per group number: its distinct images, sorted (what a short batch is filled from)."""
    seed: int
    epoch: int


def epoch_order(dataset: Dataset, epoch: int, seed: int) -> EpochOrder:
    """The epoch's order: deterministic given (dataset, seed, epoch), whatever the batch size."""
    drawn = draw_epoch(dataset, epoch, seed)
    derive_rng("plan", seed, epoch).shuffle(drawn)
    numbers: dict[GroupKey, int] = {}
    for key in sorted({_group_key(dataset, i) for i in drawn}):
        numbers[key] = len(numbers)
    groups = tuple(numbers[_group_key(dataset, i)] for i in drawn)
    members: list[set[int]] = [set() for _ in numbers]
    for index, group in zip(drawn, groups, strict=True):
        members[group].add(index)
    return EpochOrder(tuple(drawn), groups, tuple(tuple(sorted(m)) for m in members), seed, epoch)


def _fill(runt: list[int], members: Sequence[int], size: int, rng: random.Random) -> list[int]:
    """`runt` padded to `size` with random images of the same group."""
    in_runt = set(runt)
    unused = [i for i in members if i not in in_runt]
    need = size - len(runt)
    if len(unused) >= need:
        return runt + rng.sample(unused, need)
    return runt + unused + rng.choices(list(members), k=need - len(unused))


def _walk(order: EpochOrder, size: int, consumed: bytearray, limit: int | None) -> list[list[int]]:
    """Cut up to `limit` batches of at most `size` entries (positions in the order) from the
    entries not yet `consumed`, marking those it cuts."""
    if limit == 0:
        return []
    last: dict[int, int] = {}
    for position, group in enumerate(order.groups):
        if not consumed[position]:
            last[group] = position
    pending: dict[int, list[int]] = {}
    batches: list[list[int]] = []
    for position, group in enumerate(order.groups):
        if consumed[position]:
            continue
        entries = pending.setdefault(group, [])
        entries.append(position)
        if len(entries) < size and position != last[group]:
            continue
        batches.append(entries)
        for p in entries:
            consumed[p] = 1
        del pending[group]
        if limit is not None and len(batches) == limit:
            break
    return batches


def cut_entries(
    order: EpochOrder, size: int, done: Sequence[tuple[int, int]] = ()
) -> list[tuple[int, list[int]]]:
    """(batch size, entries) of every batch of the epoch: `done` lists the (size, batches)
    runs already trained this epoch, oldest first, by runs with other batch sizes; their
    batches come first, re-cut as they were, then the rest of the order is cut at `size`.
    Entries are positions in `order.images`; each appears in exactly one batch."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    consumed = bytearray(len(order.images))
    batches: list[tuple[int, list[int]]] = []
    for done_size, count in [*done, (size, None)]:
        if done_size < 1 or (count is not None and count < 0):
            raise ValueError(f"need a batch size >= 1 and a count >= 0, got {done_size}, {count}")
        batches += [(done_size, e) for e in _walk(order, done_size, consumed, count)]
    return batches


def cut_batches(
    order: EpochOrder, size: int, done: Sequence[tuple[int, int]] = ()
) -> list[list[int]]:
    """The epoch's batches (see `cut_entries`) as lists of indices into `dataset.images`,
    short ones filled with other images of their group."""
    batches = []
    for batch_size, entries in cut_entries(order, size, done):
        batch = [order.images[p] for p in entries]
        if len(batch) < batch_size:  # seeded by the batch's first entry: the same on every resume
            rng = derive_rng("fill", order.seed, order.epoch, batch_size, entries[0])
            batch = _fill(batch, order.members[order.groups[entries[0]]], batch_size, rng)
        batches.append(batch)
    return batches


def count_batches(dataset: Dataset, epoch: int, seed: int, size: int) -> int:
    """len(cut_batches(epoch_order(...), size)) without cutting: one per started `size` images
    of each group."""
    per_group = Counter(_group_key(dataset, i) for i in draw_epoch(dataset, epoch, seed))
    return sum(math.ceil(n / size) for n in per_group.values())


def plan_epoch(
    dataset: Dataset,
    epoch: int,
    seed: int,
    batch_size: int,
    *,
    world_size: int = 1,
    rank: int = 0,
) -> list[list[int]]:
    """This rank's batches for the epoch: slice `rank` of each batch of batch_size ×
    world_size. All images of a batch share one bucket and one batch_id; so do all slices
    of one global batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"need world_size >= 1 and 0 <= rank < world_size, got rank {rank} of {world_size}"
        )
    global_batches = cut_batches(epoch_order(dataset, epoch, seed), batch_size * world_size)
    return [batch[rank * batch_size : (rank + 1) * batch_size] for batch in global_batches]
