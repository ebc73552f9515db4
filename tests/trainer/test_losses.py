"""The diffusion objective's math: Min-SNR weights in both forms, zero terminal SNR, offset
noise, v-prediction targets and the loss reduction."""

from __future__ import annotations

import pytest
import torch
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.training_utils import compute_snr

from kubedream_trainer import losses

SD_SCHEDULE = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}


def _scheduler(prediction_type: str = "epsilon", zero_terminal_snr: bool = False) -> DDPMScheduler:
    return DDPMScheduler(
        **SD_SCHEDULE, prediction_type=prediction_type, rescale_betas_zero_snr=zero_terminal_snr
    )


def test_min_snr_epsilon_is_min_snr_gamma_over_snr() -> None:
    snr = torch.tensor([0.01, 1.0, 5.0, 20.0, 400.0])
    weights = losses.min_snr_weights(snr, 5.0, "epsilon")
    expected = torch.minimum(snr, torch.tensor(5.0)) / snr
    torch.testing.assert_close(weights, expected)
    assert weights.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.25, 0.0125])


def test_min_snr_v_prediction_divides_by_snr_plus_one() -> None:
    snr = torch.tensor([0.0, 1.0, 5.0, 20.0])
    weights = losses.min_snr_weights(snr, 5.0, "v_prediction")
    torch.testing.assert_close(weights, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))
    assert weights.tolist() == pytest.approx([0.0, 0.5, 5 / 6, 5 / 21])


def test_min_snr_epsilon_at_zero_snr_takes_the_limit_not_nan() -> None:
    weights = losses.min_snr_weights(torch.tensor([0.0, 1e-12]), 5.0, "epsilon")
    assert weights.tolist() == [1.0, 1.0]


def test_min_snr_rejects_unknown_prediction_type() -> None:
    with pytest.raises(ValueError, match="sample"):
        losses.min_snr_weights(torch.ones(1), 5.0, "sample")


def test_zero_terminal_snr_rescales_the_schedule() -> None:
    plain, rescaled = _scheduler(), _scheduler(zero_terminal_snr=True)
    last = torch.tensor([999])
    assert compute_snr(plain, last).item() > 1e-3
    assert compute_snr(rescaled, last).item() == 0.0
    # Lin et al. keep the first timestep's SNR and shift the rest: still decreasing.
    snr = compute_snr(rescaled, torch.arange(1000))
    assert torch.all(snr[1:] <= snr[:-1])
    torch.testing.assert_close(snr[0], compute_snr(plain, torch.tensor([0]))[0], rtol=1e-4, atol=0)


def test_zero_terminal_snr_loss_stays_finite_with_min_snr_in_both_forms() -> None:
    for prediction_type in ("epsilon", "v_prediction"):
        scheduler = _scheduler(prediction_type, zero_terminal_snr=True)
        timesteps = torch.tensor([0, 500, 999, 999])
        prediction, target = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
        loss = losses.diffusion_loss(prediction, target, timesteps, scheduler, 5.0)
        assert torch.isfinite(loss), prediction_type


def test_offset_noise_adds_a_per_image_per_channel_constant() -> None:
    latents = torch.zeros(3, 4, 16, 16)
    plain = losses.sample_noise(latents, 0.0, torch.Generator().manual_seed(1))
    offset = losses.sample_noise(latents, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(
        plain, torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    )
    difference = offset - plain
    # Constant over each (image, channel) plane, and different between planes.
    assert torch.allclose(difference, difference[:, :, :1, :1].expand_as(difference))
    assert difference[:, :, 0, 0].unique().numel() == 12
    shift = torch.Generator().manual_seed(1)
    torch.randn(latents.shape, generator=shift)
    torch.testing.assert_close(difference[:, :, 0, 0], 0.5 * torch.randn(3, 4, generator=shift))


def test_timesteps_cover_the_training_range_and_follow_the_generator() -> None:
    scheduler = _scheduler()
    first = losses.sample_timesteps(4096, scheduler, torch.Generator().manual_seed(3))
    again = losses.sample_timesteps(4096, scheduler, torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert first.dtype == torch.long
    assert 0 <= first.min().item() < 10
    assert 990 <= first.max().item() <= 999


def test_targets_epsilon_is_noise_and_v_is_alpha_noise_minus_sigma_x0() -> None:
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([10, 900])
    assert losses.training_target(_scheduler("epsilon"), latents, noise, timesteps) is noise
    scheduler = _scheduler("v_prediction")
    alpha_bar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    torch.testing.assert_close(
        losses.training_target(scheduler, latents, noise, timesteps), expected
    )


def test_loss_without_gamma_is_plain_mse_and_with_gamma_is_weighted() -> None:
    scheduler = _scheduler()
    prediction, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    timesteps = torch.tensor([5, 400, 950])
    plain = losses.diffusion_loss(prediction, target, timesteps, scheduler, None)
    torch.testing.assert_close(plain, torch.nn.functional.mse_loss(prediction, target))
    per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    weights = (5.0 / compute_snr(scheduler, timesteps)).clamp(max=1)
    torch.testing.assert_close(
        losses.diffusion_loss(prediction, target, timesteps, scheduler, 5.0),
        (per_sample * weights).mean(),
    )
