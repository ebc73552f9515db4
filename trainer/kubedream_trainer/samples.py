"""Sample images during training, from the in-memory model.

Each round renders every prompt of `spec.samples` at the training resolution with the
checkpoint's inference scheduler (EMA weights when EMA is on), one image per prompt with
seed `samples.seed + i`, so rounds are comparable. Written through `Storage` under
`<output>/samples/step-<N>/`: `<i>.png`, `contact-sheet.png` (all prompts side by side) and
`prompts.json`. Rendering runs inside `torch.random.fork_rng`, so how often samples are
taken never changes the training run. Called by `loop` on rank 0.
"""

from __future__ import annotations

import io
import json
import math
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
from PIL import Image

from kubedream_operator.spec import SamplesSpec

from .models import Components
from .progress import Phase
from .storage import Storage, join_uri
from .writer import ema_weights, export_pipeline

if TYPE_CHECKING:
    from .session import Session
    from .trainee import Trainee

SAMPLES = "samples"


def render(
    components: Components, spec: SamplesSpec, resolution: int, device: torch.device, precision: str
) -> list[Image.Image]:
    """One image per prompt, deterministic from `spec.seed`."""
    pipeline = export_pipeline(components)
    pipeline.set_progress_bar_config(disable=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    was_training = components.unet.training
    components.unet.eval()
    images = []
    forked = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=forked), torch.no_grad(), autocast:
            for i, prompt in enumerate(spec.prompts):
                generator = torch.Generator(device=device).manual_seed(spec.seed + i)
                result = pipeline(
                    prompt,
                    negative_prompt=spec.negative_prompt or None,
                    height=resolution,
                    width=resolution,
                    num_inference_steps=spec.steps,
                    guidance_scale=spec.guidance_scale,
                    generator=generator,
                )
                images.append(result.images[0])
    finally:
        components.unet.train(was_training)
    return images


def contact_sheet(images: list[Image.Image]) -> Image.Image:
    """All images on one sheet, in rows of up to four."""
    columns = min(4, len(images))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    sheet = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * width, (i // columns) * height))
    return sheet


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save(output: Storage, step: int, prompts: list[str], images: list[Image.Image]) -> str:
    """Write one round of samples; returns the folder's URI."""
    folder = f"{SAMPLES}/step-{step}"
    for i, image in enumerate(images):
        output.write_bytes(f"{folder}/{i}.png", _png(image))
    output.write_bytes(f"{folder}/contact-sheet.png", _png(contact_sheet(images)))
    output.write_text(
        f"{folder}/prompts.json", json.dumps(dict(enumerate(prompts)), indent=2) + "\n"
    )
    return join_uri(output.uri, folder)


def sample_round(session: Session, trainee: Trainee, step: int) -> str | None:
    """Render and save one round on rank 0 (EMA weights when EMA is on); others wait. Under
    FSDP every rank renders the same images (each forward gathers weights from all ranks)
    and rank 0 saves them."""
    spec = session.job.spec
    folder = None
    if spec.samples.prompts and (session.is_main or trainee.sharded):
        if session.is_main:
            session.progress.phase(
                Phase.SAMPLING, f"rendering {len(spec.samples.prompts)} sample(s) at step {step}"
            )
        with ema_weights(trainee.components.unet, trainee.ema):
            images = render(
                trainee.components,
                spec.samples,
                spec.data.resolution,
                session.device,
                session.precision,
            )
        if session.is_main:
            folder = save(session.output, step, spec.samples.prompts, images)
            session.progress.update(lastSamples=folder)
            session.progress.say(f"samples written: {folder}")
    session.accelerator.wait_for_everyone()
    return folder
