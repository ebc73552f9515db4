"""Gradient accumulation averages: a group of micro-batches [b, b] leaves the same gradients
for the optimizer as the single micro-batch [b] (same noise), not twice them."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kubedream_operator.spec import ModelSpec, TrainingSpec
from kubedream_trainer import step as step_module
from kubedream_trainer import trainee as trainee_module
from kubedream_trainer.data.loader import Batch

pytestmark = pytest.mark.usefixtures("trainer_env")


def _grads_before_update(micro_batches: list[Batch]) -> dict[str, torch.Tensor]:
    """Run the real `optimizer_step` on a fresh tiny sd1 trainee; the UNet's gradients as the
    optimizer would see them (its `step` records them and changes nothing)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from kubedream_trainer.models import load_components
    from kubedream_trainer.tiny import tiny_model_dir

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    components = load_components(tiny_model_dir("sd1"), ModelSpec(base="tiny"), False)
    # No clipping: the optimizer sees the accumulated gradients as they are.
    spec = TrainingSpec.model_validate({"maxSteps": 1, "maxGradNorm": None, "seed": 7})
    trainee = trainee_module.build(components, spec, torch.device("cpu"), total_steps=1, rank=0)

    # Every micro-batch draws the same noise, timesteps and latents (and any dropout): the
    # step reseeds per micro-batch slot, so pin the slot to 0.
    def same_noise(step: int, micro_batch: int) -> None:
        torch.manual_seed(1234)
        trainee.generator.manual_seed(4321)

    trainee.reseed_noise = same_noise  # type: ignore[method-assign]
    seen: dict[str, torch.Tensor] = {}

    def record(*args: Any, **kwargs: Any) -> None:
        for name, param in components.unet.named_parameters():
            if param.grad is not None:
                seen[name] = param.grad.detach().clone()

    trainee.optimizer.step = record  # type: ignore[method-assign]
    # The real schedule warns when the optimizer's step is replaced; nothing updates here.
    trainee.lr_scheduler = SimpleNamespace(step=lambda: None)  # type: ignore[assignment]
    step_module.optimizer_step(trainee, micro_batches, spec, accelerator, step=0)
    assert seen, "the optimizer saw no gradients"
    return seen


def test_accumulated_gradients_are_the_mean_of_the_micro_batches() -> None:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand((2, 3, 64, 64), generator=generator) * 2 - 1
    batch = Batch(
        pixel_values=pixels,
        captions=["a photo of a cat", "a photo of a dog"],
        indices=[0, 1],
        flipped=[False, False],
    )
    single = _grads_before_update([batch])
    doubled = _grads_before_update([batch, batch])
    assert single.keys() == doubled.keys()
    scale = max(g.abs().max().item() for g in single.values())
    assert scale > 0
    worst, where = max(((single[k] - doubled[k]).abs().max().item(), k) for k in single)
    assert worst <= 1e-5 * scale + 1e-8, f"{where}: differs by {worst:.3g} (scale {scale:.3g})"


def test_a_step_the_grad_scaler_skips_leaves_ema_and_schedule_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """fp16: when the scaler skips a step (inf gradients), the weights do not move, so the
    EMA must not decay towards them nor count the step, and the LR schedule stays put."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from kubedream_trainer.models import load_components
    from kubedream_trainer.tiny import tiny_model_dir

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)
    components = load_components(tiny_model_dir("sd1"), ModelSpec(base="tiny"), False)
    spec = TrainingSpec.model_validate({"maxSteps": 2, "ema": {"decay": 0.5}, "seed": 7})
    trainee = trainee_module.build(components, spec, torch.device("cpu"), total_steps=2, rank=0)
    assert trainee.ema is not None
    batch = Batch(
        pixel_values=torch.zeros((1, 3, 64, 64)),
        captions=["a cat"],
        indices=[0],
        flipped=[False],
    )
    shadow = [t.clone() for t in trainee.ema.shadow_params]
    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(lambda self: True))
    real_step = trainee.optimizer.step
    trainee.optimizer.step = lambda *a, **k: None  # type: ignore[method-assign]
    last_epoch = trainee.lr_scheduler.last_epoch
    step_module.optimizer_step(trainee, [batch], spec, accelerator, step=0)
    assert trainee.ema.optimization_step == 0
    assert all(torch.equal(a, b) for a, b in zip(shadow, trainee.ema.shadow_params, strict=True))
    assert trainee.lr_scheduler.last_epoch == last_epoch
    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(lambda self: False))
    trainee.optimizer.step = real_step  # type: ignore[method-assign]
    step_module.optimizer_step(trainee, [batch], spec, accelerator, step=1)
    assert trainee.ema.optimization_step == 1
