"""Training options end to end on the tiny model: v-prediction and epsilon (auto and forced),
zero terminal SNR, latent caching, torch.compile, bf16 autocast, Adafactor with a cosine
schedule, and export formats."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import kubedream_trainer.losses as losses
import kubedream_trainer.trainee as trainee
from kubedream_trainer.latents import LatentCache

from .conftest import committed_steps, read_json, train, write_job

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("trainer_env")]


@pytest.fixture
def targets(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Prediction types the loss targets were computed for during the run."""
    seen: list[str] = []
    real = losses.training_target

    def spy(scheduler: Any, *args: Any) -> torch.Tensor:
        seen.append(scheduler.config["prediction_type"])
        return real(scheduler, *args)

    monkeypatch.setattr(losses, "training_target", spy)
    return seen


def test_sd2_trains_v_prediction_with_zero_terminal_snr(
    tmp_path: Path, data_root: Path, targets: list[str]
) -> None:
    output = tmp_path / "out"
    job = write_job(
        tmp_path / "job.yaml",
        data_root,
        output,
        model={"family": "sd2"},
        training={"maxSteps": 2, "zeroTerminalSnr": True, "minSnrGamma": 5.0},
    )
    assert train(job) == 0
    assert set(targets) == {"v_prediction"}
    folder = output / "checkpoints/step-2"
    manifest = read_json(folder / "checkpoint.json")
    assert (manifest["family"], manifest["predictionType"]) == ("sd2", "v_prediction")
    scheduler = read_json(folder / "scheduler/scheduler_config.json")
    assert scheduler["prediction_type"] == "v_prediction"
    assert scheduler["rescale_betas_zero_snr"] is True
    assert scheduler["timestep_spacing"] == "trailing"
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in load_file(
        folder / "model.safetensors"
    )

    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(folder)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a photo", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)


@pytest.mark.parametrize(("family", "forced"), [("sd1", "v_prediction"), ("sd2", "epsilon")])
def test_prediction_type_can_be_forced(
    tmp_path: Path, data_root: Path, targets: list[str], family: str, forced: str
) -> None:
    output = tmp_path / "out"
    job = write_job(
        tmp_path / "job.yaml",
        data_root,
        output,
        model={"family": family, "predictionType": forced},
        training={"maxSteps": 1},
        output={"formats": ["diffusers"]},
    )
    assert train(job) == 0
    assert set(targets) == {forced}
    folder = output / "checkpoints/step-1"
    assert read_json(folder / "scheduler/scheduler_config.json")["prediction_type"] == forced
    assert not (folder / "model.safetensors").exists()
    assert (folder / "training_state/trainer.pt").is_file()


def test_latents_are_encoded_once_per_image_and_flip(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    caches: list[LatentCache] = []

    class Recorded(LatentCache):
        def __init__(self) -> None:
            super().__init__()
            caches.append(self)

    monkeypatch.setattr(trainee, "LatentCache", Recorded)
    job = write_job(
        tmp_path / "job.yaml",
        data_root,
        tmp_path / "out",
        training={"maxSteps": 8, "cacheLatents": True},
    )  # 2 epochs of 8 images
    assert train(job) == 0
    assert len(caches) == 1
    assert (caches[0].misses, caches[0].hits, len(caches[0])) == (8, 8, 8)


def test_compile_with_the_eager_backend(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBEDREAM_COMPILE_BACKEND", "eager")
    output = tmp_path / "out"
    job = write_job(
        tmp_path / "job.yaml", data_root, output, training={"maxSteps": 2, "compile": True}
    )
    assert train(job) == 0
    keys = load_file(output / "checkpoints/step-2/training_state/unet.safetensors")
    assert not [k for k in keys if "_orig_mod" in k]


def test_bf16_autocast_on_cpu(tmp_path: Path, data_root: Path) -> None:
    output = tmp_path / "out"
    job = write_job(
        tmp_path / "job.yaml", data_root, output, training={"maxSteps": 2, "mixedPrecision": "bf16"}
    )
    assert train(job) == 0
    weights = load_file(output / "checkpoints/step-2/unet/diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in weights.values()} == {
        torch.float32
    }  # autocast computes in bf16, weights stay fp32
    assert read_json(output / "progress.json")["loss"] > 0


def test_adafactor_with_cosine_schedule_decays_to_zero(tmp_path: Path, data_root: Path) -> None:
    output = tmp_path / "out"
    job = write_job(
        tmp_path / "job.yaml",
        data_root,
        output,
        training={
            "maxSteps": 4,
            "optimizer": "adafactor",
            "lrScheduler": "cosine",
            "lrWarmupSteps": 1,
        },
    )
    assert train(job) == 0
    assert read_json(output / "progress.json")["learningRate"] == pytest.approx(0.0, abs=1e-12)
    assert committed_steps(output) == [4]


def test_gradient_checkpointing_reaches_a_trained_sd1_text_encoder() -> None:
    """transformers 5 warns on the old switch's name, and warnings fail the suite."""
    from kubedream_operator.spec import ModelSpec, TrainingSpec
    from kubedream_trainer.models import load_components
    from kubedream_trainer.tiny import tiny_model_dir

    components = load_components(tiny_model_dir("sd1"), ModelSpec(base="tiny"), False)
    spec = TrainingSpec.model_validate(
        {"maxSteps": 1, "gradientCheckpointing": True, "textEncoderLearningRate": 1e-5}
    )
    trainee.build(components, spec, torch.device("cpu"), total_steps=1, rank=0)
    encoder = components.text_encoder
    flag = "is_activation_checkpointing"
    assert getattr(encoder, flag if hasattr(encoder, flag) else "is_gradient_checkpointing")
    assert components.unet.is_gradient_checkpointing
