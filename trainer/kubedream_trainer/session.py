"""One run of `kubedream train`: the job, the Accelerator, the output and who may write it.

Why accelerate, and how far: the Accelerator gives device placement, autocast and the fp16
grad scaler, DDP wrapping and process-group queries (`is_main_process`, `reduce`) for the
torchrun launch of issue #9. Everything that decides bit-exact resume stays explicit and
ours: gradient accumulation (we group micro-batches ourselves, so an epoch boundary or a
resume never shifts accelerate's hidden step counter), the LR scheduler (not prepared, so
it steps exactly once per optimizer step on every rank), the random streams (one explicit
noise generator per rank) and the checkpoint layout (through `Storage`, not
`save_state`). Only rank 0 writes (progress, checkpoints, samples) and holds the output
lease; every other step is rank-agnostic. Opened by `train_cli`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from kubedream_operator.spec import FineTuneJob

from .checkpoint import CheckpointStore
from .config import Precision, TrainerEnv, resolve_device, resolve_precision
from .distributed import init_process_group
from .lease import OutputLease
from .progress import Progress
from .storage import Storage, open_storage


@dataclass
class Session:
    """What every part of a run shares."""

    job: FineTuneJob
    env: TrainerEnv
    accelerator: Accelerator
    precision: Precision
    output: Storage
    store: CheckpointStore
    progress: Progress
    lease: OutputLease | None
    """Held by rank 0 only."""

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return int(self.accelerator.process_index)

    @property
    def world_size(self) -> int:
        return int(self.accelerator.num_processes)

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    @property
    def lease_lost(self) -> bool:
        """Whether this process's lease heartbeat saw another trainer take the output (no I/O)."""
        return self.lease is not None and self.lease.lost.is_set()

    def fence(self) -> None:
        """Raise unless this process still holds the output lease (checked before commits)."""
        if self.lease is not None:
            self.lease.check()


@contextmanager
def open_session(job: FineTuneJob, device: str | None, env: TrainerEnv) -> Iterator[Session]:
    """Create the Accelerator, take the output lease (rank 0), and release it on exit."""
    spec = job.spec
    target = resolve_device(device)
    precision = resolve_precision(spec.training.mixed_precision, target)
    if target.type == "cuda" and target.index is not None:
        torch.cuda.set_device(target)
    init_process_group(target)  # under torchrun: gloo/nccl with KUBEDREAM_DIST_TIMEOUT
    accelerator = Accelerator(cpu=target.type == "cpu", mixed_precision=precision)
    output = open_storage(spec.output.uri, spec.storage)
    lease = None
    if accelerator.is_main_process:
        lease = OutputLease(output, job.name, env.lease_ttl_s, env.lease_wait_s)
        lease.acquire()
    try:
        accelerator.wait_for_everyone()
        progress = Progress(
            output if accelerator.is_main_process else None,
            job.name,
            spec.output.progress_every_steps,
            world_size=accelerator.num_processes,
        )
        yield Session(
            job, env, accelerator, precision, output, CheckpointStore(output), progress, lease
        )
    finally:
        if lease is not None:
            lease.release()
