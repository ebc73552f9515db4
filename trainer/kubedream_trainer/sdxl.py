"""What SDXL adds to Stable Diffusion training: two text encoders and size/crop conditioning.

SDXL (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution Image
Synthesis") conditions its UNet on

- the penultimate hidden states of CLIP ViT-L (`text_encoder`) and OpenCLIP ViT-bigG
  (`text_encoder_2`, a `CLIPTextModelWithProjection`), concatenated on the feature axis;
- `text_embeds`: the second encoder's pooled, projected output;
- `time_ids`: per image (original height, original width, crop top, crop left, target height,
  target width) -- section 2.2 of the paper, "micro-conditioning". The data loader reports each
  image's original size and where its bucket crop starts (`Batch.original_sizes`,
  `Batch.crop_coords`).

A dropped caption ("" from condition dropout) gets all-zero embeddings, as in Stability's
training code (sgm's `GeneralConditioner` zeroes dropped embeddings) and as the pipeline's
`force_zeros_for_empty_prompt` expects at inference.

Both encoders live in one `SDXLTextEncoders` module, so everything that handles "the text
encoder" (freezing, the optimizer's parameter group, DDP, gradient checkpointing, the
training-state file) handles both without knowing about SDXL. Called by `models`, `step`,
`writer` and `export`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

if TYPE_CHECKING:
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
        StableDiffusionXLPipeline,
    )

    from .models import Components

Size = tuple[int, int]
"""(height, width) in pixels, SDXL's order."""


def enable_text_checkpointing(encoder: torch.nn.Module) -> None:
    """Recompute a text encoder's activations in backward. transformers 5 renamed the switch
    `activation_checkpointing_enable` (the old name warns); older releases only have the old
    name, and `SDXLTextEncoders` offers the old name for its pair."""
    new_name = "activation_checkpointing_enable"
    getattr(encoder, new_name if hasattr(encoder, new_name) else "gradient_checkpointing_enable")()


class SDXLTextEncoders(torch.nn.Module):
    """CLIP-L and CLIP-G as one module; its state dict prefixes their keys with
    `text_encoder.` and `text_encoder_2.`."""

    def __init__(
        self, text_encoder: CLIPTextModel, text_encoder_2: CLIPTextModelWithProjection
    ) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2

    def gradient_checkpointing_enable(self) -> None:
        """Recompute both encoders' activations in backward."""
        for encoder in (self.text_encoder, self.text_encoder_2):
            enable_text_checkpointing(encoder)

    def forward(
        self, input_ids: torch.Tensor, input_ids_2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states [B, 77, d1 + d2], pooled projection [B, p]), as the SDXL pipeline's
        `encode_prompt` computes them."""
        first = self.text_encoder(input_ids, output_hidden_states=True)
        second = self.text_encoder_2(input_ids_2, output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return hidden, second.text_embeds


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids padded (with the tokenizer's own pad token) to its 77 tokens."""
    ids: torch.Tensor = tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids


def time_ids(
    original_sizes: Sequence[Size], crop_coords: Sequence[Size], target_size: Size
) -> torch.Tensor:
    """[B, 6] float32: original (h, w), crop top-left (top, left), target (h, w) per image."""
    rows = [
        [*original, *crop, *target_size]
        for original, crop in zip(original_sizes, crop_coords, strict=True)
    ]
    return torch.tensor(rows, dtype=torch.float32)


def encode(
    encoders: torch.nn.Module,
    tokenizer: CLIPTokenizer,
    tokenizer_2: CLIPTokenizer,
    captions: list[str],
    add_time_ids: torch.Tensor,
    device: torch.device,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Hidden states and the UNet's `added_cond_kwargs` for a batch; "" captions get zeros.
    `encoders` is an `SDXLTextEncoders`, or its DDP wrapper while it trains."""
    hidden, pooled = encoders(
        tokenize(tokenizer, captions).to(device), tokenize(tokenizer_2, captions).to(device)
    )
    if not all(captions):  # decided on the host: no device sync
        kept = torch.tensor([caption != "" for caption in captions], device=device)
        hidden = hidden * kept[:, None, None].to(hidden.dtype)
        pooled = pooled * kept[:, None].to(pooled.dtype)
    added = {"text_embeds": pooled, "time_ids": add_time_ids.to(device, dtype=pooled.dtype)}
    return hidden, {"added_cond_kwargs": added}


def pipeline(components: Components, scheduler: Any) -> StableDiffusionXLPipeline:
    """A StableDiffusionXLPipeline over the in-memory components (no copies)."""
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
        StableDiffusionXLPipeline,
    )

    encoders = components.text_encoder
    if not isinstance(encoders, SDXLTextEncoders) or components.tokenizer_2 is None:
        raise TypeError("an SDXL pipeline needs SDXLTextEncoders and a second tokenizer")
    return StableDiffusionXLPipeline(
        vae=components.vae,
        text_encoder=encoders.text_encoder,
        text_encoder_2=encoders.text_encoder_2,
        tokenizer=components.tokenizer,
        tokenizer_2=components.tokenizer_2,
        unet=components.unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
