"""Tiny Stable-Diffusion-shaped models built in code, for demos and tests.

`spec.model.base: tiny` selects a pipeline with the real SD architecture (UNet2DConditionModel
with cross-attention, AutoencoderKL with 8x downsampling, CLIPTextModel, CLIPTokenizer) but a
few hundred thousand parameters; `tiny-sdxl` one with SDXL's (two text encoders, CLIP-L-like
and a CLIP-G-like `CLIPTextModelWithProjection`, pooled-text and size/crop "text_time"
conditioning, no attention in the first level, several transformer layers per block), so a training run takes seconds on a CPU and nothing is
downloaded. The pipeline is saved once as an ordinary diffusers folder in a cache directory
keyed by a hash of its configs, so `models.load_components` serves tiny and real models through
the same `from_pretrained` path. Weights are drawn from a fixed seed: every machine builds
the same tiny model.

Called by `models.resolve_model_dir`; tests call `tiny_model_dir` directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch

TinyFamily = Literal["sd1", "sd2", "sdxl"]

TINY_SEED = 1234
"""Seed of the tiny weights. Changing it changes the cache key."""

_FORMAT_VERSION = 1
"""Bump when the folder layout written here changes (it is part of the cache key)."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable character."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def tokenizer_files() -> tuple[dict[str, int], list[str]]:
    """A minimal CLIP BPE vocabulary (every byte, alone and word-final) and a few merges."""
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges = ["t h", "a n", "th e</w>", "o f</w>"]
    tokens += [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def tiny_configs(family: TinyFamily = "sd1") -> dict[str, dict[str, Any]]:
    """Configs of every component. SD2 differs the way the real one does: OpenCLIP's GELU,
    linear attention projections, per-block head counts and v-prediction; SDXL as in
    `tiny_sdxl_configs`."""
    if family == "sdxl":
        return tiny_sdxl_configs()
    vocab, _ = tokenizer_files()
    sd2 = family == "sd2"
    eot = vocab["<|endoftext|>"]
    unet = {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": [32, 64, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 32,
        "attention_head_dim": [2, 4, 4] if sd2 else 4,
        "use_linear_projection": sd2,
        "norm_num_groups": 32,
    }
    vae = {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": [8, 16, 16, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": 64,
        "scaling_factor": 0.18215,
    }
    text_encoder = {
        "vocab_size": len(vocab),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "gelu" if sd2 else "quick_gelu",
        "projection_dim": 32,
        "bos_token_id": vocab["<|startoftext|>"],
        "eos_token_id": eot,
        "pad_token_id": eot,
    }
    scheduler = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": "v_prediction" if sd2 else "epsilon",
    }
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": scheduler}


def tiny_sdxl_configs() -> dict[str, dict[str, Any]]:
    """SDXL's shape in miniature (stabilityai/stable-diffusion-xl-base-1.0's configs, scaled
    down): the UNet's cross-attention width is the two encoders' hidden sizes concatenated
    (32 + 48), and its "text_time" embedding takes 6 time ids x `addition_time_embed_dim`
    plus the second encoder's pooled projection (6 * 8 + 40 = 88). The encoders' widths
    differ, as in the real model: single-file loaders tell CLIP-L from CLIP-G by width."""
    base = tiny_configs("sd1")
    vocab, _ = tokenizer_files()
    unet = {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": [32, 64, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": [1, 1, 2],
        "cross_attention_dim": 80,
        "attention_head_dim": [2, 4, 4],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 88,
        "norm_num_groups": 32,
    }
    text_encoder_2 = {
        **base["text_encoder"],
        "hidden_size": 48,
        "intermediate_size": 96,
        "hidden_act": "gelu",
        "projection_dim": 40,
        "pad_token_id": vocab["!"],
    }
    vae = {**base["vae"], "scaling_factor": 0.13025, "force_upcast": False}
    scheduler = {
        **base["scheduler"],
        "_class_name": "EulerDiscreteScheduler",
        "timestep_spacing": "leading",
        "interpolation_type": "linear",
    }
    scheduler.pop("clip_sample")
    scheduler.pop("set_alpha_to_one")
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": base["text_encoder"],
        "text_encoder_2": text_encoder_2,
        "scheduler": scheduler,
    }


def config_hash(family: TinyFamily = "sd1") -> str:
    """Cache key: the configs, the seed and the layout version."""
    blob = json.dumps(
        {
            "configs": tiny_configs(family),
            "seed": TINY_SEED,
            "format": _FORMAT_VERSION,
            "tokenizer": tokenizer_files(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    """`$KUBEDREAM_CACHE_DIR`, else `$XDG_CACHE_HOME/kubedream`, else `~/.cache/kubedream`."""
    if env := os.environ.get("KUBEDREAM_CACHE_DIR"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kubedream"


def tiny_model_dir(family: TinyFamily = "sd1", cache_dir: Path | None = None) -> Path:
    """The tiny pipeline's diffusers folder, built on first use.

    Concurrent callers are safe: each builds into its own temporary folder and the first
    rename wins.
    """
    root = (cache_dir or default_cache_dir()) / "tiny"
    target = root / f"{family}-{config_hash(family)}"
    if (target / "model_index.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".build-{family}-", dir=root))
    try:
        _write_pipeline(staging, family)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_pipeline(folder: Path, family: TinyFamily) -> None:
    if family == "sdxl":
        _write_sdxl_pipeline(folder)
        return
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import (
        StableDiffusionPipeline,
    )
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    configs = tiny_configs(family)
    vocab, merges = tokenizer_files()
    token_dir = folder / "tokenizer-src"
    token_dir.mkdir(parents=True)
    (token_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (token_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(token_dir, model_max_length=77)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**configs["scheduler"]),
        safety_checker=None,  # type: ignore[arg-type]
        feature_extractor=None,  # type: ignore[arg-type]
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)
    # Keep the classic vocab.json/merges.txt next to tokenizer.json for older loaders.
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(token_dir / name, folder / "tokenizer" / name)
    shutil.rmtree(token_dir)


def _write_sdxl_pipeline(folder: Path) -> None:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
        StableDiffusionXLPipeline,
    )
    from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    configs = tiny_sdxl_configs()
    vocab, merges = tokenizer_files()
    token_dir = folder / "tokenizer-src"
    token_dir.mkdir(parents=True)
    (token_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (token_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(token_dir, model_max_length=77)
    # SDXL's second tokenizer pads with "!" (OpenCLIP's convention), not <|endoftext|>.
    tokenizer_2 = CLIPTokenizer.from_pretrained(token_dir, model_max_length=77, pad_token="!")
    scheduler_config = {k: v for k, v in configs["scheduler"].items() if not k.startswith("_")}

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**scheduler_config),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipeline.save_pretrained(folder)
    for sub in ("tokenizer", "tokenizer_2"):
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(token_dir / name, folder / sub / name)
    shutil.rmtree(token_dir)
