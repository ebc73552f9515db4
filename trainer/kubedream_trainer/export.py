"""Diffusers -> original Stable Diffusion ("LDM") single-file export.

Checkpoints carry a `model.safetensors` in the key layout of the original CompVis/Stability
repositories, which ComfyUI, AUTOMATIC1111 and `StableDiffusionPipeline.from_single_file`
read: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and
`cond_stage_model.transformer.*` (SD1, OpenAI CLIP) or `cond_stage_model.model.*` (SD2,
OpenCLIP); SDXL files hold `conditioner.embedders.0.transformer.*` (CLIP-L) and
`conditioner.embedders.1.model.*` (CLIP-G in OpenCLIP's layout, with its text projection)
and the UNet's `label_emb` (the size/pooled-text embedding). Modelled on diffusers'
`scripts/convert_diffusers_to_original_stable_diffusion.py` and
`convert_diffusers_to_original_sdxl.py`, but derived from the model configs instead of hard-coded SD1.5 block counts, so the tiny
models convert by the same code as the real ones.

Known difference from a file released by Stability: SD2's diffusers text encoder has already
dropped OpenCLIP's last layer and the text projection, so those keys are absent here (loaders
that read SD2 files, diffusers' included, do not need them).

Called by `checkpoint.stage_checkpoint`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

StateDict = dict[str, torch.Tensor]

_RESNET = [
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
]
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL's "text_time" embedding
    "add_embedding.linear_2": "label_emb.0.2",
}


def _rename_prefix(key: str, mapping: Mapping[str, str]) -> str | None:
    """Apply the longest matching diffusers-prefix -> LDM-prefix rule; None if none matches."""
    for old in sorted(mapping, key=len, reverse=True):
        if key == old or key.startswith(old + "."):
            return mapping[old] + key[len(old) :]
    return None


def unet_key_map(config: Mapping[str, Any]) -> dict[str, str]:
    """Diffusers UNet module prefixes -> LDM prefixes, for any number of blocks.

    LDM numbers `input_blocks` flat: conv_in, then per level `layers_per_block` resnet(+attention)
    entries and one downsampler; `output_blocks` hold `layers_per_block + 1` entries per level,
    the last carrying the upsampler at slot 1 (no attention) or 2 (after the attention).
    """
    layers = int(config["layers_per_block"])
    down_types: Sequence[str] = config["down_block_types"]
    up_types: Sequence[str] = config["up_block_types"]
    mapping = dict(_UNET_TOP)
    for i, block_type in enumerate(down_types):
        for j in range(layers):
            ldm = (layers + 1) * i + j + 1
            mapping[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{ldm}.0"
            if "CrossAttn" in block_type:
                mapping[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{ldm}.1"
        if i < len(down_types) - 1:
            mapping[f"down_blocks.{i}.downsamplers.0.conv"] = (
                f"input_blocks.{(layers + 1) * (i + 1)}.0.op"
            )
    for i, block_type in enumerate(up_types):
        has_attention = "CrossAttn" in block_type
        for j in range(layers + 1):
            ldm = (layers + 1) * i + j
            mapping[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{ldm}.0"
            if has_attention:
                mapping[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{ldm}.1"
        if i < len(up_types) - 1:
            slot = 2 if has_attention else 1
            mapping[f"up_blocks.{i}.upsamplers.0"] = (
                f"output_blocks.{(layers + 1) * i + layers}.{slot}"
            )
    mapping["mid_block.attentions.0"] = "middle_block.1"
    for j in range(2):
        mapping[f"mid_block.resnets.{j}"] = f"middle_block.{2 * j}"
    return mapping


def convert_unet(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> StateDict:
    """UNet2DConditionModel state dict -> `model.diffusion_model.*` keys."""
    mapping = unet_key_map(config)
    out: StateDict = {}
    for key, tensor in state.items():
        renamed = _rename_prefix(key, mapping)
        if renamed is None:
            raise ValueError(
                f"UNet key {key!r} has no original-layout equivalent (unsupported UNet variant)"
            )
        if ".resnets." in key:
            for new, old in _RESNET:
                renamed = renamed.replace(f".{new}.", f".{old}.")
        out["model.diffusion_model." + renamed] = tensor
    return out


def vae_key_map(config: Mapping[str, Any]) -> dict[str, str]:
    """Diffusers AutoencoderKL prefixes -> LDM prefixes. LDM numbers decoder levels bottom-up."""
    levels = len(config["down_block_types"])
    layers = int(config["layers_per_block"])
    mapping = {
        "encoder.conv_norm_out": "encoder.norm_out",
        "decoder.conv_norm_out": "decoder.norm_out",
    }
    for part in ("encoder", "decoder"):
        mapping[f"{part}.mid_block.attentions.0"] = f"{part}.mid.attn_1"
        for j in range(2):
            mapping[f"{part}.mid_block.resnets.{j}"] = f"{part}.mid.block_{j + 1}"
    for i in range(levels):
        for j in range(layers):
            mapping[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
        mapping[f"encoder.down_blocks.{i}.downsamplers.0"] = f"encoder.down.{i}.downsample"
        for j in range(layers + 1):
            mapping[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{levels - 1 - i}.block.{j}"
        mapping[f"decoder.up_blocks.{i}.upsamplers.0"] = f"decoder.up.{levels - 1 - i}.upsample"
    return mapping


_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def convert_vae(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> StateDict:
    """AutoencoderKL state dict -> `first_stage_model.*`; attention linears become 1x1 convs."""
    mapping = vae_key_map(config)
    out: StateDict = {}
    for key, tensor in state.items():
        renamed = _rename_prefix(key, mapping) or key
        renamed = renamed.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".mid.attn_1." in renamed:
            head, _, leaf = renamed.partition(".mid.attn_1.")
            module, _, param = leaf.rpartition(".")
            renamed = f"{head}.mid.attn_1.{_VAE_ATTENTION.get(module, module)}.{param}"
            if tensor.ndim == 2:
                tensor = tensor[:, :, None, None]
        out["first_stage_model." + renamed] = tensor
    return out


def convert_clip(
    state: Mapping[str, torch.Tensor], prefix: str = "cond_stage_model.transformer."
) -> StateDict:
    """OpenAI CLIPTextModel (SD1; SDXL's first encoder) -> `<prefix>text_model.*`."""
    out: StateDict = {}
    for key, tensor in state.items():
        if key.endswith("position_ids"):
            continue
        inner = key if key.startswith("text_model.") else "text_model." + key
        out[prefix + inner] = tensor
    return out


_OPENCLIP_LAYER = [
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
    ("self_attn.out_proj", "attn.out_proj"),
]


def convert_open_clip(
    state: Mapping[str, torch.Tensor], prefix: str = "cond_stage_model.model."
) -> StateDict:
    """OpenCLIP text encoder as diffusers stores it (SD2; SDXL's second encoder) ->
    `<prefix>*`, fusing q/k/v projections into `attn.in_proj_*` as OpenCLIP's
    MultiheadAttention holds them. A `CLIPTextModelWithProjection`'s projection becomes
    `text_projection`, transposed (OpenCLIP multiplies `x @ text_projection`)."""
    flat = {
        k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")
    }
    out: StateDict = {}
    top = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    for key, tensor in flat.items():
        if key in top:
            out[prefix + top[key]] = tensor
            continue
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T.contiguous()
            continue
        if not key.startswith("encoder.layers."):
            raise ValueError(f"text encoder key {key!r} has no OpenCLIP equivalent")
        index, _, rest = key.removeprefix("encoder.layers.").partition(".")
        block = f"{prefix}transformer.resblocks.{index}."
        if rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
            kind = rest.rpartition(".")[2]
            if rest.startswith("self_attn.q_proj."):
                parts = [flat[f"encoder.layers.{index}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                out[block + f"attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
            continue
        for new, old in _OPENCLIP_LAYER:
            if rest.startswith(new + "."):
                rest = old + rest[len(new) :]
                break
        out[block + rest] = tensor
    return out


def original_state_dict(
    unet: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module, family: str
) -> StateDict:
    """The whole pipeline in the original single-file layout (contiguous CPU tensors). For
    SDXL `text_encoder` is the `sdxl.SDXLTextEncoders` pair."""
    unet_config: Mapping[str, Any] = unet.config  # type: ignore[assignment]
    vae_config: Mapping[str, Any] = vae.config  # type: ignore[assignment]
    if family == "sdxl":
        first = text_encoder.get_submodule("text_encoder").state_dict()
        second = text_encoder.get_submodule("text_encoder_2").state_dict()
        text = {
            **convert_clip(first, "conditioner.embedders.0.transformer."),
            **convert_open_clip(second, "conditioner.embedders.1.model."),
        }
    elif family == "sd2":
        text = convert_open_clip(text_encoder.state_dict())
    else:
        text = convert_clip(text_encoder.state_dict())
    merged = {
        **convert_unet(unet.state_dict(), unet_config),
        **convert_vae(vae.state_dict(), vae_config),
        **text,
    }
    return {k: v.detach().to("cpu").contiguous() for k, v in merged.items()}


def save_single_file(state: StateDict, path: Path, metadata: Mapping[str, str]) -> None:
    """Write the state dict as one safetensors file with string metadata."""
    save_file(state, str(path), metadata=dict(metadata))
