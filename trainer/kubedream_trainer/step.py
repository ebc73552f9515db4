"""One training step: micro-batches forward and backward, then one optimizer update.

`optimizer_step` trains on a group of `gradientAccumulation` micro-batches: each one's loss
is divided by the group's size before backward, so the update sees the mean gradient; DDP
syncs gradients only on the group's last micro-batch (`accelerator.no_sync`). A non-finite
loss, or gradient norm (outside fp16, whose scaler skips such steps), raises `DivergedError`
before any weight changes.

The step waits for the device once: loss and gradient norm are copied to the host together
after the last backward, so the host keeps queueing kernels through the forward and backward
passes instead of stalling after each micro-batch's forward. Called by `loop`.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import cast

import torch
from accelerate import Accelerator

from kubedream_operator.spec import TrainingSpec

from . import latents, losses, sdxl
from .data.loader import Batch
from .errors import DivergedError
from .models import Components, encode_prompt
from .sharding import full_tensor
from .trainee import Trainee


@dataclass
class StepResult:
    """What one optimizer step did."""

    loss: float
    """Mean loss over the group's micro-batches (and ranks)."""
    images: int
    """Images trained in this step on this rank."""
    seconds: float = 0.0
    """Host wall time of the step, up to its one device sync (about the device's step time
    once the host runs ahead)."""
    data_wait_s: float = 0.0
    """Seconds the loader kept this step waiting for its micro-batches."""


def micro_batch_loss(
    trainee: Trainee,
    pixel_values: torch.Tensor,
    captions: list[str],
    cache_keys: list[tuple[int, bool]],
    spec: TrainingSpec,
    accelerator: Accelerator,
    size_conditioning: tuple[list[sdxl.Size], list[sdxl.Size]] | None = None,
) -> torch.Tensor:
    """The diffusion loss of one micro-batch (not yet backpropagated). SDXL conditions on
    `size_conditioning` = (original sizes, crop top-lefts); without it each image counts as
    uncropped at the trained size."""
    components: Components = trainee.components
    generator = trainee.generator
    scheduler = components.noise_scheduler
    # The pixels go to the device inside `latents.encode`: all of them without a latent cache
    # (asynchronously from the loader's page-locked batches), only the missing ones with it.
    clean = latents.encode(
        components.vae, pixel_values, generator, trainee.latent_cache, cache_keys
    )
    noise = losses.sample_noise(clean, spec.offset_noise, generator)
    timesteps = losses.sample_timesteps(clean.shape[0], scheduler, generator)
    noisy = scheduler.add_noise(clean, noise, cast(torch.IntTensor, timesteps))
    target = losses.training_target(scheduler, clean, noise, timesteps)
    add_time_ids = None
    if components.family == "sdxl":
        target_size = (pixel_values.shape[-2], pixel_values.shape[-1])
        originals, crops = size_conditioning or (
            [target_size] * len(captions),
            [(0, 0)] * len(captions),
        )
        add_time_ids = sdxl.time_ids(originals, crops, target_size)
    with accelerator.autocast():
        with torch.set_grad_enabled(trainee.text_encoder_trains):
            conditioning = encode_prompt(
                components, captions, accelerator.device, trainee.text_encoder, add_time_ids
            )
        prediction = trainee.unet(
            noisy, timesteps, conditioning.encoder_hidden_states, **conditioning.unet_kwargs
        ).sample
    return losses.diffusion_loss(prediction, target, timesteps, scheduler, spec.min_snr_gamma)


def optimizer_step(
    trainee: Trainee,
    micro_batches: list[Batch],
    spec: TrainingSpec,
    accelerator: Accelerator,
    step: int,
) -> StepResult:
    """Accumulate gradients over `micro_batches`, clip, update, advance the schedule and EMA."""
    started = time.perf_counter()
    total = torch.zeros((), device=accelerator.device)
    images = 0
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        trainee.reseed_noise(step, i)
        with nullcontext() if last else trainee.no_sync(accelerator):
            loss = micro_batch_loss(
                trainee,
                batch.pixel_values,
                batch.captions,
                list(zip(batch.indices, batch.flipped, strict=True)),
                spec,
                accelerator,
                (batch.original_sizes, batch.crop_coords) if batch.original_sizes else None,
            )
            checked = (
                accelerator.reduce(loss.detach(), "mean")
                if accelerator.num_processes > 1
                else loss.detach()
            )
            accelerator.backward(loss / len(micro_batches))
        total += checked
        images += len(batch.captions)
    mean = total / len(micro_batches)
    watched = [mean]
    if spec.max_grad_norm is not None:
        norm = accelerator.clip_grad_norm_(trainee.trainable_parameters(), spec.max_grad_norm)
        if norm is not None:  # FSDP: a DTensor, the whole norm once made full
            watched.append(full_tensor(torch.as_tensor(norm)).to(mean))
    # The step's one device-to-host copy; nothing has touched a weight yet.
    values = torch.stack(watched).tolist()
    if not math.isfinite(values[0]):
        raise DivergedError(
            f"the loss is {values[0]} at step {step + 1}: training diverged. Lower "
            "spec.training.unetLearningRate (or textEncoderLearningRate), keep maxGradNorm set, "
            "or use mixedPrecision bf16 instead of fp16"
        )
    # fp16's grad scaler skips such a step by itself; otherwise it would poison the weights.
    if len(values) > 1 and accelerator.scaler is None and not math.isfinite(values[1]):
        raise DivergedError(
            f"the gradient norm is {values[1]} at step {step + 1}: training diverged. Lower "
            "spec.training.unetLearningRate (or textEncoderLearningRate)"
        )
    trainee.optimizer.step()
    skipped = accelerator.optimizer_step_was_skipped  # fp16: the scaler found inf gradients
    if not skipped:
        trainee.lr_scheduler.step()
    trainee.optimizer.zero_grad(set_to_none=True)
    if trainee.ema is not None and not skipped:  # the weights did not move: neither does EMA
        trainee.ema.step(trainee.components.unet.parameters())
    return StepResult(
        loss=values[0],
        images=images,
        seconds=time.perf_counter() - started,
        data_wait_s=sum(batch.wait_s for batch in micro_batches),
    )
