"""Load a Stable Diffusion model folder into the pieces training needs.

Every base model, tiny or real, is a diffusers folder read with `from_pretrained`:
`resolve_model_dir` turns `spec.model.base` into such a folder, `load_components` loads the
UNet, VAE, text encoder(s), tokenizer(s) and schedulers and settles the family
(sd1/sd2/sdxl) and the prediction type. `encode_prompt` is the one place that turns
captions into UNet conditioning, returning extra UNet keyword arguments alongside the
hidden states: for SDXL (see `sdxl`) the `added_cond_kwargs` with the pooled embedding and
the size/crop time ids.

Called by `loop` (training), `samples` and `checkpoint` (export).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.schedulers.scheduling_ddim import DDIMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from kubedream_operator.spec import TINY_MODEL, TINY_SDXL_MODEL, ModelSpec

from . import sdxl
from .errors import JobError
from .sdxl import SDXLTextEncoders
from .tiny import tiny_model_dir

Family = Literal["sd1", "sd2", "sdxl"]
PredictionType = Literal["epsilon", "v_prediction"]

_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class Components:
    """A loaded model: trainable networks, frozen helpers and what they were detected as."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel | SDXLTextEncoders
    """SD1/SD2: the CLIP text model. SDXL: both encoders in one module."""
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    """The training noise schedule (zero-terminal-SNR rescaled when asked)."""
    inference_scheduler_config: dict[str, Any]
    """Scheduler config written into checkpoints and used for samples (`_class_name` included)."""
    family: Family
    prediction_type: PredictionType
    model_dir: Path
    tokenizer_2: CLIPTokenizer | None = None
    """SDXL's second tokenizer (OpenCLIP's padding); None for SD1/SD2."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Room for what a future family adds."""


@dataclass
class Conditioning:
    """What the UNet is conditioned on for one batch of captions."""

    encoder_hidden_states: torch.Tensor
    unet_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra UNet arguments (SDXL's `added_cond_kwargs`); empty for SD1/SD2."""


def resolve_model_dir(
    base: str, storage_settings: object | None = None, family: str = "auto"
) -> Path:
    """`spec.model.base` as a local diffusers folder (built for `tiny`)."""
    if base == TINY_SDXL_MODEL or (base == TINY_MODEL and family == "sdxl"):
        return tiny_model_dir("sdxl")
    if base == TINY_MODEL:
        return tiny_model_dir("sd2" if family == "sd2" else "sd1")
    if base.startswith("s3://"):
        return _fetch_remote_model(base, storage_settings)
    path = Path(base).expanduser()
    if not path.is_dir():
        raise JobError(f"spec.model.base: model folder {base} does not exist (or is not a folder)")
    if not (path / "model_index.json").is_file():
        raise JobError(
            f"spec.model.base: {path / 'model_index.json'} not found; expected a diffusers folder "
            "with model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/"
        )
    wanted: tuple[str, ...] = _SUBFOLDERS
    if _names_sdxl(json.loads((path / "model_index.json").read_text())):
        wanted += ("text_encoder_2", "tokenizer_2")
    missing = [name for name in wanted if not (path / name).is_dir()]
    if missing:
        raise JobError(f"spec.model.base: {path} lacks the folder(s) {', '.join(missing)}")
    return path


def _fetch_remote_model(uri: str, storage_settings: object | None) -> Path:
    """Download an s3:// model folder to the local model cache (see `model_cache`)."""
    from .model_cache import fetch_model

    return fetch_model(uri, storage_settings)


def _names_sdxl(index: dict[str, Any]) -> bool:
    """Whether a model_index.json describes an SDXL pipeline."""
    return (index.get("text_encoder_2") or [None])[0] is not None or str(
        index.get("_class_name", "")
    ).startswith("StableDiffusionXL")


def detect_family(model_dir: Path) -> Family:
    """sdxl when the folder has a second text encoder (or model_index names an SDXL
    pipeline); sd2 when its text encoder is OpenCLIP (GELU activations); otherwise sd1
    (OpenAI CLIP, quick-GELU)."""
    if _names_sdxl(json.loads((model_dir / "model_index.json").read_text())):
        return "sdxl"
    config = json.loads((model_dir / "text_encoder" / "config.json").read_text())
    return "sd2" if config.get("hidden_act") == "gelu" else "sd1"


def _prediction_type(spec: ModelSpec, scheduler_config: dict[str, Any]) -> PredictionType:
    chosen = (
        spec.prediction_type
        if spec.prediction_type != "auto"
        else scheduler_config.get("prediction_type", "epsilon")
    )
    if chosen not in ("epsilon", "v_prediction"):
        raise JobError(
            f"spec.model.predictionType: the model's scheduler predicts {chosen!r}; "
            "set epsilon or v_prediction explicitly"
        )
    return chosen


def inference_scheduler_config(
    base: dict[str, Any], prediction_type: str, zero_terminal_snr: bool
) -> dict[str, Any]:
    """The base scheduler config, predicting what was trained. A zero-terminal-SNR model needs
    rescaled betas and trailing timesteps at inference (Lin et al. 2023, section 3.3); when the
    base scheduler cannot do that, DDIM replaces it."""
    config = {k: v for k, v in base.items() if not k.startswith("_") or k == "_class_name"}
    config["prediction_type"] = prediction_type
    if zero_terminal_snr:
        if config.get("_class_name") not in (
            "DDIMScheduler",
            "DDPMScheduler",
            "EulerDiscreteScheduler",
        ):
            config = {
                k: v
                for k, v in DDIMScheduler.from_config(config).config.items()
                if not k.startswith("_")
            }
            config["_class_name"] = "DDIMScheduler"
        config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return config


def load_components(model_dir: Path, spec: ModelSpec, zero_terminal_snr: bool) -> Components:
    """Load every component from a diffusers folder; a broken folder is a JobError naming the part."""
    detected = detect_family(model_dir)
    family: Family = detected if spec.family == "auto" else spec.family
    if (family == "sdxl") != (detected == "sdxl"):
        raise JobError(
            f"spec.model.family: {family} does not fit {model_dir}, which holds an "
            f"{'SDXL' if detected == 'sdxl' else 'SD1/SD2'} model; use family auto"
        )

    def load(name: str, loader: Any) -> Any:
        try:
            return loader(model_dir, subfolder=name)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise JobError(f"spec.model.base: cannot load {model_dir / name}: {exc}") from None

    scheduler_config: dict[str, Any] = dict(load("scheduler", DDPMScheduler.load_config))
    prediction_type = _prediction_type(spec, scheduler_config)
    noise_scheduler = DDPMScheduler.from_config(
        {
            k: v
            for k, v in scheduler_config.items()
            if k in DDPMScheduler._get_init_keys(DDPMScheduler)
        },
        prediction_type=prediction_type,
        rescale_betas_zero_snr=zero_terminal_snr,
    )
    clip: CLIPTextModel = load("text_encoder", CLIPTextModel.from_pretrained)
    text_encoder: CLIPTextModel | SDXLTextEncoders = clip
    tokenizer_2 = None
    if family == "sdxl":
        text_encoder = SDXLTextEncoders(
            clip, load("text_encoder_2", CLIPTextModelWithProjection.from_pretrained)
        )
        tokenizer_2 = load("tokenizer_2", CLIPTokenizer.from_pretrained)
    return Components(
        unet=load("unet", UNet2DConditionModel.from_pretrained),
        vae=load("vae", AutoencoderKL.from_pretrained),
        text_encoder=text_encoder,
        tokenizer=load("tokenizer", CLIPTokenizer.from_pretrained),
        tokenizer_2=tokenizer_2,
        noise_scheduler=noise_scheduler,
        inference_scheduler_config=inference_scheduler_config(
            scheduler_config, prediction_type, zero_terminal_snr
        ),
        family=family,
        prediction_type=prediction_type,
        model_dir=model_dir,
    )


def build_inference_scheduler(config: dict[str, Any]) -> SchedulerMixin:
    """Instantiate the scheduler class the config names (from diffusers)."""
    import diffusers

    cls = getattr(diffusers, str(config.get("_class_name", "DDIMScheduler")), DDIMScheduler)
    scheduler: SchedulerMixin = cls.from_config(config)
    return scheduler


def encode_prompt(
    components: Components,
    captions: list[str],
    device: torch.device,
    text_encoder: torch.nn.Module | None = None,
    add_time_ids: torch.Tensor | None = None,
) -> Conditioning:
    """Tokenize (padded to the model's 77 tokens) and encode captions; "" is the unconditional
    caption that condition dropout trains. `text_encoder` overrides the component (a
    DDP-wrapped copy while it trains). SDXL also needs `add_time_ids` ([B, 6], see
    `sdxl.time_ids`)."""
    encoder = text_encoder if text_encoder is not None else components.text_encoder
    if components.family == "sdxl":
        if add_time_ids is None or components.tokenizer_2 is None:
            raise ValueError("SDXL conditioning needs add_time_ids and the second tokenizer")
        hidden, kwargs = sdxl.encode(
            encoder, components.tokenizer, components.tokenizer_2, captions, add_time_ids, device
        )
        return Conditioning(encoder_hidden_states=hidden, unet_kwargs=kwargs)
    tokens = components.tokenizer(
        captions,
        padding="max_length",
        max_length=components.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    hidden = encoder(tokens.input_ids.to(device)).last_hidden_state
    return Conditioning(encoder_hidden_states=hidden)
