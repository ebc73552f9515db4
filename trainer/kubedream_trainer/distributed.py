"""Data-parallel training through torch.distributed (issue #9): process group, launch, debug.

`kubedream train JOB --nproc-per-node N [--nnodes M --node-rank R --master-addr A]` with more
than one process in all launches the workers through torchrun's own code
(`torch.distributed.run`, elastic agent, static rendezvous), each running
`python -m kubedream_trainer.cli train JOB`. torchrun alone exits 1 whatever failed; the
launcher here maps a worker's permanent exit code (`contract.PERMANENT_EXIT_CODES`: 2 usage,
3 diverged) and the other trainer codes (4, 75, 143, ...) through, so the operator's pod
failure policy still fails a Job with bad input at once. A worker killed by a signal, or a
lost peer, stays 1 (retryable: the Job restarts the whole group from the last checkpoint).

Each worker calls `init_process_group` before the Accelerator exists: gloo on CPU, nccl on
GPU, with `KUBEDREAM_DIST_TIMEOUT` seconds (default 600) as the collective timeout, so a
rank that waits on a lost peer fails instead of hanging. `KUBEDREAM_DEBUG_BATCHES=<folder>`
makes every rank append what each step trained (indices, loss) to
`<folder>/rank-<r>.jsonl`; the distributed tests use it. Called by `train_cli`, `session`
and `loop`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import ExitCode, JobError

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_SHUTDOWN_TIMEOUT_S = 3600
PERMANENT_CODES = frozenset({2, 3})
"""Mirrors `kubedream_operator.contract.PERMANENT_EXIT_CODES` (checked by a test)."""
PEER_STOPPED = int(ExitCode.PEER_STOPPED)
PASSED_THROUGH = frozenset({2, 3, 4, 75, PEER_STOPPED, 130, 143})
"""Worker exit codes that mean the same thing for the whole group as for one process."""


class PeerLostError(Exception):
    """Another rank stopped answering (died, lost its node, timed out), or the group could not
    be formed. Not a `TrainerError`: it exits 1, the retryable code (the Job restarts the
    group from the last committed checkpoint)."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def in_worker() -> bool:
    """Whether this process was started by torchrun (or our launcher) as one rank."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def timeout_seconds() -> float:
    raw = os.environ.get("KUBEDREAM_DIST_TIMEOUT", "")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise JobError(f"KUBEDREAM_DIST_TIMEOUT: must be a number of seconds > 0, got {raw!r}")
    return value


def shutdown_timeout_seconds() -> int:
    """How long the launcher lets its workers commit a checkpoint after a stop signal:
    `KUBEDREAM_SHUTDOWN_TIMEOUT` seconds, default 3600 (in a pod, its
    terminationGracePeriodSeconds ends it first)."""
    raw = os.environ.get("KUBEDREAM_SHUTDOWN_TIMEOUT", "")
    if not raw:
        return DEFAULT_SHUTDOWN_TIMEOUT_S
    if not raw.isdigit():
        raise JobError(
            f"KUBEDREAM_SHUTDOWN_TIMEOUT: must be a whole number of seconds, got {raw!r}"
        )
    return int(raw)


def init_process_group(device: torch.device) -> None:
    """Join the torchrun group (no-op for one process or when already joined)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        local = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(local)
        kwargs["device_id"] = local
    try:
        dist.init_process_group(
            backend=backend, timeout=timedelta(seconds=timeout_seconds()), **kwargs
        )
    except (RuntimeError, ValueError) as exc:
        raise PeerLostError(
            f"could not join the process group ({backend}, rank {os.environ.get('RANK')} of "
            f"{os.environ.get('WORLD_SIZE')}, master {os.environ.get('MASTER_ADDR')}:"
            f"{os.environ.get('MASTER_PORT')}): {exc}"
        ) from None


_PEER_LOSS_SIGNS = (
    "gloo/transport",
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
)
"""How gloo's failed collectives read: a plain RuntimeError, not a `DistError` (NCCL's are)."""


def is_peer_loss(exc: BaseException) -> bool:
    """Whether `exc` is a collective that failed because another rank went away."""
    if isinstance(exc, dist.DistError):
        return True
    return (
        isinstance(exc, RuntimeError)
        and dist.is_available()
        and dist.is_initialized()
        and any(sign in str(exc) for sign in _PEER_LOSS_SIGNS)
    )


def peer_lost(exc: BaseException) -> PeerLostError:
    """The message for a collective that failed because another rank went away."""
    rank = os.environ.get("RANK", "?")
    return PeerLostError(
        f"rank {rank} lost the process group ({type(exc).__name__}: {str(exc).strip()[:300]}); "
        "another training process died or stopped answering within KUBEDREAM_DIST_TIMEOUT "
        f"({timeout_seconds():g} s). Starting the job again resumes from the last checkpoint"
    )


# --- the launcher ------------------------------------------------------------------------


def wants_launch(args: argparse.Namespace) -> bool:
    """More than one process asked for, and we are not one of them yet."""
    procs = getattr(args, "nproc_per_node", 1) * getattr(args, "nnodes", 1)
    return procs > 1 and not in_worker()


def launch(args: argparse.Namespace) -> int:
    """Run the workers through torchrun's code; returns the exit code for the pod."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    worker = [sys.executable, "-m", "kubedream_trainer.cli", "train", args.job]
    if getattr(args, "device", None):
        worker += ["--device", args.device]
    torchrun = [
        f"--nnodes={args.nnodes}",
        f"--nproc-per-node={args.nproc_per_node}",
        f"--node-rank={args.node_rank}",
        f"--master-addr={args.master_addr}",
        f"--master-port={args.master_port}",
        "--max-restarts=0",  # the Job restarts the whole group; no in-pod restarts
        # On SIGTERM torchrun forwards the signal and waits this long before SIGKILLing the
        # workers (its default, 30 s, is shorter than an SDXL checkpoint upload).
        f"--shutdown-timeout={shutdown_timeout_seconds()}",
        "--no-python",
        *worker,
    ]
    if args.nnodes == 1:
        torchrun.insert(0, "--standalone")
    prepare_node(args.job)
    try:
        run(parse_args(torchrun))
    except ChildFailedError as exc:
        return exit_code_of(exc.failures)
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0


def prepare_node(job_path: str) -> None:
    """Fill this node's model cache (a tiny model built, an s3:// base downloaded) before any
    worker starts. Inside the process group, transformers' `save_pretrained` writes nothing on
    a global rank other than 0, so node 1's workers could never build their own copy; and one
    builder per node avoids racing on the cache. Problems are left to the workers, which
    report them in progress.json with the right exit code."""
    from kubedream_operator.spec import SpecError, load_job

    from .errors import TrainerError
    from .models import resolve_model_dir
    from .storage import StorageError

    try:
        job = load_job(job_path)
        resolve_model_dir(job.spec.model.base, job.spec.storage, job.spec.model.family)
    except (SpecError, TrainerError, StorageError, OSError):
        return


def exit_code_of(failures: dict[int, Any]) -> int:
    """One code for the group: a permanent one if any rank had it; 76 (peer stopped) only
    when every failed rank had it (the Job ignores 76, so a crash beside it must win); else
    the first passed-through code (4 storage, 75 lease, 143 interrupted); else 1 (a crash, a
    signal, a lost peer)."""
    codes = [int(failures[rank].exitcode) for rank in sorted(failures)]
    for code in codes:
        if code in PERMANENT_CODES:
            return code
    if all(code == PEER_STOPPED for code in codes):
        return PEER_STOPPED
    for code in codes:
        if code in PASSED_THROUGH and code != PEER_STOPPED:
            return code
    for rank in sorted(failures):
        code = int(failures[rank].exitcode)
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            print(f"kubedream: training process {rank} was killed by {name}", file=sys.stderr)
    return 1


# --- debug record ------------------------------------------------------------------------


def record_step(rank: int, step: int, epoch: int, indices: list[list[int]], loss: float) -> None:
    """With KUBEDREAM_DEBUG_BATCHES set, append one JSON line per optimizer step for this rank."""
    folder = os.environ.get("KUBEDREAM_DEBUG_BATCHES")
    if not folder:
        return
    path = Path(folder) / f"rank-{rank}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    line = {
        "rank": rank,
        "pid": os.getpid(),
        "step": step,
        "epoch": epoch,
        "indices": indices,
        "loss": loss,
    }
    with path.open("a") as fh:
        fh.write(json.dumps(line) + "\n")


def shared_choice(pick: Callable[[], T]) -> T:
    """Rank 0's `pick()`, on every rank (`pick` runs on each rank; only rank 0's result counts)."""
    value = pick()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
