"""The diffusers -> original single-file conversion, checked against the key names of real
SD checkpoints and round-tripped through diffusers' own single-file conversion functions."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from kubedream_trainer import export

# Stable Diffusion 1.5's block layout with tiny channels: what the real converter must handle.
SD15_UNET: dict[str, Any] = {
    "sample_size": 8,
    "layers_per_block": 2,
    "block_out_channels": [32, 32, 64, 64],
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
    "cross_attention_dim": 16,
    "attention_head_dim": 2,
    "norm_num_groups": 8,
}
SD_VAE: dict[str, Any] = {
    "block_out_channels": [8, 16, 16, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "norm_num_groups": 8,
    "latent_channels": 4,
}


def _assert_same(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), key


def test_unet_keys_follow_the_sd15_layout() -> None:
    mapping = export.unet_key_map(SD15_UNET)
    expected = {
        "conv_in": "input_blocks.0.0",
        "down_blocks.0.resnets.1": "input_blocks.2.0",
        "down_blocks.0.attentions.1": "input_blocks.2.1",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "down_blocks.1.attentions.0": "input_blocks.4.1",
        "down_blocks.2.downsamplers.0.conv": "input_blocks.9.0.op",
        "down_blocks.3.resnets.1": "input_blocks.11.0",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
        "up_blocks.0.resnets.2": "output_blocks.2.0",
        "up_blocks.0.upsamplers.0": "output_blocks.2.1",
        "up_blocks.1.attentions.0": "output_blocks.3.1",
        "up_blocks.1.upsamplers.0": "output_blocks.5.2",
        "up_blocks.2.upsamplers.0": "output_blocks.8.2",
        "up_blocks.3.attentions.2": "output_blocks.11.1",
        "conv_out": "out.2",
    }
    assert {k: mapping[k] for k in expected} == expected
    assert "down_blocks.3.downsamplers.0.conv" not in mapping
    assert "up_blocks.3.upsamplers.0" not in mapping


def test_unet_round_trips_through_diffusers_converter() -> None:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    original = export.convert_unet(unet.state_dict(), unet.config)
    assert (
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight" in original
    )  # SD1 marker key
    assert "model.diffusion_model.input_blocks.1.0.in_layers.2.weight" in original
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in original
    _assert_same(unet.state_dict(), convert_ldm_unet_checkpoint(original, dict(unet.config)))


def test_vae_round_trips_and_attention_becomes_1x1_convs() -> None:
    torch.manual_seed(0)
    vae = AutoencoderKL(**SD_VAE)
    original = export.convert_vae(vae.state_dict(), vae.config)
    assert original["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (16, 16, 1, 1)
    assert "first_stage_model.encoder.down.0.downsample.conv.weight" in original
    assert (
        "first_stage_model.decoder.up.3.block.2.conv1.weight" in original
    )  # decoder levels count bottom-up
    assert "first_stage_model.decoder.up.1.upsample.conv.weight" in original
    assert "first_stage_model.encoder.norm_out.weight" in original
    _assert_same(vae.state_dict(), convert_ldm_vae_checkpoint(original, dict(vae.config)))


def _text_encoder(hidden_act: str) -> CLIPTextModel:
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
    )
    return CLIPTextModel(config)


def test_openai_clip_round_trips() -> None:
    model = _text_encoder("quick_gelu")
    original = export.convert_clip(model.state_dict())
    assert (
        "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight"
        in original
    )
    back = {
        k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(original).items()
    }
    _assert_same(model.state_dict(), back)


def test_open_clip_round_trips_with_fused_attention() -> None:
    model = _text_encoder("gelu")
    original = export.convert_open_clip(model.state_dict())
    fused = original["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"]
    assert fused.shape == (96, 32)
    assert "cond_stage_model.model.positional_embedding" in original
    assert "cond_stage_model.model.ln_final.weight" in original
    back = {
        k.removeprefix("text_model."): v
        for k, v in convert_open_clip_checkpoint(model, original).items()
    }
    _assert_same(model.state_dict(), back)


@pytest.mark.usefixtures("trainer_env")
def test_tiny_sd2_single_file_loads_with_from_single_file(tmp_path: Any) -> None:
    from diffusers import StableDiffusionPipeline

    from kubedream_trainer.tiny import tiny_model_dir

    folder = tiny_model_dir("sd2")
    pipeline = StableDiffusionPipeline.from_pretrained(folder)
    state = export.original_state_dict(pipeline.unet, pipeline.vae, pipeline.text_encoder, "sd2")
    path = tmp_path / "model.safetensors"
    export.save_single_file(state, path, {"format": "pt"})
    assert "cond_stage_model.model.token_embedding.weight" in load_file(path)
    loaded = StableDiffusionPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True
    )
    for name in ("unet", "vae", "text_encoder"):
        _assert_same(getattr(pipeline, name).state_dict(), getattr(loaded, name).state_dict())
    assert loaded.scheduler.config.prediction_type == "v_prediction"
