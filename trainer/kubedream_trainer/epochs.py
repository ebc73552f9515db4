"""From data roots to a step schedule: the scanned data set, how many optimizer steps each
epoch has, and fingerprints that tell a resumed run whether its data changed.

The data layer orders each epoch deterministically from (dataset, seed, epoch) and cuts
step batches from that order (`data.plan`), so the schedule is computed up front by
counting every epoch's step batches: `totalSteps` is exact even when multipliers draw a
different number of images per epoch. Called by `loop`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from kubedream_operator.spec import FineTuneJobSpec

from .data import DataRootError, Dataset
from .data.loader import BatchLoader
from .data.manifest import scan_roots_cached
from .data.plan import EpochOrder, count_batches, cut_batches, epoch_order
from .errors import JobError
from .state import Position
from .storage import Storage

T = TypeVar("T")


def load_dataset(
    spec: FineTuneJobSpec, cache: Storage | None = None, write_cache: bool = True
) -> Dataset:
    """Scan `spec.data.roots`; JobError when a root is missing or no image is usable.

    With `cache` (the output), an unchanged scan is read from its dataset-manifest.json
    and a new one saved there when `write_cache` (see `data.manifest`)."""
    try:
        dataset, _ = scan_roots_cached(
            spec.data.roots, spec.data.resolution, spec.storage, cache, write=write_cache
        )
    except DataRootError as exc:
        raise JobError(f"spec.data.roots: {exc}") from None
    except ValueError as exc:
        raise JobError(f"spec.data.resolution: {exc}") from None
    if not dataset.images:
        roots = ", ".join(root.uri for root in spec.data.roots)
        detail = "; ".join(f"{p.path}: {p.problem}" for p in dataset.problems[:5])
        raise JobError(
            f"spec.data.roots: no usable images in {roots}"
            + (f" ({detail})" if detail else "")
            + "; add readable images (jpg, png, webp) or point the roots elsewhere"
        )
    return dataset


@dataclass(frozen=True)
class Schedule:
    """How far the run goes: its last optimizer step and how many epochs that takes."""

    total_steps: int
    total_epochs: int


def build_schedule(
    dataset: Dataset, spec: FineTuneJobSpec, world_size: int, start: Position | None = None
) -> Schedule:
    """Plan epochs from `start` (a resume point, already `on_ranks`) until `epochs` or
    `maxSteps`, whichever comes first. Exact: multipliers may draw a different number of
    images each epoch, and a resumed epoch may have been cut at another step batch size."""
    training = spec.training
    start = start or Position()
    size = step_batch_size(spec, world_size)
    steps, epoch = start.step, start.epoch
    while (training.epochs is None or epoch < training.epochs) and (
        training.max_steps is None or steps < training.max_steps
    ):
        if epoch == start.epoch and start.epoch_cuts:
            done = sum(count for _, count in start.epoch_cuts)
            plan = global_plan(dataset, spec, epoch, world_size, start.epoch_cuts)
            steps += max(0, len(plan) - done)  # fewer: the data shrank since the checkpoint
        else:
            count = count_batches(dataset, epoch, training.seed, size)
            if count == 0:
                raise JobError(
                    f"spec.data.roots: epoch {epoch + 1} draws no images "
                    "(every multiplier rounds to 0?)"
                )
            steps += count
        epoch += 1
    total = steps if training.max_steps is None else min(steps, training.max_steps)
    return Schedule(total, epoch)


def accumulation_groups(batches: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive groups of `size` micro-batches; the epoch's last group may be shorter."""
    group: list[T] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def _digest(value: object) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def dataset_fingerprint(dataset: Dataset) -> str:
    """Changes when any image, caption, bucket or multiplier changes."""
    return _digest(
        [(i.root_uri, i.key, i.etag, i.caption, i.bucket, i.multiplier) for i in dataset.images]
    )


def order_fingerprint(order: EpochOrder) -> str:
    """Identity of one epoch's image order (what a resumed run continues)."""
    return _digest(list(order.images))


def step_batch_size(spec: FineTuneJobSpec, world_size: int) -> int:
    """Images per optimizer step over all ranks: batchSize × world size × gradientAccumulation."""
    training = spec.training
    return training.batch_size * world_size * training.gradient_accumulation


def global_plan(
    dataset: Dataset,
    spec: FineTuneJobSpec,
    epoch: int,
    world_size: int,
    done: Sequence[tuple[int, int]] = (),
) -> list[list[int]]:
    """The epoch's step batches: what each optimizer step trains, over all ranks. Depends on
    (dataset, seed, epoch, step batch size) only, so runs with the same step batch on any
    number of ranks train the same images at the same step. `done`: the (step batch size,
    count) runs this epoch already trained (`Position.epoch_cuts`), first in the plan."""
    order = epoch_order(dataset, epoch, spec.training.seed)
    return cut_batches(order, step_batch_size(spec, world_size), done)


def rank_batches(
    plan: list[list[int]], spec: FineTuneJobSpec, world_size: int, rank: int
) -> list[list[int]]:
    """This rank's micro-batches of a plan, `gradientAccumulation` per step batch.

    Step batch j is cut into world size × accumulation slices of batchSize images; rank r
    trains slice a × world_size + r as its micro-batch a (every slice of a step batch holds
    one bucket, so shapes match on every rank). Step batches of another size (those a
    resumed run's predecessor trained) are never trained again; their slices only hold
    their place."""
    size, accumulation = spec.training.batch_size, spec.training.gradient_accumulation
    return [
        step_batch[slot * size : (slot + 1) * size]
        for step_batch in plan
        for slot in (a * world_size + rank for a in range(accumulation))
    ]


def epoch_batches(
    dataset: Dataset,
    spec: FineTuneJobSpec,
    epoch: int,
    world_size: int,
    rank: int,
    done: Sequence[tuple[int, int]] = (),
) -> list[list[int]]:
    """This rank's micro-batches of `epoch` (0-based): `rank_batches` of `global_plan`."""
    return rank_batches(global_plan(dataset, spec, epoch, world_size, done), spec, world_size, rank)


def batch_ids(count: int, spec: FineTuneJobSpec, world_size: int, rank: int) -> list[int]:
    """Global ids of this rank's `count` micro-batches (the slice number in the epoch), which
    seed the loader's flips and caption choices: the same on any number of ranks."""
    accumulation = spec.training.gradient_accumulation
    slices = world_size * accumulation
    return [
        (i // accumulation) * slices + (i % accumulation) * world_size + rank for i in range(count)
    ]


def epoch_loader(
    dataset: Dataset,
    spec: FineTuneJobSpec,
    epoch: int,
    batches: list[list[int]],
    start_batch: int,
    ids: list[int] | None = None,
) -> BatchLoader:
    """Decoded batches of the plan, from `start_batch` on (as an uninterrupted run has them)."""
    return BatchLoader(
        dataset,
        batches,
        data_spec=spec.data,
        seed=spec.training.seed,
        epoch=epoch,
        storage_settings=spec.storage,
        workers=spec.data.loader_workers,
        start_batch=start_batch,
        ids=ids,
    )


def data_changed(manifest: dict[str, Any], dataset_print: str, order_print: str) -> bool:
    """Whether a checkpoint was trained on other data (or another seed): resuming still
    works, but no longer continues the same epoch."""
    if manifest.get("datasetFingerprint") != dataset_print:
        return True
    recorded = manifest.get("planFingerprint")
    return recorded is not None and recorded != order_print
