"""Tiny models built in code, and loading a model folder: family, prediction type, schedulers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kubedream_operator.spec import ModelSpec
from kubedream_trainer.errors import JobError
from kubedream_trainer.models import (
    detect_family,
    inference_scheduler_config,
    load_components,
    resolve_model_dir,
)
from kubedream_trainer.tiny import tiny_model_dir

pytestmark = pytest.mark.usefixtures("trainer_env")


def test_tiny_models_are_deterministic_and_cached(tmp_path: Path) -> None:
    first = tiny_model_dir("sd1", cache_dir=tmp_path / "a")
    second = tiny_model_dir("sd1", cache_dir=tmp_path / "b")
    weights = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(first / weights), load_file(second / weights)
    assert all(torch.equal(a[k], b[k]) for k in a)
    built = (first / weights).stat().st_mtime_ns
    assert tiny_model_dir("sd1", cache_dir=tmp_path / "a") == first
    assert (first / weights).stat().st_mtime_ns == built
    assert (first / "tokenizer/vocab.json").is_file()
    assert (first / "tokenizer/merges.txt").read_text().startswith("#version")
    assert [p.name for p in (tmp_path / "a/tiny").iterdir()] == [
        first.name
    ]  # no staging left behind


def test_tiny_families_look_like_the_real_ones() -> None:
    sd1, sd2 = tiny_model_dir("sd1"), tiny_model_dir("sd2")
    assert (detect_family(sd1), detect_family(sd2)) == ("sd1", "sd2")
    assert resolve_model_dir("tiny", family="sd2") == sd2
    assert resolve_model_dir("tiny") == sd1
    assert json.loads((sd2 / "unet/config.json").read_text())["use_linear_projection"] is True


def test_components_detect_family_and_prediction_type() -> None:
    components = load_components(
        tiny_model_dir("sd2"), ModelSpec(base="tiny"), zero_terminal_snr=True
    )
    assert (components.family, components.prediction_type) == ("sd2", "v_prediction")
    assert components.noise_scheduler.config["prediction_type"] == "v_prediction"
    assert components.noise_scheduler.alphas_cumprod[-1].item() == 0.0
    forced = load_components(
        tiny_model_dir("sd1"), ModelSpec(base="tiny", prediction_type="v_prediction"), False
    )
    assert forced.prediction_type == "v_prediction"
    assert forced.inference_scheduler_config["prediction_type"] == "v_prediction"
    tokens = forced.tokenizer(
        ["the"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    hidden = forced.text_encoder(tokens).last_hidden_state
    assert hidden.shape == (1, 77, 32)


def test_zero_terminal_snr_inference_scheduler() -> None:
    pndm = {
        "_class_name": "PNDMScheduler",
        "beta_schedule": "scaled_linear",
        "skip_prk_steps": True,
    }
    config = inference_scheduler_config(pndm, "v_prediction", zero_terminal_snr=True)
    assert config["_class_name"] == "DDIMScheduler"  # PNDM cannot rescale its betas
    assert (config["rescale_betas_zero_snr"], config["timestep_spacing"]) == (True, "trailing")
    ddim = inference_scheduler_config(
        {"_class_name": "DDIMScheduler"}, "epsilon", zero_terminal_snr=False
    )
    assert ddim == {"_class_name": "DDIMScheduler", "prediction_type": "epsilon"}


def test_an_sdxl_folder_is_detected_and_a_wrong_family_refused(tmp_path: Path) -> None:
    folder = tmp_path / "sdxl"
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (folder / name).mkdir(parents=True)
    (folder / "model_index.json").write_text(
        json.dumps({"text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]})
    )
    (folder / "scheduler/scheduler_config.json").write_text("{}")
    with pytest.raises(JobError, match=r"lacks the folder\(s\) text_encoder_2, tokenizer_2"):
        resolve_model_dir(str(folder))
    for name in ("text_encoder_2", "tokenizer_2"):
        (folder / name).mkdir()
    assert resolve_model_dir(str(folder)) == folder
    assert detect_family(folder) == "sdxl"
    with pytest.raises(JobError, match=r"spec\.model\.family: sd1 does not fit"):
        load_components(folder, ModelSpec(base=str(folder), family="sd1"), False)
