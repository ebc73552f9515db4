"""What the operator and the trainer agree on: names, paths, exit codes and progress.json.

`render` writes these into the trainer pods and `status` reads them back; the trainer's
`kubedream train` honours them. Keep this module free of kopf and Kubernetes clients so both
sides can import it.

Exit codes of `kubedream train` (the pod's container exit code):

- 0: training finished; the final checkpoint is committed.
- 1: an unexpected error (a bug, a CUDA fault, a storage outage that outlasted the retries).
  Counts against `runPolicy.backoffLimit`; the replacement pod resumes from the newest
  committed checkpoint.
- 2: invalid input that no retry can fix (the spec, the data roots, the base model).
  The Job's podFailurePolicy fails the whole Job at once (`FailJob`), without retries.
  argparse uses 2 for usage errors too, which are just as permanent.
- 143 (128 + SIGTERM): stopped by the kubelet (suspend, preemption, eviction, node drain)
  after writing a final checkpoint. Disruptions carry the pod condition `DisruptionTarget`,
  which the podFailurePolicy ignores (no retry is counted); a plain 143 otherwise counts
  like 1.
- 137 (128 + SIGKILL): killed, usually out of memory. Counts like 1.

Under torchrun (several processes per pod, or several pods) torchrun itself exits 1 when any
worker fails, whatever the worker's own code, so `FailJob` on 2 only takes effect for
single-process pods; elsewhere bad input costs the bounded retries of `backoffLimit`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INVALID_INPUT = 2
EXIT_SIGTERM = 143
EXIT_SIGKILL = 137

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
