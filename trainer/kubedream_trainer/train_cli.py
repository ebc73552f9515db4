"""`kubedream train JOB.yaml [--device D]`: run a FineTuneJob's training locally or in a pod.

Loads and validates the job, opens the session (Accelerator, output lease), runs the loop
and turns every ending into a message and an exit code (`errors.ExitCode`, documented in
docs/trainer.md): 0 finished, 1 a crash (retryable), 2 the job must be fixed, 3 diverged, 4 storage, 75 output
held by another trainer, 143/130 stopped by SIGTERM/SIGINT with a committed checkpoint.
A failure after the lease is taken is also written to progress.json (phase Failed), so the
operator can show it. Called by `kubedream_trainer.cli`.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import time

from kubedream_operator.spec import FineTuneJob, SpecError, load_job

from .config import TrainerEnv
from .distributed import PeerLostError, is_peer_loss, launch, peer_lost, wants_launch
from .errors import ExitCode, OutputError, OutputLockedError, TrainerError
from .preflight import check_output
from .progress import Phase, Progress
from .runlog import captured_stderr, upload_log
from .signals import StopRequest
from .storage import StorageError


def _quiet_libraries() -> None:
    """Our messages on stderr; library progress bars and chatter off."""
    logging.basicConfig(level=logging.INFO, format="kubedream: %(message)s", stream=sys.stderr)
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


def _fail(progress: Progress, error: TrainerError) -> int:
    """Record the failure in progress.json (best effort) and on stderr. A trainer that lost
    the output lease leaves progress.json to the trainer that holds it now."""
    if isinstance(error, OutputLockedError) or not progress.enabled:
        print(f"kubedream: {error.message}", file=sys.stderr)
        return int(error.exit_code)
    try:
        progress.phase(Phase.FAILED, error.message)
    except (OSError, StorageError) as exc:  # the output is down: stderr is all that is left
        print(f"kubedream: {error.message}", file=sys.stderr)
        print(f"kubedream: could not write progress.json: {exc}", file=sys.stderr)
    return int(error.exit_code)


def _peer_lost(progress: Progress, error: PeerLostError) -> int:
    """Like `_fail`, for a lost peer: say so on stderr and (rank 0) in progress.json."""
    print(f"kubedream: {error.message}", file=sys.stderr)
    if progress.enabled:
        try:
            progress.phase(Phase.FAILED, error.message)
        except (OSError, StorageError) as exc:
            print(f"kubedream: could not write progress.json: {exc}", file=sys.stderr)
    return error.exit_code


def _summary(progress: Progress) -> None:
    record = progress.record
    progress.say(f"checkpoint: {record['lastCheckpoint']}")
    if record["lastSamples"]:
        progress.say(f"samples:    {record['lastSamples']}")


def run(args: argparse.Namespace) -> int:
    """Train the job named by `args.job` on `args.device`; returns the exit code. With more
    than one process asked for (--nproc-per-node, --nnodes), start them through torchrun's
    launcher and return the group's code (`distributed.launch`)."""
    if wants_launch(args):
        try:
            return launch(args)
        except TrainerError as exc:  # the launcher's own settings (environment)
            print(f"kubedream: {exc.message}", file=sys.stderr)
            return int(exc.exit_code)
    try:
        job = load_job(args.job)
    except SpecError as exc:
        print(exc.report(args.job), file=sys.stderr)
        return int(ExitCode.INVALID_JOB)
    started = time.time()
    with captured_stderr() as said:
        return _train(args, job, said, started)


def _train(args: argparse.Namespace, job: FineTuneJob, said: io.StringIO, started: float) -> int:
    """`run` once the job is loaded: everything said on stderr is in `said`, and goes to the
    output's logs/ when the session ends."""
    _quiet_libraries()
    from torch.distributed import DistError

    from .loop import Outcome, train
    from .session import open_session

    stop = StopRequest()
    try:
        check_output(job.spec)
        with (
            stop.installed(),
            open_session(job, getattr(args, "device", None), TrainerEnv.from_environ()) as session,
        ):
            ended = False
            try:
                outcome = train(session, stop)
                ended = True
            except TrainerError as exc:
                ended = True
                return _fail(session.progress, exc)
            except StorageError as exc:
                ended = True
                return _fail(session.progress, OutputError(str(exc)))
            except (DistError, RuntimeError) as exc:  # a collective failed: a rank is gone
                if not is_peer_loss(exc):
                    raise  # a bug: the traceback follows
                ended = True
                return _peer_lost(session.progress, peer_lost(exc))
            finally:
                if not ended:  # a bug or a second Ctrl-C: the traceback follows
                    session.progress.phase(Phase.FAILED, "the trainer crashed; see its log")
                rank = session.accelerator.process_index
                upload_log(session.output, said.getvalue(), rank, started)
    except TrainerError as exc:  # before the session existed (device, lease, environment)
        print(f"kubedream: {exc.message}", file=sys.stderr)
        return int(exc.exit_code)
    except StorageError as exc:
        print(f"kubedream: {exc}", file=sys.stderr)
        return int(ExitCode.STORAGE)
    except PeerLostError as exc:  # the group could not form, or broke outside the loop
        print(f"kubedream: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except (DistError, RuntimeError) as exc:
        if not is_peer_loss(exc):
            raise
        print(f"kubedream: {peer_lost(exc).message}", file=sys.stderr)
        return PeerLostError.exit_code
    if outcome is Outcome.INTERRUPTED:
        if not session.progress.enabled:  # rank 0 said it in progress.json and on stderr
            print(f"kubedream: rank {session.rank} {stop.describe()}", file=sys.stderr)
        return int(stop.exit_code)
    _summary(session.progress)
    return int(ExitCode.SUCCEEDED)
