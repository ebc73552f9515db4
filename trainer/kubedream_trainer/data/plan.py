"""The epoch plan: which images go together in which batch, for every rank.

`plan_epoch` takes the epoch's draw (`draw_epoch`), shuffles it, groups it by
(batch_id, bucket) so a batch never mixes aspect ratios or batch ids, cuts each group
into global batches of batch_size × world_size, shuffles the order of all global batches
across groups, and hands rank r the r-th slice of each. Every rank computes the same
global plan from (dataset, seed, epoch), so no communication is needed, every rank gets
the same number of batches, and each drawn image is trained exactly once across ranks.

A group's remainder (fewer images than a global batch) is filled EveryDream style, by
repeating images of the same group chosen at random (preferring images not already in
that batch), rather than dropped: small buckets still train every epoch. Preservation
images are just other images here: they mix randomly into batches of their bucket.
"""

from __future__ import annotations

import random

from .multipliers import draw_epoch
from .records import Dataset
from .seeding import derive_rng


def _fill_remainder(
    runt: list[int], members: list[int], size: int, rng: random.Random
) -> list[int]:
    """`runt` padded to `size` with random images of the same group."""
    in_runt = set(runt)
    unused = sorted(set(members) - in_runt)
    need = size - len(runt)
    if len(unused) >= need:
        return runt + rng.sample(unused, need)
    return runt + unused + rng.choices(members, k=need - len(unused))


def plan_epoch(
    dataset: Dataset,
    epoch: int,
    seed: int,
    batch_size: int,
    *,
    world_size: int = 1,
    rank: int = 0,
) -> list[list[int]]:
    """This rank's batches for the epoch, as lists of indices into `dataset.images`.

    Deterministic given (dataset, seed, epoch, batch_size, world_size). All images of a
    batch share one bucket and one batch_id; so do all slices of one global batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"need world_size >= 1 and 0 <= rank < world_size, got rank {rank} of {world_size}"
        )
    rng = derive_rng("plan", seed, epoch)
    drawn = draw_epoch(dataset, epoch, seed)
    rng.shuffle(drawn)

    groups: dict[tuple[str, tuple[int, int]], list[int]] = {}
    for index in drawn:
        image = dataset.images[index]
        groups.setdefault((image.batch_id or "", image.bucket), []).append(index)

    global_size = batch_size * world_size
    global_batches: list[list[int]] = []
    for key in sorted(groups):
        members = groups[key]
        for start in range(0, len(members), global_size):
            batch = members[start : start + global_size]
            if len(batch) < global_size:
                batch = _fill_remainder(batch, members, global_size, rng)
            global_batches.append(batch)
    rng.shuffle(global_batches)
    return [batch[rank * batch_size : (rank + 1) * batch_size] for batch in global_batches]
