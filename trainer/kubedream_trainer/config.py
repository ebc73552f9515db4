"""Trainer settings that are not in the FineTuneJob spec, and values derived from the spec.

The spec is the one configuration language; what remains here is environment (where to
stage files, how long an output lease lasts) and pure derivations (the resolved precision,
the spec hash recorded in every checkpoint). Read once by `train_cli` and passed down.

Environment variables:
  KUBEDREAM_STAGING_DIR    local folder for staging checkpoints before upload (default: TMPDIR)
  KUBEDREAM_LEASE_TTL      seconds an output lease lives without renewal (default 60)
  KUBEDREAM_LEASE_WAIT     seconds to wait for another trainer's lease to lapse (default: TTL + 5)
  KUBEDREAM_COMPILE_BACKEND  torch.compile backend for `compile: true` (default inductor)
  KUBEDREAM_CACHE_DIR      where tiny models are built (see `tiny.default_cache_dir`)
  KUBEDREAM_METRICS_FILE   local JSONL file for per-step timings (see `metrics`; default: none)
  KUBEDREAM_CHANNELS_LAST  UNet weights in channels-last layout: auto (CUDA only), on, off
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from kubedream_operator.spec import FineTuneJobSpec

from .errors import JobError

Precision = Literal["no", "fp16", "bf16"]


@dataclass(frozen=True)
class TrainerEnv:
    """Settings from the environment, with defaults for a laptop."""

    staging_dir: Path | None = None
    """Where checkpoints are assembled before upload; None uses the system temp folder."""
    lease_ttl_s: float = 60.0
    """An output lease not renewed for this long is considered abandoned."""
    lease_wait_s: float = 65.0
    """How long a new trainer waits for a foreign lease to lapse before giving up."""
    compile_backend: str = "inductor"
    """torch.compile backend (`eager` or `aot_eager` skip code generation: tests, debugging)."""
    metrics_file: Path | None = None
    """Local JSONL file that gets one line of timings per step (rank 0); None writes none."""
    channels_last: Literal["auto", "on", "off"] = "auto"
    """UNet weights in channels-last (NHWC) layout, which tensor-core convolutions prefer;
    `auto` uses it on CUDA only."""

    def channels_last_on(self, device: torch.device) -> bool:
        """Whether the UNet trains in channels-last layout on `device`."""
        return self.channels_last == "on" or (
            self.channels_last == "auto" and device.type == "cuda"
        )

    @classmethod
    def from_environ(cls, environ: dict[str, str] | None = None) -> TrainerEnv:
        env = dict(os.environ if environ is None else environ)

        def number(name: str, default: float) -> float:
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            try:
                value = float(raw)
            except ValueError:
                raise JobError(
                    f"environment variable {name}: must be a number, got {raw!r}"
                ) from None
            if value < 0:
                raise JobError(f"environment variable {name}: must be >= 0, got {raw!r}")
            return value

        ttl = number("KUBEDREAM_LEASE_TTL", cls.lease_ttl_s)
        staging = env.get("KUBEDREAM_STAGING_DIR")
        layout = env.get("KUBEDREAM_CHANNELS_LAST") or "auto"
        if layout not in ("auto", "on", "off"):
            raise JobError(
                f"environment variable KUBEDREAM_CHANNELS_LAST: auto, on or off, got {layout!r}"
            )
        return cls(
            staging_dir=Path(staging) if staging else None,
            lease_ttl_s=ttl,
            lease_wait_s=number("KUBEDREAM_LEASE_WAIT", ttl + 5),
            compile_backend=env.get("KUBEDREAM_COMPILE_BACKEND") or cls.compile_backend,
            metrics_file=Path(env["KUBEDREAM_METRICS_FILE"])
            if env.get("KUBEDREAM_METRICS_FILE")
            else None,
            channels_last=layout,  # type: ignore[arg-type]
        )


def spec_hash(spec: FineTuneJobSpec) -> str:
    """sha256 of the spec with defaults filled in, as recorded in checkpoints."""
    blob = json.dumps(spec.model_dump(mode="json", by_alias=True), sort_keys=True)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def resolve_precision(setting: str, device: torch.device) -> Precision:
    """`auto` becomes bf16 on GPUs that support it, fp16 on older GPUs, fp32 ("no") on CPU."""
    if setting == "auto":
        if device.type != "cuda":
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if setting == "fp16" and device.type == "cpu":
        raise JobError(
            "spec.training.mixedPrecision: fp16 needs a GPU; use bf16, no or auto on CPU"
        )
    if setting not in ("no", "fp16", "bf16"):
        raise JobError(f"spec.training.mixedPrecision: unknown value {setting!r}")
    return setting  # type: ignore[return-value]


def resolve_device(requested: str | None) -> torch.device:
    """The `--device` argument checked against what this machine has."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise JobError(
            f"--device: not a torch device, got {requested!r} (try cpu or cuda)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise JobError(f"--device {requested}: no CUDA GPU is available here (use --device cpu)")
    if device.type not in ("cpu", "cuda"):
        raise JobError(f"--device {requested}: only cpu and cuda are supported")
    return device
