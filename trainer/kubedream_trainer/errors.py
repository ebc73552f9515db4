"""Why a training run stops, and the exit code each reason maps to.

The trainer pod's exit code is how the operator (and Kubernetes' pod failure policy) tells a
finished job from a preempted one and a user's mistake from a temporary failure, so the codes
are part of the contract and documented in docs/trainer.md. Raised across the trainer; mapped
to messages and exit codes in `train_cli`.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes of `kubedream train`."""

    SUCCEEDED = 0
    """Training finished (or had already finished) and its final checkpoint is committed."""
    INVALID_JOB = 2
    """The job cannot run as written: spec, model folder or data. The message says what to fix.
    Shares argparse's usage code: both mean "fix the input", and neither may be 1, which is
    what Python exits with on a crash (retryable), so the Job's podFailurePolicy can fail
    the Job at once on 2."""
    USAGE = 2
    """Bad command line (argparse's code); an alias of INVALID_JOB."""
    DIVERGED = 3
    """The loss became NaN or infinite; nothing was saved from the diverged state."""
    STORAGE = 4
    """Reading or writing the output failed, or a checkpoint did not verify after upload."""
    OUTPUT_LOCKED = 75
    """Another live trainer holds the output's lease (EX_TEMPFAIL: try again later)."""
    PEER_STOPPED = 76
    """Under torchrun: another training process (another pod's) was stopped by SIGTERM or
    SIGINT, and this one stopped with it at the same step after the checkpoint was
    committed; starting again resumes. Not counted as a failure by the Job (the pod that got
    the signal is: it exits 143, and is ignored only when it was a disruption)."""
    INTERRUPTED_SIGINT = 130
    """Stopped by SIGINT (Ctrl-C) after committing a checkpoint; starting again resumes."""
    INTERRUPTED = 143
    """Stopped by SIGTERM after committing a checkpoint; starting again resumes."""


class TrainerError(Exception):
    """A failure with a message for the user; `exit_code` says which kind."""

    exit_code = ExitCode.INVALID_JOB

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class JobError(TrainerError):
    """The job cannot run as written (a field, a model file, a data root). Permanent."""

    exit_code = ExitCode.INVALID_JOB


class DivergedError(TrainerError):
    """The loss is not finite. Permanent for this configuration."""

    exit_code = ExitCode.DIVERGED


class OutputError(TrainerError):
    """The output could not be written or read back as expected."""

    exit_code = ExitCode.STORAGE


class OutputLockedError(TrainerError):
    """Another trainer holds the output lease. Temporary."""

    exit_code = ExitCode.OUTPUT_LOCKED
