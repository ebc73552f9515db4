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
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import diffusers
import torch
from accelerate.utils import gather_object
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import (
    StableDiffusionXLPipeline,
)
from diffusers.training_utils import EMAModel

from . import sdxl
from .checkpoint import Checkpoint, CheckpointExistsError
from .config import spec_hash
from .errors import OutputError
from .export import original_state_dict, save_single_file
from .models import Components, build_inference_scheduler
from .progress import Phase
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
    ema.store(unet.parameters())
    ema.copy_to(unet.parameters())
    try:
        yield
    finally:
        ema.restore(unet.parameters())


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


def stage_checkpoint(
    staging: Path,
    *,
    components: Components,
    formats: list[str],
    ema: EMAModel | None,
    text_encoder_trains: bool,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    step: int,
) -> None:
    """Write the exported formats and `training_state/` into `staging`."""
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
                "kubedream.ema": str(ema is not None).lower(),
            }
            save_single_file(state, staging / SINGLE_FILE, metadata)
    write_state(
        staging,
        unet=components.unet,
        text_encoder=components.text_encoder if text_encoder_trains else None,
        ema_state=ema.state_dict() if ema is not None else None,
        optimizer=optimizer,
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
                components=trainee.components,
                formats=list(spec.output.formats),
                ema=trainee.ema,
                text_encoder_trains=trainee.text_encoder_trains,
                optimizer=trainee.optimizer,
                trainer_state=trainer_state,
                step=position.step,
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
