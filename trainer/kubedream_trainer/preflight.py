"""Start-up checks of every S3 location a job names, before any data is scanned or any
model is loaded on a GPU, and that a local output folder can be written.

Wrong credentials, a missing bucket or an empty prefix are the user's mistakes: each is a
`JobError` (exit 2) whose message names the spec field, the endpoint, the bucket and the
key, and all of them are reported at once. An endpoint that cannot be reached is retried
for `PREFLIGHT_BUDGET_S` seconds and then is a `StorageError` (exit 4, temporary: the pod
is retried). Local inputs are checked where they are used (the scanner, `models`).

`check_output` runs in `train_cli` before the session opens (the output must be readable
to take its lease); `check_inputs` runs first thing in `loop.train`, so a failure is also
recorded in progress.json.
"""

from __future__ import annotations

import os
from pathlib import Path

from kubedream_operator.spec import TINY_MODEL, TINY_SDXL_MODEL, FineTuneJobSpec

from .errors import JobError
from .storage import StorageAccessError, is_s3_uri
from .storage.retry import RetryPolicy

INDEX = "model_index.json"
PREFLIGHT_BUDGET_S = 20.0
"""How long the checks retry an unreachable endpoint before giving up."""


def _retry() -> RetryPolicy:
    return RetryPolicy(budget_s=min(PREFLIGHT_BUDGET_S, RetryPolicy().budget_s))


def _check(uri: str, settings: object, require: str | None) -> str | None:
    """The problem with one s3:// location, or None."""
    from .storage.s3 import S3Storage

    try:
        S3Storage(uri, settings, retry=_retry()).check_access(require)
    except StorageAccessError as exc:
        return str(exc)
    return None


def check_output(spec: FineTuneJobSpec) -> None:
    """JobError when spec.output.uri is on S3 and its bucket is missing or not accessible, or
    is a local folder that cannot be created or written."""
    if is_s3_uri(spec.output.uri):
        problem = _check(spec.output.uri, spec.storage, None)
        if problem:
            raise JobError(f"spec.output.uri: {problem}")
    else:
        _check_local_output(Path(spec.output.uri).expanduser())


def _check_local_output(folder: Path) -> None:
    """The folder, or the nearest part of its path that exists, must be a writable folder.
    Nothing is created here: a job that fails a later start-up check leaves no trace."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    reason = None
    if not existing.is_dir():
        reason = f"{str(existing)!r} is not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        reason = f"{str(existing)!r} is not writable by this user"
    if reason:
        raise JobError(
            f"spec.output.uri: cannot write to the local folder {str(folder)!r} ({reason}); "
            "point it at a folder this user can create and write"
        )


def check_inputs(spec: FineTuneJobSpec) -> None:
    """JobError listing every S3 data root that is empty or inaccessible, and an S3 base model
    without model_index.json."""
    problems = []
    for i, root in enumerate(spec.data.roots):
        if is_s3_uri(root.uri):
            problem = _check(root.uri, spec.storage, "")
            if problem:
                problems.append(f"spec.data.roots[{i}].uri: {problem}")
    base = spec.model.base
    if base not in (TINY_MODEL, TINY_SDXL_MODEL) and is_s3_uri(base):
        problem = _check(base, spec.storage, INDEX)
        if problem:
            problems.append(f"spec.model.base: {problem}")
    if problems:
        raise JobError("; ".join(problems))
