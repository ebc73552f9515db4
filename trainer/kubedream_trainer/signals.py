"""Graceful stop on SIGTERM (Kubernetes eviction, preemption, suspend) and SIGINT (Ctrl-C).

The handler only sets a flag. The loop checks it after every optimizer step, commits a
checkpoint and exits with 143 (SIGTERM) or 130 (SIGINT), never 0, so the pod is not taken
for a finished job. A second signal of the same kind falls through to Python's default
(SIGINT: KeyboardInterrupt) for an impatient user. Under torchrun every rank checks the
flag through an all-reduce, so all ranks stop at the same step; a rank that got no signal
itself exits 76 (PEER_STOPPED), which the Job does not count as a failure: evicting one pod
of a multi-node job costs none of its backoff limit. Used by `train_cli`/`loop`.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import torch
from accelerate import Accelerator

from .errors import ExitCode


class StopRequest:
    """Set by a signal handler; read by the loop."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.lease_lost = False
        """Set by `agreed`: some rank reported that the output's lease was taken over."""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum == signum:
            signal.signal(
                signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler
            )
            signal.raise_signal(signum)
            return
        self.signum = signum

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        """Install the handlers for the duration (main thread only; elsewhere a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {
            sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def agreed(self, accelerator: Accelerator, lease_lost: bool = False) -> bool:
        """Whether any rank was asked to stop, or lost the output's lease (`lease_lost` is
        then set): one all-reduce under torchrun, so every rank stops at the same step."""
        if accelerator.num_processes == 1:
            self.lease_lost = lease_lost
            return self.requested or lease_lost
        flags = torch.tensor([float(self.requested), float(lease_lost)], device=accelerator.device)
        total = accelerator.reduce(flags, "sum")
        self.lease_lost = bool(total[1].item() > 0)
        return bool(total[0].item() > 0) or self.lease_lost

    @property
    def exit_code(self) -> ExitCode:
        """130 (SIGINT) or 143 (SIGTERM) for the process that got the signal; 76 for one that
        stopped only because another rank did."""
        if self.signum is None:
            return ExitCode.PEER_STOPPED
        return ExitCode.INTERRUPTED_SIGINT if self.signum == signal.SIGINT else ExitCode.INTERRUPTED

    def describe(self) -> str:
        """What stopped the run, for the log and progress.json."""
        if self.signum is None:
            return "stopped with another training process that got a stop signal"
        return f"stopped by signal {self.signum}"
