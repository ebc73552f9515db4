"""Writing checkpoints: the exported model in the requested formats plus the training
state, staged in a local folder and handed to `CheckpointStore.commit`, then rotated.

Exported weights are the EMA weights when EMA is on (swapped in for the export and swapped
back, so training continues on the raw weights); `training_state/` always holds the raw
ones. Only `spec.output.formats` are exported; `training_state/` is always written, so a
checkpoint resumes whatever formats it carries. Called by `loop`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import diffusers
import torch
from accelerate.utils import gather_object
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from diffusers.training_utils import EMAModel
from torch.distributed.tensor import DTensor
from transformers import CLIPTextModel

from . import sdxl
from .checkpoint import Checkpoint, CheckpointExistsError
from .config import spec_hash
from .errors import OutputError
from .export import original_state_dict, save_single_file
from .models import Components, build_inference_scheduler
from .progress import Phase
from .sharding import full_model_state, full_optimizer_state, full_tensor
from .state import Position, capture_rng, write_state

if TYPE_CHECKING:
    from .session import Session
    from .trainee import Trainee

SINGLE_FILE = "model.safetensors"


@contextmanager
def ema_weights(unet: torch.nn.Module, ema: EMAModel | None) -> Iterator[None]:
    """Temporarily load the EMA weights into `unet` (no-op without EMA)."""
    if ema is None:
        yield
        return
    params = list(unet.parameters())
    if not any(isinstance(p, DTensor) for p in params):
        ema.store(params)  # on the CPU: no second copy of the weights on the GPU
        ema.copy_to(params)
        try:
            yield
        finally:
            ema.restore(params)
        return
    # FSDP: EMA's store/restore mixes CPU tensors with DTensors; keep the shards on device.
    saved = [p.detach().clone() for p in params]
    ema.copy_to(params)
    try:
        yield
    finally:
        with torch.no_grad():
            for param, kept in zip(params, saved, strict=True):
                param.copy_(kept)


def export_pipeline(
    components: Components,
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """A pipeline over the in-memory components (no copies), for saving and sampling:
    StableDiffusionXLPipeline for SDXL, StableDiffusionPipeline otherwise."""
    scheduler = build_inference_scheduler(components.inference_scheduler_config)
    text_encoder = components.text_encoder
    if isinstance(text_encoder, sdxl.SDXLTextEncoders):
        return sdxl.pipeline(components, scheduler)
    return StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=scheduler,  # type: ignore[arg-type]
        safety_checker=None,  # type: ignore[arg-type]
        feature_extractor=None,  # type: ignore[arg-type]
        requires_safety_checker=False,
    )


@dataclass
class WholeState:
    """An FSDP run's trained state as whole tensors, gathered from the shards for rank 0."""

    unet: dict[str, torch.Tensor]
    text_encoder: dict[str, torch.Tensor] | None
    ema_shadow: list[torch.Tensor] | None
    optimizer: dict[str, Any]


def gather_whole_state(trainee: Trainee) -> WholeState | None:
    """Every rank calls it (collectives); rank 0 gets the whole state, the others None."""
    unet = full_model_state(trainee.components.unet)
    text = (
        full_model_state(trainee.components.text_encoder) if trainee.text_encoder_trains else None
    )
    shadow: list[torch.Tensor] | None = None
    if trainee.ema is not None:  # one tensor at a time; only rank 0 keeps them
        shadow = []
        for tensor in trainee.ema.shadow_params:
            gathered = full_tensor(tensor.detach())
            if trainee.rank == 0:
                shadow.append(gathered.cpu())
    optimizer = full_optimizer_state(
        trainee.trained_modules(), getattr(trainee.optimizer, "optimizer", trainee.optimizer)
    )
    if trainee.rank != 0:
        return None
    return WholeState(unet, text, shadow, optimizer)


def _export_view(
    trainee: Trainee, whole: WholeState | None
) -> tuple[Components, EMAModel | None, list[str]]:
    """The components to export from, the EMA to apply while exporting, and the UNet's
    parameter names. FSDP: rank 0's CPU copies filled with the gathered weights, EMA ones
    already in the UNet when EMA is on."""
    components = trainee.components
    names = [name for name, _ in components.unet.named_parameters()]
    if whole is None:
        return components, trainee.ema, names
    assert trainee.export_copy is not None  # rank 0 of an FSDP run keeps one
    unet_state = dict(whole.unet)
    if whole.ema_shadow is not None:
        unet_state.update(zip(names, whole.ema_shadow, strict=True))
    states = {"unet": unet_state}
    if whole.text_encoder is not None:
        states["text_encoder"] = whole.text_encoder
    copies = trainee.export_copy.filled(states)
    view = replace(
        components,
        unet=cast(UNet2DConditionModel, copies["unet"]),
        text_encoder=cast(
            "CLIPTextModel | sdxl.SDXLTextEncoders",
            copies.get("text_encoder", components.text_encoder),
        ),
    )
    return view, None, names


def stage_checkpoint(
    staging: Path,
    *,
    trainee: Trainee,
    formats: list[str],
    trainer_state: dict[str, Any],
    step: int,
    whole: WholeState | None = None,
) -> None:
    """Write the exported formats and `training_state/` into `staging`. `whole`: an FSDP
    run's gathered state (see `gather_whole_state`)."""
    components, ema, names = _export_view(trainee, whole)
    with ema_weights(components.unet, ema):
        if "diffusers" in formats:
            export_pipeline(components).save_pretrained(staging, safe_serialization=True)
        if "safetensors" in formats:
            state = original_state_dict(
                components.unet, components.vae, components.text_encoder, components.family
            )
            metadata = {
                "format": "pt",
                "kubedream.family": components.family,
                "kubedream.prediction_type": components.prediction_type,
                "kubedream.step": str(step),
                "kubedream.ema": str(trainee.ema is not None).lower(),
            }
            save_single_file(state, staging / SINGLE_FILE, metadata)
    if whole is not None:
        ema_state = None
        if trainee.ema is not None and whole.ema_shadow is not None:
            ema_state = {**trainee.ema.state_dict(), "shadow_params": whole.ema_shadow}
        write_state(
            staging,
            unet=whole.unet,
            text_encoder=whole.text_encoder,
            ema_state=ema_state,
            ema_names=names,
            optimizer=whole.optimizer,
            trainer=trainer_state,
        )
        return
    write_state(
        staging,
        unet=trainee.components.unet.state_dict(),
        text_encoder=(
            trainee.components.text_encoder.state_dict() if trainee.text_encoder_trains else None
        ),
        ema_state=trainee.ema.state_dict() if trainee.ema is not None else None,
        ema_names=names,
        optimizer=trainee.optimizer.state_dict(),
        trainer=trainer_state,
    )


def _refuse_if_damaged(session: Session, step: int) -> None:
    """The final step N is already committed: fine when it verifies (an earlier run got
    there), an error when it does not (this run resumed from an older one because it was
    damaged, and must not report the damaged one as its result)."""
    existing = next((c for c in session.store.committed() if c.step == step), None)
    if existing is None:
        return
    problems = session.store.verify_committed(existing)
    if problems:
        raise OutputError(
            f"{existing.uri} is committed but damaged ({'; '.join(problems)}), so this run's "
            f"step {step} cannot be committed in its place; move that folder away (or point "
            "spec.output.uri elsewhere) and start again"
        )


def save_checkpoint(
    session: Session,
    trainee: Trainee,
    position: Position,
    *,
    epoch: int,
    total_steps: int,
    fingerprints: dict[str, str],
) -> Checkpoint | None:
    """Checkpoint the current state: rank 0 stages, commits and rotates; every rank calls it.

    Returns the committed checkpoint, or None when step N was already committed (the
    never-overwrite rule; the cause is logged).
    """
    spec = session.job.spec
    rng = capture_rng(trainee.generator)
    rng_states = gather_object([rng]) if session.world_size > 1 else [rng]
    whole = gather_whole_state(trainee) if trainee.sharded else None
    checkpoint = None
    if session.is_main:
        session.progress.phase(Phase.CHECKPOINTING, f"saving a checkpoint at step {position.step}")
        scaler = session.accelerator.scaler
        trainer_state = {
            "position": asdict(position),
            "lr_scheduler": trainee.lr_scheduler.state_dict(),
            "grad_scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_states,
            "fingerprints": fingerprints,
        }
        manifest = {
            "job": session.job.name,
            "epoch": epoch,
            "position": position.as_manifest(),
            "totalSteps": total_steps,
            "final": position.step >= total_steps,
            "formats": list(spec.output.formats),
            "family": trainee.components.family,
            "predictionType": trainee.components.prediction_type,
            "ema": trainee.ema is not None,
            "textEncoderTrained": trainee.text_encoder_trains,
            "worldSize": session.world_size,
            "specHash": spec_hash(spec),
            **fingerprints,
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        }
        staging_root = session.env.staging_dir
        if staging_root is not None:
            staging_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="kd-checkpoint-", dir=staging_root) as tmp:
            stage_checkpoint(
                Path(tmp),
                trainee=trainee,
                formats=list(spec.output.formats),
                trainer_state=trainer_state,
                step=position.step,
                whole=whole,
            )
            try:
                checkpoint = session.store.commit(position.step, Path(tmp), manifest, session.fence)
            except CheckpointExistsError as exc:
                if position.step >= total_steps:  # the run's result must not be a damaged one
                    _refuse_if_damaged(session, position.step)
                session.progress.say(f"warning: {exc.message}")
        session.fence()  # rotation deletes: only under the lease
        session.store.rotate(spec.output.keep_last)
        session.progress.set_checkpoints([c.uri for c in session.store.committed()])
        if checkpoint is not None:
            session.progress.say(f"checkpoint committed: {checkpoint.uri}")
    session.accelerator.wait_for_everyone()
    return checkpoint
