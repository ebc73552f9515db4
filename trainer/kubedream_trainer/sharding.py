"""FSDP (PyTorch FSDP2, `torch.distributed.fsdp.fully_shard`): weights, gradients and
optimizer state sharded across ranks, for models whose training state does not fit one GPU.

`spec.training.dataParallel` picks it (`auto`: SDXL with its text encoders trained, the case
where DDP's full copy per GPU stops fitting first). What changes against DDP:

- `shard` turns each UNet block and each text-encoder layer, then the whole module, into an
  FSDP unit: parameters become DTensors holding 1/world of each tensor. The optimizer and
  EMA are built on those shards, so their state is sharded too.
- Gradient accumulation skips the reduce-scatter on all micro-batches but the last
  (`set_requires_gradient_sync`), as DDP's `no_sync` skips the all-reduce.
- Checkpoints keep DDP's layout, so a run may resume with either: every rank takes part in
  gathering full state dicts (`full_model_state`, `full_optimizer_state`, `full_tensor`),
  rank 0 writes them, and a resumed FSDP run loads full state dicts back into its shards.
  The exported formats (diffusers folder, single file) come from a CPU copy of the trained
  modules that rank 0 keeps for that purpose (`ExportCopy`).
- Samples: every rank runs the same sampling forward passes (an FSDP forward gathers each
  block's weights from all ranks); rank 0 saves the images.

Called by `trainee`, `step`, `writer` and `samples`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
"""Gather whole tensors, to CPU, on rank 0 only (the others get empty dicts)."""
_LOAD = StateDictOptions(full_state_dict=True)
"""Load whole tensors (present on every rank) into the shards."""


def wants_fsdp(data_parallel: str, family: str, text_encoder_trains: bool, world_size: int) -> bool:
    """Whether to shard: never on one process; `auto` means SDXL with its text encoders trained."""
    if world_size <= 1:
        return False
    if data_parallel == "auto":
        return family == "sdxl" and text_encoder_trains
    return data_parallel == "fsdp"


def _units(module: nn.Module) -> Iterator[nn.Module]:
    """The blocks to shard one by one: UNet down/mid/up blocks and transformer layers of text
    encoders (each a ModuleList item named like diffusers and transformers name them)."""
    for name, child in module.named_modules():
        last = name.rsplit(".", 1)[-1]
        parent = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else ""
        if last == "mid_block" or (
            last.isdigit() and parent in ("down_blocks", "up_blocks", "layers")
        ):
            yield child


def shard(module: nn.Module) -> None:
    """FSDP2 on `module` in place: its blocks, then the rest as the root unit."""
    for unit in list(_units(module)):
        fully_shard(unit)
    fully_shard(module)


@contextmanager
def gradient_sync_off(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Skip the gradient reduce-scatter for the micro-batches inside (accumulation)."""
    sharded = [m for m in modules if isinstance(m, FSDPModule)]
    for m in sharded:
        m.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        for m in sharded:
            m.set_requires_gradient_sync(True)


def full_tensor(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every rank calls it); others unchanged."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`whole` cut the way the DTensor `like` is (every rank holds `whole`)."""
    if not isinstance(like, DTensor):
        return whole.to(like.device)
    return distribute_tensor(whole.to(like.device), like.device_mesh, like.placements)


def full_model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's whole state dict on rank 0 (CPU), {} elsewhere; every rank calls it."""
    return cast(dict[str, torch.Tensor], get_model_state_dict(module, options=_FULL))


def load_model_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a whole state dict (present on every rank): into the shards of an FSDP module,
    as `load_state_dict(strict=True)` into any other."""
    if isinstance(module, FSDPModule):
        set_model_state_dict(module, dict(state), options=_LOAD)
    else:
        module.load_state_dict(state, strict=True)


def _param_names(container: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The container's name of every optimizer parameter, in the optimizer's order (the
    order of an ordinary `optimizer.state_dict()`'s integer ids)."""
    names = {id(p): name for name, p in container.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(
    modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """The optimizer's whole state on rank 0 in `optimizer.state_dict()`'s own layout
    (integer parameter ids), so checkpoints of FSDP and DDP runs look alike; every rank calls
    it, the others get {}."""
    container = nn.ModuleDict(modules)
    by_name: dict[str, Any] = dict(get_optimizer_state_dict(container, optimizer, options=_FULL))
    if not by_name:
        return {}
    names = _param_names(container, optimizer)
    index = {name: i for i, name in enumerate(names)}
    groups = []
    for group in by_name["param_groups"]:
        groups.append({**group, "params": [index[name] for name in group["params"]]})
    state = {index[name]: value for name, value in by_name["state"].items()}
    return {"state": state, "param_groups": groups}


def load_optimizer_state(
    modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a whole `optimizer.state_dict()` (integer ids, on every rank) into the shards."""
    container = nn.ModuleDict(modules)
    names = _param_names(container, optimizer)
    groups = []
    for group in state["param_groups"]:
        groups.append({**group, "params": [names[i] for i in group["params"]]})
    by_name = {
        "state": {names[i]: value for i, value in state["state"].items()},
        "param_groups": groups,
    }
    set_optimizer_state_dict(container, optimizer, by_name, options=_LOAD)  # type: ignore[arg-type]


class ExportCopy:
    """Rank 0's CPU copy of the modules FSDP shards, made before sharding, into which
    gathered weights are loaded for exports (diffusers folder, single file)."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = {name: copy.deepcopy(m).to("cpu") for name, m in modules.items()}

    def filled(self, states: dict[str, dict[str, torch.Tensor]]) -> dict[str, nn.Module]:
        """The copies with `states` (whole state dicts, by module name) loaded."""
        for name, state in states.items():
            self.modules[name].load_state_dict(state, strict=True)
        return self.modules
