"""Per-step timing for benchmarks and tuning: one JSON line per optimizer step.

progress.json reports a smoothed view every `progressEverySteps` steps; a throughput study
needs every step: how long it took, how long the loader kept it waiting, the device's peak
memory. With `KUBEDREAM_METRICS_FILE` set, rank 0 appends a line per step to that local file:

  {"step": 12, "images": 32, "loss": 0.117, "stepSeconds": 0.36, "dataWaitSeconds": 0.0,
   "wallSeconds": 0.37, "peakMemoryGiB": 48.9, "time": 1795980000.123}

`stepSeconds` is the host's wall time of `step.optimizer_step` (which waits for the device
once, so in steady state it is the device's step time), `dataWaitSeconds` the time the
loader kept that step waiting, `wallSeconds` the time since the previous step ended
(everything: data, step, progress, checkpoints and samples). `peakMemoryGiB` is CUDA's
peak allocated memory so far (absent on CPU), `time` the Unix time the step ended. Nothing here synchronises the device.
`bench/train_bench.py` reads the file. Called by `loop`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .step import StepResult


class StepLog:
    """Appends one line per step to a local JSONL file; a no-op without a path."""

    def __init__(self, path: Path | None, device: torch.device) -> None:
        self.path = path
        self.device = device
        self._last = time.perf_counter()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def restart_clock(self) -> None:
        """Start the next step's wall time now (when training starts)."""
        self._last = time.perf_counter()

    def record(self, step: int, result: StepResult) -> None:
        now = time.perf_counter()
        if self.path is not None:
            line: dict[str, float | int] = {
                "step": step,
                "images": result.images,
                "loss": result.loss,
                "stepSeconds": round(result.seconds, 6),
                "dataWaitSeconds": round(result.data_wait_s, 6),
                "wallSeconds": round(now - self._last, 6),
                "time": round(time.time(), 3),
            }
            if self.device.type == "cuda":
                line["peakMemoryGiB"] = round(
                    torch.cuda.max_memory_allocated(self.device) / 2**30, 3
                )
            with self.path.open("a") as fh:  # opened per line: a crash loses nothing
                fh.write(json.dumps(line) + "\n")
        self._last = now
