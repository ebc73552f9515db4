"""Optimizer and learning-rate schedule from `spec.training`.

One parameter group per trained network, each with its own peak learning rate, so the UNet
and the text encoder can train at different rates (EveryDream's usual setup). The schedule is
diffusers' `get_scheduler` (a LambdaLR): its state is just the step count, which the
checkpoint saves. Called by `loop`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from diffusers.optimization import get_scheduler
from torch.optim.lr_scheduler import LRScheduler

from kubedream_operator.spec import TrainingSpec

from .errors import JobError


def param_groups(
    spec: TrainingSpec,
    unet_params: Iterable[torch.nn.Parameter],
    text_encoder_params: Iterable[torch.nn.Parameter] | None,
) -> list[dict[str, Any]]:
    """[UNet group, text encoder group (only when it trains)], each with its peak rate."""
    groups: list[dict[str, Any]] = [
        {"params": list(unet_params), "lr": spec.unet_learning_rate, "name": "unet"}
    ]
    if text_encoder_params is not None:
        groups.append(
            {
                "params": list(text_encoder_params),
                "lr": spec.text_encoder_learning_rate,
                "name": "text_encoder",
            }
        )
    return groups


def build_optimizer(
    spec: TrainingSpec, groups: list[dict[str, Any]], device: torch.device
) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA), 8-bit AdamW (bitsandbytes) or Adafactor with a fixed rate."""
    lr = spec.unet_learning_rate
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(
            groups, lr=lr, weight_decay=spec.weight_decay, fused=device.type == "cuda"
        )
    if spec.optimizer == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise JobError(
                "spec.training.optimizer: adamw8bit needs the bitsandbytes package (and a CUDA GPU); "
                "install it in the trainer image or use adamw"
            ) from None
        if device.type != "cuda":
            raise JobError("spec.training.optimizer: adamw8bit needs a CUDA GPU; use adamw on CPU")
        optimizer: torch.optim.Optimizer = bitsandbytes.optim.AdamW8bit(
            groups, lr=lr, weight_decay=spec.weight_decay
        )
        return optimizer
    if spec.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # Fixed learning rates (no relative step) so the spec's rates and schedule apply.
        return Adafactor(
            groups,
            lr=lr,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
            weight_decay=spec.weight_decay,
        )
    raise JobError(f"spec.training.optimizer: unknown optimizer {spec.optimizer!r}")


def build_lr_scheduler(
    spec: TrainingSpec, optimizer: torch.optim.Optimizer, total_steps: int
) -> LRScheduler:
    """Warmup then constant, cosine or linear decay to zero at `total_steps`."""
    name: str = spec.lr_scheduler
    if name == "constant" and spec.lr_warmup_steps > 0:
        name = "constant_with_warmup"
    scheduler: LRScheduler = get_scheduler(
        name,
        optimizer=optimizer,
        num_warmup_steps=spec.lr_warmup_steps,
        num_training_steps=total_steps,
    )
    return scheduler
