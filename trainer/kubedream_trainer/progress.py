"""Progress reporting: `<output>/progress.json`, a terminal bar, or JSON log lines.

progress.json is rewritten (atomically, through `Storage`) every `progressEverySteps` steps
and at every phase change. The operator mirrors it into the FineTuneJob's status, so its
field names are a contract (docs/trainer.md):

  phase            Starting | Training | Checkpointing | Sampling | Succeeded | Failed | Interrupted
  step, totalSteps optimizer steps done / planned
  epoch, totalEpochs  1-based epoch in progress / planned
  loss             smoothed training loss (bias-corrected exponential average, beta 0.9), or null
  learningRate     current UNet learning rate, or null
  imagesPerSecond  images trained per second across all ranks since the last report, or null
  lastCheckpoint   URI of the newest committed checkpoint, or null
  checkpoints      URIs of every committed checkpoint, oldest first
  lastSamples      URI of the newest sample folder, or null
  worldSize        training processes
  message          what is happening, or what to fix when Failed
  job, startedAt, updatedAt   job name and ISO-8601 UTC times

On a terminal (stderr is a TTY) a tqdm bar shows progress; otherwise one JSON line per
report goes to stdout, for log collectors. Human-readable messages go to stderr. Only rank 0
reports; other ranks get a reporter with no output. Called by `loop` and `train_cli`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from enum import StrEnum
from typing import Any, TextIO

from tqdm import tqdm

from .checkpoint import now_iso
from .storage import Storage

PROGRESS_KEY = "progress.json"


class Phase(StrEnum):
    """Values of progress.json's `phase`."""

    STARTING = "Starting"
    TRAINING = "Training"
    CHECKPOINTING = "Checkpointing"
    SAMPLING = "Sampling"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    INTERRUPTED = "Interrupted"


class Progress:
    """Keeps the progress record and writes it; a no-op on ranks other than 0."""

    def __init__(
        self,
        output: Storage | None,
        job: str,
        every_steps: int,
        world_size: int = 1,
        tty: bool | None = None,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
    ) -> None:
        self.output = output
        self.every_steps = max(1, every_steps)
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.tty = self.stderr.isatty() if tty is None else tty
        self.record: dict[str, Any] = {
            "phase": Phase.STARTING.value,
            "step": 0,
            "totalSteps": None,
            "epoch": None,
            "totalEpochs": None,
            "loss": None,
            "learningRate": None,
            "imagesPerSecond": None,
            "lastCheckpoint": None,
            "checkpoints": [],
            "lastSamples": None,
            "worldSize": world_size,
            "message": "",
            "job": job,
            "startedAt": now_iso(),
            "updatedAt": now_iso(),
        }
        self._loss_avg = 0.0
        self._loss_count = 0
        self._window_images = 0
        self._window_start = time.monotonic()
        self._bar: tqdm[Any] | None = None

    @property
    def enabled(self) -> bool:
        return self.output is not None

    def say(self, message: str) -> None:
        """A human-readable line on stderr (above the bar when there is one)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(f"kubedream: {message}", file=self.stderr)
        else:
            print(f"kubedream: {message}", file=self.stderr, flush=True)

    def update(self, **fields: Any) -> None:
        """Set fields without writing."""
        self.record.update(fields)

    def phase(self, phase: Phase, message: str = "", **fields: Any) -> None:
        """Enter a phase and write progress.json now."""
        self.record.update(fields, phase=phase.value, message=message)
        if phase is Phase.TRAINING:
            self._window_images, self._window_start = 0, time.monotonic()
            if self.enabled and self.tty and self._bar is None:
                self._open_bar(self.record["step"])
        if phase in (Phase.SUCCEEDED, Phase.FAILED, Phase.INTERRUPTED):
            self._close_bar()
        self.write()
        if message and phase is not Phase.TRAINING:
            self.say(message)

    def back_to_training(self) -> None:
        """Return to the Training phase after checkpointing or sampling."""
        if self.record["phase"] != Phase.TRAINING.value:
            self.phase(Phase.TRAINING, "training")

    def set_checkpoints(self, uris: list[str]) -> None:
        self.record.update(checkpoints=list(uris), lastCheckpoint=uris[-1] if uris else None)

    def step(self, step: int, epoch: int, loss: float, images: int, learning_rate: float) -> None:
        """Record one optimizer step; report every `progressEverySteps` steps."""
        self._loss_count += 1
        self._loss_avg = 0.9 * self._loss_avg + 0.1 * loss
        self._window_images += images
        smoothed = self._loss_avg / (1 - 0.9**self._loss_count)
        self.record.update(
            step=step,
            epoch=epoch,
            learningRate=learning_rate,
            loss=smoothed if math.isfinite(smoothed) else None,
        )
        if self.enabled and self.tty:
            self._advance_bar(step, smoothed)
        total = self.record["totalSteps"]
        if step % self.every_steps == 0 or step == total:
            elapsed = time.monotonic() - self._window_start
            if elapsed > 0 and self._window_images:
                self.record["imagesPerSecond"] = round(self._window_images / elapsed, 3)
            self._window_images, self._window_start = 0, time.monotonic()
            self.write()
            if self.enabled and not self.tty:
                print(
                    json.dumps({"event": "progress", **self.record}), file=self.stdout, flush=True
                )

    def write(self) -> None:
        """Rewrite progress.json (rank 0 only)."""
        if self.output is None:
            return
        self.record["updatedAt"] = now_iso()
        self.output.write_text(PROGRESS_KEY, json.dumps(self.record, indent=2) + "\n")

    def _advance_bar(self, step: int, loss: float) -> None:
        bar = self._bar or self._open_bar(step - 1)
        epoch = f"{self.record['epoch']}/{self.record['totalEpochs']}"
        bar.set_postfix(loss=f"{loss:.4f}", epoch=epoch, refresh=False)
        bar.update(step - bar.n)

    def _open_bar(self, initial: int) -> tqdm[Any]:
        self._bar = tqdm(
            total=self.record["totalSteps"],
            initial=initial,
            file=self.stderr,
            unit="step",
            dynamic_ncols=True,
        )
        return self._bar

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
