"""The batch loader: decodes planned batches in a bounded thread pool, ahead of the GPU.

The training loop builds one `BatchLoader` per epoch from `plan_epoch`'s batches and
iterates it. Batches come out in plan order; up to `prefetch` batches are being decoded
at once (PIL releases the GIL while decoding, so threads scale), and one more thread
stacks each batch, in page-locked memory when a GPU is present, so the training thread only
picks up finished batches and copies them to the GPU asynchronously. Every random choice
(flip, caption dropout, tag shuffle, substitute for a corrupt image) comes from a
generator seeded by (seed, epoch, batch id, slot, image), so starting at
`start_batch` after a resume yields exactly the batches an uninterrupted run would have.

An image that turns out corrupt only now (after the scan) does not stop training: another
image of the same bucket and batch_id is substituted, and the problem is logged and kept
in `BatchLoader.problems`. This is the one torch module of `kubedream_trainer.data`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from ..storage import Storage, join_uri, open_storage
from .captions import process_caption
from .images import ImageLoadError, load_image
from .records import Dataset, Problem
from .seeding import derive_rng

if TYPE_CHECKING:
    from kubedream_operator.spec import DataSpec

__all__ = ["Batch", "BatchLoader", "ImageLoadError", "load_image"]

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """One batch, ready for the VAE and the text encoder."""

    pixel_values: torch.Tensor
    """float32 [B, 3, H, W] in [-1, 1]; one bucket, so one (H, W)."""
    captions: list[str]
    """Captions as trained: "" after conditioning dropout, tags shuffled when enabled."""
    indices: list[int]
    """Indices into `dataset.images` actually loaded (a substitute's index when one was used)."""
    flipped: list[bool]
    """Whether each image was flipped horizontally."""
    original_sizes: list[tuple[int, int]] = field(default_factory=list)
    """(height, width) of each image as stored (after EXIF rotation): SDXL's size conditioning."""
    crop_coords: list[tuple[int, int]] = field(default_factory=list)
    """(top, left) where the bucket's crop starts in the image scaled to cover the bucket:
    SDXL's crop conditioning."""
    wait_s: float = 0.0
    """Seconds the consumer waited for this batch to be decoded (0 when it was ready)."""


@dataclass(frozen=True)
class _Sample:
    index: int
    pixels: np.ndarray
    caption: str
    flipped: bool


def crop_top_left(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """(top, left) of `images.cover_crop`'s centre crop, in the image scaled to cover
    `bucket`; `size` and `bucket` are (width, height)."""
    scale = max(bucket[0] / size[0], bucket[1] / size[1])
    return round((size[1] * scale - bucket[1]) / 2), round((size[0] * scale - bucket[0]) / 2)


def _to_pixels(img: Image.Image, flip: bool) -> np.ndarray:
    """CHW float32 in [-1, 1]."""
    hwc = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    if flip:
        hwc = hwc[:, ::-1]
    return np.ascontiguousarray(hwc.transpose(2, 0, 1))


class BatchLoader:
    """Iterate `batches[start_batch:]` as decoded `Batch`es, in order."""

    def __init__(
        self,
        dataset: Dataset,
        batches: Sequence[list[int]],
        *,
        data_spec: DataSpec,
        seed: int,
        epoch: int,
        storage_settings: object | None = None,
        workers: int = 4,
        prefetch: int = 4,
        start_batch: int = 0,
        ids: Sequence[int] | None = None,
        pin_memory: bool | None = None,
    ) -> None:
        if not 0 <= start_batch <= len(batches):
            raise ValueError(f"start_batch must be in [0, {len(batches)}], got {start_batch}")
        if workers < 0 or prefetch < 1:
            raise ValueError(f"need workers >= 0 and prefetch >= 1, got {workers} and {prefetch}")
        for position, batch in enumerate(batches):
            if not batch or len({dataset.images[i].bucket for i in batch}) != 1:
                raise ValueError(
                    f"batch {position} must be non-empty and hold one bucket, got {batch}"
                )
        self.dataset = dataset
        self.batches = list(batches)
        self.spec = data_spec
        self.seed = seed
        self.epoch = epoch
        self.workers = workers
        self.prefetch = prefetch
        self.start_batch = start_batch
        self.ids = list(ids) if ids is not None else list(range(len(self.batches)))
        """Each batch's id in the random derivations: its place in the epoch's global plan
        (under torchrun, rank r's batch i is not the i-th of the epoch)."""
        if len(self.ids) != len(self.batches):
            raise ValueError(f"need one id per batch, got {len(self.ids)} for {len(self.batches)}")
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        """Assemble batches in page-locked memory (default: when CUDA is available)."""
        self.problems: list[Problem] = []
        """Images found corrupt while loading (each once), with what was substituted."""
        self._storage_settings = storage_settings
        self._storages: dict[int, Storage] = {}
        self._bad: set[int] = set()
        self._lock = threading.Lock()
        self._groups: dict[tuple[tuple[int, int], str], list[int]] = {}
        for index, image in enumerate(dataset.images):
            if image.multiplier > 0:  # never substitute from a folder the user switched off
                self._groups.setdefault((image.bucket, image.batch_id or ""), []).append(index)

    def __len__(self) -> int:
        return len(self.batches) - self.start_batch

    def __iter__(self) -> Iterator[Batch]:
        positions = range(self.start_batch, len(self.batches))
        if self.workers == 0:
            for position in positions:
                started = time.perf_counter()
                batch = self._assemble(
                    [self._sample(position, slot) for slot in range(len(self.batches[position]))]
                )
                batch.wait_s = time.perf_counter() - started
                yield batch
            return
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="kd-load")
        # One more thread stacks each batch (100 MB of float32 at SD1.5's batch 32 and 512 px)
        # ahead of time, so the training thread only picks up finished batches.
        assembler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kd-assemble")
        pending: deque[Future[Batch]] = deque()
        try:
            for position in positions:
                samples = [
                    pool.submit(self._sample, position, slot)
                    for slot in range(len(self.batches[position]))
                ]
                pending.append(assembler.submit(self._gather, samples))
                if len(pending) >= self.prefetch:
                    yield self._collect(pending.popleft())
            while pending:
                yield self._collect(pending.popleft())
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
            assembler.shutdown(wait=False, cancel_futures=True)

    def _storage(self, root_index: int, root_uri: str) -> Storage:
        with self._lock:
            if root_index not in self._storages:
                self._storages[root_index] = open_storage(root_uri, self._storage_settings)
            return self._storages[root_index]

    def _try_load(self, index: int) -> Image.Image | None:
        """The decoded image, or None (recorded once) when it is corrupt or gone."""
        image = self.dataset.images[index]
        if index in self._bad:
            return None
        try:
            return load_image(
                self._storage(image.root_index, image.root_uri), image.key, image.bucket
            )
        except ImageLoadError as exc:
            with self._lock:
                if index not in self._bad:
                    self._bad.add(index)
                    self.problems.append(Problem(exc.path, f"skipped at load time: {exc.reason}"))
                    log.warning("%s; substituting another image of its bucket", exc)
            return None

    def _load_or_substitute(self, index: int, position: int, slot: int) -> tuple[int, Image.Image]:
        img = self._try_load(index)
        if img is not None:
            return index, img
        image = self.dataset.images[index]
        group = self._groups.get((image.bucket, image.batch_id or ""), [])
        candidates = [i for i in group if i != index]
        derive_rng("substitute", self.seed, self.epoch, self.ids[position], slot, index).shuffle(
            candidates
        )
        for candidate in candidates:  # a corrupt file stays corrupt, so this order is deterministic
            img = self._try_load(candidate)
            if img is not None:
                return candidate, img
        raise ImageLoadError(
            join_uri(image.root_uri, image.key),
            "unreadable, and no readable image of its bucket to substitute",
        )

    def _sample(self, position: int, slot: int) -> _Sample:
        index, img = self._load_or_substitute(self.batches[position][slot], position, slot)
        image = self.dataset.images[index]
        rng = derive_rng("load", self.seed, self.epoch, self.ids[position], slot, index)
        flip_p = self.spec.flip_p if image.flip_p is None else image.flip_p
        flipped = rng.random() < flip_p
        dropout = self.spec.cond_dropout if image.cond_dropout is None else image.cond_dropout
        if rng.random() < dropout:
            caption = ""
        else:
            caption = process_caption(
                image.caption, rng, self.spec.shuffle_tags, self.spec.keep_tags
            )
        return _Sample(index, _to_pixels(img, flipped), caption, flipped)

    def _gather(self, futures: list[Future[_Sample]]) -> Batch:
        """A batch from its samples' futures (on the assembler thread)."""
        return self._assemble([future.result() for future in futures])

    @staticmethod
    def _collect(future: Future[Batch]) -> Batch:
        """Wait for an assembled batch, recording how long the consumer was kept waiting."""
        started = time.perf_counter()
        batch = future.result()
        batch.wait_s = time.perf_counter() - started
        return batch

    def _assemble(self, samples: list[_Sample]) -> Batch:
        records = [self.dataset.images[s.index] for s in samples]
        first = samples[0].pixels
        # Page-locked when a GPU is present: the host-to-device copy can then run
        # asynchronously (`non_blocking`), without stalling the training thread.
        pixels = torch.empty(
            (len(samples), *first.shape), dtype=torch.float32, pin_memory=self.pin_memory
        )
        np.stack([s.pixels for s in samples], out=pixels.numpy())
        return Batch(
            pixel_values=pixels,
            captions=[s.caption for s in samples],
            indices=[s.index for s in samples],
            flipped=[s.flipped for s in samples],
            original_sizes=[(r.height, r.width) for r in records],
            crop_coords=[crop_top_left((r.width, r.height), r.bucket) for r in records],
        )
