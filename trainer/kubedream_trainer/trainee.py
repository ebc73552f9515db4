"""The model under training and everything that updates it: which networks train, the
optimizer, the LR schedule, EMA, the noise generator, the latent cache.

`build` sets up the raw modules (all weights stay fp32; autocast chooses the compute
precision, so exported weights never lose precision), `restore` loads a checkpoint's
training state into them, and `wrap` hands the trained networks to the Accelerator (DDP
under torchrun) and torch.compile last, so checkpoints always read the unwrapped modules.
Called by `loop`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.training_utils import EMAModel
from torch.optim.lr_scheduler import LRScheduler

from kubedream_operator.spec import TrainingSpec

from .data.seeding import derive_seed
from .errors import JobError
from .latents import LatentCache
from .models import Components
from .optim import build_lr_scheduler, build_optimizer, param_groups
from .sdxl import enable_text_checkpointing
from .sharding import (
    ExportCopy,
    gradient_sync_off,
    load_model_state,
    load_optimizer_state,
    shard,
    shard_like,
)
from .state import LoadedState, Position, restore_rng


@dataclass
class Trainee:
    """The networks as trained plus their optimizer state."""

    components: Components
    unet: torch.nn.Module
    """The UNet to call forward on (wrapped by DDP / torch.compile after `wrap`)."""
    text_encoder: torch.nn.Module
    """The text encoder to call forward on (DDP-wrapped when it trains)."""
    text_encoder_trains: bool
    optimizer: torch.optim.Optimizer
    lr_scheduler: LRScheduler
    ema: EMAModel | None
    generator: torch.Generator
    """Noise, timesteps and latent sampling draw from this, and only this."""
    latent_cache: LatentCache | None
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    sharded: bool = False
    """FSDP: the trained modules hold 1/world of each weight (`sharding`)."""
    export_copy: ExportCopy | None = None
    """FSDP, rank 0: CPU copies of the trained modules, for exports."""

    def trained_modules(self) -> dict[str, torch.nn.Module]:
        """The raw modules that train, by the name checkpoints give them."""
        modules = {"unet": cast(torch.nn.Module, self.components.unet)}
        if self.text_encoder_trains:
            modules["text_encoder"] = self.components.text_encoder
        return modules

    def reseed_noise(self, step: int, micro_batch: int) -> None:
        """Seed the noise generator for micro-batch `micro_batch` of optimizer step `step`
        (0-based) from its slot in the step batch, micro_batch × world size + rank: ranks never
        share noise, and a run with the same step batch on another number of ranks draws the
        same noise for the same images (so its losses match, and resuming across world sizes
        continues the same run)."""
        slot = micro_batch * self.world_size + self.rank
        self.generator.manual_seed(derive_seed("noise", self.seed, step, slot) % 2**63)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        params = list(self.components.unet.parameters())
        if self.text_encoder_trains:
            params += list(self.components.text_encoder.parameters())
        return params

    @contextmanager
    def no_sync(self, accelerator: Accelerator) -> Iterator[None]:
        """Skip DDP's gradient all-reduce, or FSDP's reduce-scatter (every micro-batch of a
        group but the last)."""
        if self.sharded:
            with gradient_sync_off(self.trained_modules().values()):
                yield
            return
        with ExitStack() as stack:
            stack.enter_context(accelerator.no_sync(self.unet))
            if self.text_encoder_trains:
                stack.enter_context(accelerator.no_sync(self.text_encoder))
            yield


def build(
    components: Components,
    spec: TrainingSpec,
    device: torch.device,
    total_steps: int,
    rank: int,
    world_size: int = 1,
    channels_last: bool = False,
    sharded: bool = False,
) -> Trainee:
    """Freeze what does not train, move to the device, create optimizer, schedule and EMA.
    With `channels_last` the UNet's weights take the NHWC layout (before the optimizer and
    EMA copy them, so their state shares it); the values do not change. With `sharded`
    (FSDP), the trained modules are sharded across ranks before the optimizer and EMA are
    built on them (rank 0 first keeps a CPU copy for exports)."""
    trains_text = bool(spec.text_encoder_learning_rate)
    vae, unet = cast(torch.nn.Module, components.vae), cast(torch.nn.Module, components.unet)
    trained = {"unet": unet, **({"text_encoder": components.text_encoder} if trains_text else {})}
    export_copy = ExportCopy(trained) if sharded and rank == 0 else None
    vae.requires_grad_(False).eval().to(device)
    unet.requires_grad_(True).train().to(device)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    components.text_encoder.requires_grad_(trains_text).train(trains_text).to(device)
    if spec.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
        if trains_text:
            enable_text_checkpointing(components.text_encoder)
    if sharded:
        for module in trained.values():
            shard(module)
    groups = param_groups(
        spec,
        components.unet.parameters(),
        components.text_encoder.parameters() if trains_text else None,
    )
    optimizer = build_optimizer(spec, groups, device)
    ema = None
    if spec.ema is not None:
        ema = EMAModel(
            components.unet.parameters(),
            decay=spec.ema.decay,
            model_cls=UNet2DConditionModel,
            model_config=components.unet.config,
        )
    generator = torch.Generator(device=device).manual_seed(
        derive_seed("noise", spec.seed, rank) % 2**63
    )
    return Trainee(
        components=components,
        unet=components.unet,
        text_encoder=components.text_encoder,
        text_encoder_trains=trains_text,
        optimizer=optimizer,
        lr_scheduler=build_lr_scheduler(spec, optimizer, total_steps),
        ema=ema,
        generator=generator,
        latent_cache=LatentCache() if spec.cache_latents else None,
        seed=spec.seed,
        rank=rank,
        world_size=world_size,
        sharded=sharded,
        export_copy=export_copy,
    )


def restore(trainee: Trainee, loaded: LoadedState, accelerator: Accelerator, rank: int) -> Position:
    """Load a checkpoint's training state; returns where training stands."""
    components = trainee.components
    load_model_state(components.unet, loaded.unet)  # into FSDP shards, or plainly
    if trainee.text_encoder_trains and loaded.text_encoder is not None:
        load_model_state(components.text_encoder, loaded.text_encoder)
    try:
        if trainee.sharded:
            load_optimizer_state(trainee.trained_modules(), trainee.optimizer, loaded.optimizer)
        else:
            trainee.optimizer.load_state_dict(loaded.optimizer)
    except (ValueError, KeyError, IndexError) as exc:
        raise JobError(
            "spec.training: the checkpoint's optimizer state does not fit this job (optimizer or "
            f"trained networks changed since it was written: {exc}); use a new spec.output.uri"
        ) from None
    trainee.lr_scheduler.load_state_dict(loaded.trainer["lr_scheduler"])
    if accelerator.scaler is not None and loaded.trainer.get("grad_scaler"):
        accelerator.scaler.load_state_dict(loaded.trainer["grad_scaler"])
    if trainee.ema is not None and loaded.ema_shadow is not None:
        names = [name for name, _ in components.unet.named_parameters()]
        state: dict[str, Any] = dict(loaded.trainer["ema"])
        state["shadow_params"] = [loaded.ema_shadow[name] for name in names]
        if trainee.sharded:  # whole tensors from the checkpoint, cut like the weights
            unet_params = components.unet.parameters()
            state["shadow_params"] = [
                shard_like(whole, p)
                for whole, p in zip(state["shadow_params"], unet_params, strict=True)
            ]
        trainee.ema.load_state_dict(state)
        trainee.ema.to(device=accelerator.device)
    rng_states = loaded.trainer["rng"]
    restore_rng(rng_states[rank] if rank < len(rng_states) else rng_states[0], trainee.generator)
    return loaded.position


def wrap(trainee: Trainee, accelerator: Accelerator, compile_backend: str | None) -> None:
    """Prepare for (distributed) training: DDP where it applies (FSDP modules are sharded
    already), then torch.compile."""
    if not trainee.sharded:
        trainee.unet = accelerator.prepare_model(trainee.components.unet)
        if trainee.text_encoder_trains:
            trainee.text_encoder = accelerator.prepare_model(trainee.components.text_encoder)
    trainee.optimizer = accelerator.prepare_optimizer(trainee.optimizer)
    if compile_backend is not None:
        trainee.unet = torch.compile(trainee.unet, backend=compile_backend)  # type: ignore[assignment]


def seed_everything(seed: int, rank: int) -> None:
    """Seed the global generators of a fresh run (a resumed run restores them instead)."""
    derived = derive_seed("global", seed, rank)
    random.seed(derived)
    np.random.seed(derived % 2**32)
    torch.manual_seed(derived % 2**63)
