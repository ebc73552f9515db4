"""From data roots to a step schedule: the scanned data set, how many optimizer steps each
epoch has, and fingerprints that tell a resumed run whether its data changed.

The data layer plans each epoch deterministically from (dataset, seed, epoch), so the
schedule is computed up front by planning every epoch once: `totalSteps` is exact even
when multipliers draw a different number of images per epoch. Called by `loop`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from kubedream_operator.spec import FineTuneJobSpec

from .data import DataRootError, Dataset, plan_epoch
from .data.loader import BatchLoader
from .data.manifest import scan_roots_cached
from .errors import JobError
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
    """How many micro-batches each epoch holds and how many optimizer steps the run takes."""

    batches_per_epoch: tuple[int, ...]
    """Micro-batches per epoch, for every epoch that trains at least one step."""
    accumulation: int
    total_steps: int

    @property
    def total_epochs(self) -> int:
        return len(self.batches_per_epoch)

    def steps_before(self, epoch: int) -> int:
        """Optimizer steps in all epochs before `epoch`."""
        return sum(math.ceil(n / self.accumulation) for n in self.batches_per_epoch[:epoch])


def build_schedule(dataset: Dataset, spec: FineTuneJobSpec, world_size: int, rank: int) -> Schedule:
    """Plan epochs until `epochs` or `maxSteps`, whichever comes first."""
    training = spec.training
    counts: list[int] = []
    steps = 0
    while (training.epochs is None or len(counts) < training.epochs) and (
        training.max_steps is None or steps < training.max_steps
    ):
        batches = len(epoch_batches(dataset, spec, len(counts), world_size, rank))
        if batches == 0:
            raise JobError(
                f"spec.data.roots: epoch {len(counts) + 1} draws no images (every multiplier rounds to 0?)"
            )
        counts.append(batches)
        steps += math.ceil(batches / training.gradient_accumulation)
    total = steps if training.max_steps is None else min(steps, training.max_steps)
    return Schedule(tuple(counts), training.gradient_accumulation, total)


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


def plan_fingerprint(batches: list[list[int]]) -> str:
    """Identity of one epoch's plan (what a resumed run must reproduce)."""
    return _digest(batches)


def step_batch_size(spec: FineTuneJobSpec, world_size: int) -> int:
    """Images per optimizer step over all ranks: batchSize × world size × gradientAccumulation."""
    training = spec.training
    return training.batch_size * world_size * training.gradient_accumulation


def global_plan(
    dataset: Dataset, spec: FineTuneJobSpec, epoch: int, world_size: int
) -> list[list[int]]:
    """The epoch's step batches: what each optimizer step trains, over all ranks. Depends on
    (dataset, seed, epoch, step batch size) only, so runs with the same step batch on any
    number of ranks train the same images at the same step."""
    return plan_epoch(dataset, epoch, spec.training.seed, step_batch_size(spec, world_size))


def epoch_batches(
    dataset: Dataset, spec: FineTuneJobSpec, epoch: int, world_size: int, rank: int
) -> list[list[int]]:
    """This rank's micro-batches of `epoch` (0-based), `gradientAccumulation` per step.

    Step batch j is cut into world size × accumulation slices of batchSize images; rank r
    trains slice a × world_size + r as its micro-batch a (every slice of a step batch holds
    one bucket, so shapes match on every rank)."""
    size, accumulation = spec.training.batch_size, spec.training.gradient_accumulation
    return [
        step_batch[slot * size : (slot + 1) * size]
        for step_batch in global_plan(dataset, spec, epoch, world_size)
        for slot in (a * world_size + rank for a in range(accumulation))
    ]


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


def data_changed(
    manifest: dict[str, Any], dataset_print: str, plan: list[list[int]] | None
) -> bool:
    """Whether a checkpoint was trained on other data (or batch size, or world size): resuming
    still works, but is no longer bit-identical to an uninterrupted run."""
    if manifest.get("datasetFingerprint") != dataset_print:
        return True
    recorded = manifest.get("planFingerprint")
    return recorded is not None and plan is not None and plan_fingerprint(plan) != recorded
