"""The training state a checkpoint must hold for a bit-exact resume, and its files.

`training_state/` inside every checkpoint holds:
  unet.safetensors            the UNet as trained (not EMA), fp32
  text_encoder.safetensors    the text encoder as trained, when it trains
  ema_unet.safetensors        EMA shadow weights keyed by parameter name, when EMA is on
  optimizer.pt                the optimizer's state_dict
  trainer.pt                  position, LR schedule, EMA counters, grad scaler, RNG states

`trainer.pt` is written with plain Python/tensor values only, so it loads with
`torch.load(weights_only=True)`: a checkpoint can never execute code on load. RNG states are
per rank (each rank has its own noise generator); rank 0 saves all of them.

Called by `checkpoint` (writing) and `loop` (restoring).
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:
    from .checkpoint import Checkpoint, CheckpointStore

STATE_DIR = "training_state"


@dataclass
class Position:
    """Where training stands, counted so that resuming continues at the next micro-batch."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """0-based epoch in progress (its order is `epoch_order(dataset, epoch, seed)`)."""
    batch_in_epoch: int = 0
    """This rank's micro-batches of that epoch already trained (step batches done ×
    gradientAccumulation). Depends on world size and accumulation; `epoch_cuts` does not."""
    images_seen: int = 0
    """Images trained so far over all ranks."""
    epoch_images: int = -1
    """Images of the epoch trained so far over all ranks (-1 in checkpoints written before
    it existed)."""
    epoch_cuts: tuple[tuple[int, int], ...] = ()
    """The epoch's step batches trained so far, as (step batch size, count) runs, oldest
    first: a run resumed on another number of GPUs re-cuts these from the epoch's order and
    continues it (`data.plan.cut_batches`). Empty at an epoch's start, and in checkpoints
    written before it existed."""

    def advanced(self, micro_batches: int, images: int, epoch_size: int) -> Position:
        """One optimizer step of `images` (all ranks: the step batch) later; rolls over at
        the end of the plan (`epoch_size` micro-batches)."""
        batch = self.batch_in_epoch + micro_batches
        ended = batch >= epoch_size
        cuts = list(self.epoch_cuts)
        if cuts and cuts[-1][0] == images:
            cuts[-1] = (images, cuts[-1][1] + 1)
        else:
            cuts.append((images, 1))
        return Position(
            step=self.step + 1,
            epoch=self.epoch + int(ended),
            batch_in_epoch=0 if ended else batch,
            images_seen=self.images_seen + images,
            epoch_images=0 if ended else max(self.epoch_images, 0) + images,
            epoch_cuts=() if ended else tuple(cuts),
        )

    def on_ranks(self, step_batch: int, accumulation: int) -> Position:
        """This position for a run whose step batch is `step_batch` images in
        `accumulation` micro-batches per rank: the epoch's cuts so far stay, and this rank has
        trained `accumulation` micro-batches of each of their step batches (see
        docs/distributed.md, "Changing the number of processes")."""
        cuts = tuple(self.epoch_cuts)
        if not cuts and self.batch_in_epoch > 0:  # a checkpoint from before epoch_cuts
            if self.epoch_images >= 0:
                cuts = ((step_batch, self.epoch_images // step_batch),)
            else:
                cuts = ((step_batch, self.batch_in_epoch // accumulation),)
        steps_done = sum(count for _, count in cuts)
        return Position(
            step=self.step,
            epoch=self.epoch,
            batch_in_epoch=steps_done * accumulation,
            images_seen=self.images_seen,
            epoch_images=sum(size * count for size, count in cuts),
            epoch_cuts=cuts,
        )

    @property
    def at_epoch_start(self) -> bool:
        return self.batch_in_epoch == 0

    @property
    def epoch_label(self) -> int:
        """1-based epoch of the last trained step (the finished one right at an epoch's end)."""
        return self.epoch if self.at_epoch_start and self.step > 0 else self.epoch + 1

    def as_manifest(self) -> dict[str, Any]:
        """camelCase, as checkpoint.json spells it."""
        return {
            "step": self.step,
            "epochIndex": self.epoch,
            "batchInEpoch": self.batch_in_epoch,
            "imagesSeen": self.images_seen,
            "imagesInEpoch": self.epoch_images,
            "epochCuts": [list(cut) for cut in self.epoch_cuts],
        }

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> Position:
        """What `as_manifest` wrote (fields it lacked in older checkpoints keep defaults)."""
        return cls(
            step=int(manifest.get("step", 0)),
            epoch=int(manifest.get("epochIndex", 0)),
            batch_in_epoch=int(manifest.get("batchInEpoch", 0)),
            images_seen=int(manifest.get("imagesSeen", 0)),
            epoch_images=int(manifest.get("imagesInEpoch", -1)),
            epoch_cuts=tuple((int(a), int(b)) for a, b in manifest.get("epochCuts", [])),
        )


def capture_rng(noise_generator: torch.Generator) -> dict[str, Any]:
    """This process's random states: python, numpy, torch CPU, CUDA, and the noise generator."""
    numpy_state: Any = np.random.get_state(legacy=True)
    kind, keys, pos, has_gauss, cached = numpy_state
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "noise": noise_generator.get_state(),
    }


def restore_rng(states: dict[str, Any], noise_generator: torch.Generator) -> None:
    """Put back what `capture_rng` captured (the CUDA states only when CUDA is here)."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = states["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    noise_generator.set_state(states["noise"])


def write_state(
    folder: Path,
    *,
    unet: dict[str, torch.Tensor],
    text_encoder: dict[str, torch.Tensor] | None,
    ema_state: dict[str, Any] | None,
    ema_names: list[str],
    optimizer: dict[str, Any],
    trainer: dict[str, Any],
) -> None:
    """Write `training_state/` under `folder` from whole state dicts: the UNet's and text
    encoder's, EMA's (`shadow_params` in the order of `ema_names`, the UNet's parameter
    names), the optimizer's; `trainer` holds position, schedule, RNG states."""
    out = folder / STATE_DIR
    out.mkdir(parents=True, exist_ok=True)
    save_file(_cpu(unet), str(out / "unet.safetensors"))
    if text_encoder is not None:
        save_file(_cpu(text_encoder), str(out / "text_encoder.safetensors"))
    if ema_state is not None:
        shadow = dict(zip(ema_names, ema_state["shadow_params"], strict=True))
        save_file(_cpu(shadow), str(out / "ema_unet.safetensors"))
        trainer = {**trainer, "ema": {k: v for k, v in ema_state.items() if k != "shadow_params"}}
    torch.save(optimizer, out / "optimizer.pt")
    torch.save(trainer, out / "trainer.pt")


@dataclass
class LoadedState:
    """What `read_state` hands back to the loop."""

    unet: dict[str, torch.Tensor]
    text_encoder: dict[str, torch.Tensor] | None
    ema_shadow: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any]
    trainer: dict[str, Any]

    @property
    def position(self) -> Position:
        fields = dict(self.trainer["position"])
        fields["epoch_cuts"] = tuple(tuple(cut) for cut in fields.get("epoch_cuts", ()))
        return Position(**fields)


def fetch_state(
    store: CheckpointStore, checkpoint: Checkpoint, staging_dir: Path | None
) -> LoadedState:
    """Read a committed checkpoint's training state (downloaded first when the output is remote)."""
    with tempfile.TemporaryDirectory(prefix="kd-resume-", dir=staging_dir) as tmp:
        return read_state(store.fetch(checkpoint, STATE_DIR, Path(tmp)))


def read_state(folder: Path) -> LoadedState:
    """Read `training_state/` from a local folder (fetched from the output first if remote)."""
    root = folder / STATE_DIR
    text = root / "text_encoder.safetensors"
    ema = root / "ema_unet.safetensors"
    return LoadedState(
        unet=load_file(str(root / "unet.safetensors")),
        text_encoder=load_file(str(text)) if text.is_file() else None,
        ema_shadow=load_file(str(ema)) if ema.is_file() else None,
        optimizer=torch.load(root / "optimizer.pt", map_location="cpu", weights_only=True),
        trainer=torch.load(root / "trainer.pt", map_location="cpu", weights_only=True),
    )


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
