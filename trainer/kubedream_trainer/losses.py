"""The diffusion training objective: noise, timesteps, targets and loss weighting.

Pure tensor functions, unit-tested on their own. Every random draw takes an explicit
`torch.Generator`, so the training loop owns its random streams and a resumed run draws
exactly what an uninterrupted one would have.

- Offset noise (Guttenberg 2023, "Diffusion with offset noise"): a per-image, per-channel
  constant added to the noise lets the model learn to shift overall brightness.
- Zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
  Flawed"): `models.load_components` builds the noise scheduler with diffusers'
  `rescale_zero_terminal_snr` applied to its betas; nothing here needs to change for it.
- Min-SNR-gamma weighting (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon prediction,
  min(SNR, gamma) / (SNR + 1) for v-prediction (the v-target's own SNR weighting is SNR + 1).
  SNR comes from `diffusers.training_utils.compute_snr`.

Called by `step`.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.training_utils import compute_snr


def sample_noise(latents: torch.Tensor, offset: float, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise shaped like `latents`, plus `offset` x a per-(image, channel) constant."""
    noise = torch.randn(
        latents.shape, generator=generator, device=latents.device, dtype=latents.dtype
    )
    if offset > 0:
        shift = torch.randn(
            (latents.shape[0], latents.shape[1], 1, 1),
            generator=generator,
            device=latents.device,
            dtype=latents.dtype,
        )
        noise = noise + offset * shift
    return noise


def sample_timesteps(
    batch_size: int, scheduler: DDPMScheduler, generator: torch.Generator
) -> torch.Tensor:
    """Uniform training timesteps in [0, num_train_timesteps), on the generator's device."""
    return torch.randint(
        0,
        scheduler.config["num_train_timesteps"],
        (batch_size,),
        generator=generator,
        device=generator.device,
        dtype=torch.long,
    )


def training_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity v = alpha*eps - sigma*x0."""
    prediction_type = scheduler.config["prediction_type"]
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        target: torch.Tensor = scheduler.get_velocity(
            latents, noise, cast(torch.IntTensor, timesteps)
        )
        return target
    raise ValueError(f"unsupported prediction type {prediction_type!r}")


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample Min-SNR-gamma loss weights.

    epsilon: min(SNR, gamma) / SNR, written as min(gamma / SNR, 1) so that SNR = 0 (the last
    timestep of a zero-terminal-SNR schedule) gets weight 1 (the limit) instead of 0/0.
    v_prediction: min(SNR, gamma) / (SNR + 1), finite everywhere.
    """
    if prediction_type == "epsilon":
        return (gamma / snr).clamp(max=1.0)
    if prediction_type == "v_prediction":
        return snr.clamp(max=gamma) / (snr + 1)
    raise ValueError(f"unsupported prediction type {prediction_type!r}")


def diffusion_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: DDPMScheduler,
    min_snr_gamma: float | None,
) -> torch.Tensor:
    """Mean squared error in fp32, per sample, weighted by Min-SNR when gamma is set."""
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(
        dim=(1, 2, 3)
    )
    if min_snr_gamma is not None:
        snr = compute_snr(scheduler, timesteps)
        per_sample = per_sample * min_snr_weights(
            snr, min_snr_gamma, scheduler.config["prediction_type"]
        )
    return per_sample.mean()
