"""The trainer's own log, kept beside its output: what it said on stderr during a run is
uploaded to `<output>/logs/<start time>-rank<N>-<random>.log` when the run ends (finished, failed or
stopped by SIGTERM), so a pod's story survives the pod. A process killed outright (SIGKILL,
out of memory) uploads nothing; its last words are in the pod's log only.

Only stderr is kept (our messages, warnings, the failure); the JSON progress lines on stdout
are already mirrored in progress.json, and progress-bar redraws are skipped.
"""

from __future__ import annotations

import io
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from .storage import Storage, StorageError

LOG_PREFIX = "logs"
MAX_BYTES = 8 << 20
"""Past this much text the copy stops (the pod's log still has everything)."""


class _Tee(io.TextIOBase):
    """Writes go to the real stream and, except bar redraws, to a copy."""

    def __init__(self, real: TextIO, copy: io.StringIO) -> None:
        self.real = real
        self.copy = copy

    def write(self, text: str) -> int:
        self.real.write(text)
        if "\r" not in text and self.copy.tell() < MAX_BYTES:
            self.copy.write(text)
        return len(text)

    def flush(self) -> None:
        self.real.flush()

    def isatty(self) -> bool:
        return self.real.isatty()

    def fileno(self) -> int:
        return self.real.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.real.encoding


@contextmanager
def captured_stderr() -> Iterator[io.StringIO]:
    """Copy everything written to sys.stderr inside the block into the yielded buffer."""
    copy = io.StringIO()
    real = sys.stderr
    sys.stderr = _Tee(real, copy)
    try:
        yield copy
    finally:
        sys.stderr = real


def log_key(rank: int, started: float) -> str:
    """`logs/20261125T221628Z-rank0-1a2b3c4d.log`: one file per run and rank, sorted by start
    time, never overwritten (two runs may start in the same second)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    return f"{LOG_PREFIX}/{stamp}-rank{rank}-{uuid.uuid4().hex[:8]}.log"


def upload_log(output: Storage, text: str, rank: int, started: float) -> None:
    """Best effort: a log that cannot be written is reported, never fails the run."""
    try:
        output.write_bytes(log_key(rank, started), text.encode())
    except (StorageError, OSError) as exc:
        print(f"kubedream: could not write the run's log to the output: {exc}", file=sys.stderr)
