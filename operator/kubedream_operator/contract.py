"""What the operator and the trainer agree on: names, paths, exit codes and progress.json.

`render` writes these into the trainer pods and `status` reads them back; the trainer's
`kubedream train` honours them. Keep this module free of kopf and Kubernetes clients so both
sides can import it.

Exit codes of `kubedream train` are the trainer's (`kubedream_trainer.errors.ExitCode`,
docs/trainer.md); what the Job does with each is decided here:

- FailJob at once (no retry can help): INVALID_JOB and USAGE (2), DIVERGED (3). Exit code 1
  is also what Python exits with on an uncaught exception and what a worker that lost its
  process group exits with, so 1 must stay retryable: a crash, a CUDA fault or one lost rank
  of a multi-node job is worth a retry from the last checkpoint.
- Ignore (no retry counted): any exit of a pod with the `DisruptionTarget` condition
  (preemption, eviction, node drain, taint manager). The trainer checkpoints on SIGTERM
  and exits 143; the replacement resumes. Also PEER_STOPPED (76): the other pods of a
  multi-node job whose one pod got the SIGTERM stop with it at the same step and exit 76;
  the pod that got the signal is the one that counts (or is a disruption), so evicting one
  pod of a group costs no retry at all.
- Everything else counts against `runPolicy.backoffLimit` and is retried: 1, STORAGE (4),
  OUTPUT_LOCKED (75), 137 (SIGKILL, usually out of memory), a plain 143.

`kubedream train` under torchrun exits with its workers' code where it means the same for
the group (`kubedream_trainer.distributed.exit_code_of`), so these rules hold for
multi-process pods too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubedream_trainer.errors import ExitCode

EXIT_CRASH = 1
"""Python's exit code for an uncaught exception, and torchrun's for any failed worker."""
EXIT_SIGKILL = 137

PERMANENT_EXIT_CODES: tuple[int, ...] = tuple(
    sorted({int(ExitCode.INVALID_JOB), int(ExitCode.USAGE), int(ExitCode.DIVERGED)} - {EXIT_CRASH})
)
"""Trainer exit codes that fail the Job at once (the Job's podFailurePolicy, FailJob)."""

IGNORED_EXIT_CODES: tuple[int, ...] = (int(ExitCode.PEER_STOPPED),)
"""Trainer exit codes the Job does not count as failures (podFailurePolicy, Ignore)."""


def exit_meaning(code: int) -> str | None:
    """A few words on what a trainer exit code means, e.g. 143 -> "interrupted"."""
    if code == EXIT_SIGKILL:
        return "killed, often out of memory"
    if code == EXIT_CRASH:  # no ExitCode of the trainer's: Python's and torchrun's own
        return "a crash, or a failed worker"
    try:
        name = ExitCode(code).name
    except ValueError:
        return None
    return name.lower().replace("_", " ")


CONTAINER_NAME = "trainer"
CONFIG_DIR = "/etc/kubedream"
JOB_FILE = "job.yaml"
JOB_PATH = f"{CONFIG_DIR}/{JOB_FILE}"
CACHE_DIR = "/var/cache/kubedream"
MASTER_PORT = 29500

FIELD_MANAGER = "kubedream-operator"

LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_JOB = "kubedream.io/job"
APP_NAME = "kubedream"

PROGRESS_FILE = "progress.json"
"""Written by the trainer under `spec.output.uri`, read by the operator every status interval."""

# progress.json keys (camelCase, like the spec). The operator also accepts snake_case.
PROGRESS_KEYS = (
    "epoch",  # current epoch, 1-based
    "totalEpochs",
    "step",  # optimizer steps done
    "totalSteps",
    "loss",
    "imagesPerSecond",
    "lastCheckpoint",  # URI of the newest committed checkpoint
    "checkpoints",  # URIs of the kept committed checkpoints, oldest first
    "worldSize",
)


def config_map_name(job_name: str) -> str:
    """The ConfigMap holding the job's `job.yaml`."""
    return f"{job_name}-spec"


def progress_value(progress: Mapping[str, Any], key: str) -> Any:
    """`progress[key]`, accepting the snake_case spelling too (`totalEpochs` or `total_epochs`)."""
    if key in progress:
        return progress[key]
    snake = "".join(f"_{c.lower()}" if c.isupper() else c for c in key)
    return progress.get(snake)
