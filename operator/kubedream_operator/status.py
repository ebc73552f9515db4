"""Derive a FineTuneJob's status from what is observed. Pure functions, no API calls.

The handlers call `derive_status` every status interval with what they just read: the
trainer Job (or None), its pods, the trainer's progress.json (or None) and the spec's
validation problems. The result depends on those observations only; the previous status is
consulted for two things alone: keeping a condition's lastTransitionTime while its status
stays the same, and remembering a finished phase after `ttlSecondsAfterFinished` deleted
the Job (then nothing else is left to observe).

`status_patch` turns the derived status into the smallest merge patch against the current
one, so an unchanged job costs no write.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from . import contract
from .spec import FineTuneJobSpec


class Phase(StrEnum):
    """The one-word state of a FineTuneJob (`status.phase`)."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


TERMINAL = (Phase.SUCCEEDED, Phase.FAILED)
CONDITION_TYPES = ("Created", "Running", "Succeeded", "Failed", "Suspended")
INVALID_SPEC = "InvalidSpec"

PROGRESS_FIELDS = (
    "epoch",
    "totalEpochs",
    "step",
    "totalSteps",
    "loss",
    "imagesPerSecond",
    "lastCheckpoint",
    "checkpoints",
    "progress",
)
"""Status fields that come from progress.json; left untouched while it cannot be read."""

MANAGED_FIELDS = (
    "phase",
    "conditions",
    "message",
    "startTime",
    "completionTime",
    "restarts",
    "worldSize",
    "observedGeneration",
    *PROGRESS_FIELDS,
)
"""Every status field the operator owns (kopf keeps its own state under status.kopf)."""

_MESSAGE_LIMIT = 1024


@dataclass(frozen=True)
class Observed:
    """Everything one status derivation looks at."""

    generation: int | None = None
    """metadata.generation of the FineTuneJob."""
    spec: FineTuneJobSpec | None = None
    """The parsed spec; None when it is invalid."""
    problems: Sequence[str] = ()
    """Validation problems (`spec.x.y: message`); non-empty means the spec is invalid."""
    rejected: tuple[str, str] | None = None
    """(reason, message) when the API server refused a child for good (e.g. NameConflict)."""
    job: Mapping[str, Any] | None = None
    """The trainer Job as read from the API, or None when there is none."""
    pods: Sequence[Mapping[str, Any]] = ()
    """The Job's pods as read from the API."""
    progress: Mapping[str, Any] | None = None
    """The parsed progress.json, or None when the trainer has not written one yet."""
    progress_known: bool = True
    """False when progress.json could not be read (a storage hiccup): progress fields stay as they are."""
    previous: Mapping[str, Any] = field(default_factory=dict)
    """The current `status` (for transition times and a finished phase whose Job is gone)."""
    ended_unseen: bool = False
    """The Job is gone but this generation's trainer ended (`ended_unseen`)."""


def finished(previous: Mapping[str, Any], generation: int | None) -> bool:
    """Whether this generation already ended (Succeeded or Failed).

    Then a missing Job is not re-created - `ttlSecondsAfterFinished` or a person deleted it
    after the end - and progress.json, final by now, is not read again.
    """
    return (
        previous.get("phase") in {p.value for p in TERMINAL}
        and previous.get("observedGeneration") == generation
    )


def ended_unseen(
    previous: Mapping[str, Any],
    generation: int | None,
    name: str,
    progress: Mapping[str, Any] | None,
) -> bool:
    """Whether this generation's Job already ran to the end but was deleted (a short
    `ttlSecondsAfterFinished`) before a status tick saw it finish: this generation's status
    says it was started, and the trainer of this job says Succeeded in progress.json. Then the
    Job is not created again."""
    return (
        bool(previous.get("phase"))
        and previous.get("observedGeneration") == generation
        and progress is not None
        and progress.get("phase") == "Succeeded"
        and progress.get("job") == name
    )


def timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with second precision, as Kubernetes writes times."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _true_condition(obj: Mapping[str, Any] | None, *types: str) -> Mapping[str, Any] | None:
    for condition in ((obj or {}).get("status") or {}).get("conditions") or ():
        if condition.get("type") in types and condition.get("status") == "True":
            return condition
    return None


def _clip(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _MESSAGE_LIMIT else "…" + text[-(_MESSAGE_LIMIT - 1) :]


def _trainer_termination(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or ():
        if status.get("name") == contract.CONTAINER_NAME:
            terminated = (status.get("state") or {}).get("terminated")
            if terminated:
                return dict(terminated)
    return None


def _pod_name(pod: Mapping[str, Any]) -> str:
    return str((pod.get("metadata") or {}).get("name", "?"))


def failure_detail(pods: Sequence[Mapping[str, Any]]) -> str | None:
    """Why the newest failed pod failed: exit code, its meaning and the trainer's last words."""
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    if not failed:
        return None

    def finished_at(pod: Mapping[str, Any]) -> str:
        return str((_trainer_termination(pod) or {}).get("finishedAt") or "")

    pod = max(failed, key=finished_at)
    if _true_condition(pod, "DisruptionTarget"):
        reason = (_true_condition(pod, "DisruptionTarget") or {}).get("reason", "Disruption")
        return f"pod {_pod_name(pod)} was disrupted ({reason}); it is replaced without counting as a failure"
    terminated = _trainer_termination(pod)
    if not terminated:
        reason = (pod.get("status") or {}).get("reason") or "unknown reason"
        return f"pod {_pod_name(pod)} failed: {reason}"
    code = terminated.get("exitCode")
    meaning = contract.exit_meaning(code) if isinstance(code, int) else None
    text = f"pod {_pod_name(pod)}: trainer exited with code {code}" + (
        f" ({meaning})" if meaning else ""
    )
    last_words = str(terminated.get("message") or "").strip()
    if last_words:
        text += ": " + last_words.splitlines()[-1]
    return text


def waiting_detail(pods: Sequence[Mapping[str, Any]]) -> str | None:
    """Why a pod is not running yet: unschedulable, pulling an image, a missing Secret…"""
    for pod in pods:
        status = pod.get("status") or {}
        for condition in status.get("conditions") or ():
            if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                return _why(
                    pod, condition.get("reason") or "Unschedulable", condition.get("message")
                )
        for container in status.get("containerStatuses") or ():
            waiting = (container.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") not in (None, "ContainerCreating", "PodInitializing"):
                return _why(pod, waiting["reason"], waiting.get("message"))
    return None


def _why(pod: Mapping[str, Any], reason: str, message: str | None) -> str:
    return f"pod {_pod_name(pod)}: {reason}" + (f": {message}" if message else "")


def trainer_message(progress: Mapping[str, Any] | None) -> str | None:
    """What the trainer wrote into progress.json when it failed (it says what to fix)."""
    if not progress or progress.get("phase") != "Failed":
        return None
    message = progress.get("message")
    return str(message).strip() or None if message else None


def _counts_as_failure(pod: Mapping[str, Any]) -> bool:
    """A Failed pod the Job's podFailurePolicy does not ignore: not a disruption, and not a
    rank that stopped with its group (`contract.IGNORED_EXIT_CODES`)."""
    if (pod.get("status") or {}).get("phase") != "Failed":
        return False
    if _true_condition(pod, "DisruptionTarget"):
        return False
    code = (_trainer_termination(pod) or {}).get("exitCode")
    return code not in contract.IGNORED_EXIT_CODES


def restarts(job: Mapping[str, Any] | None, pods: Sequence[Mapping[str, Any]]) -> int:
    """Trainer pods that failed and counted (what the backoff limit counts): the failed pods
    still listed, or the Job's count if that is higher. Disruptions and ranks stopped with
    their group are replaced without counting, and are not restarts here either."""
    listed = sum(1 for p in pods if _counts_as_failure(p))
    counted = int(((job or {}).get("status") or {}).get("failed") or 0)
    return max(listed, counted)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: Any, digits: int) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return round(float(value), digits)


def progress_fields(
    progress: Mapping[str, Any] | None, spec: FineTuneJobSpec | None
) -> dict[str, Any]:
    """Status fields from progress.json, with totals from the spec where the trainer gives none.

    Values of the wrong type are dropped rather than copied: progress.json is input, not trust.
    """
    p = progress or {}
    training = spec.training if spec else None
    epoch = _int(contract.progress_value(p, "epoch"))
    total_epochs = _int(contract.progress_value(p, "totalEpochs")) or (
        training.epochs if training else None
    )
    step = _int(contract.progress_value(p, "step"))
    total_steps = _int(contract.progress_value(p, "totalSteps")) or (
        training.max_steps if training else None
    )
    checkpoints = contract.progress_value(p, "checkpoints")
    last = contract.progress_value(p, "lastCheckpoint")
    text = None
    if epoch is not None and total_epochs:
        text = f"epoch {epoch}/{total_epochs}"
    elif step is not None and total_steps:
        text = f"step {step}/{total_steps}"
    elif step is not None:
        text = f"step {step}"
    return {
        "epoch": epoch,
        "totalEpochs": total_epochs if progress is not None else None,
        "step": step,
        "totalSteps": total_steps if progress is not None else None,
        "loss": _float(contract.progress_value(p, "loss"), 6),
        "imagesPerSecond": _float(contract.progress_value(p, "imagesPerSecond"), 2),
        "lastCheckpoint": last if isinstance(last, str) and last else None,
        "checkpoints": [c for c in checkpoints if isinstance(c, str)]
        if isinstance(checkpoints, list)
        else None,
        "progress": text,
    }


@dataclass(frozen=True)
class _Verdict:
    phase: Phase
    reason: str
    message: str
    created: bool


def _verdict(observed: Observed) -> _Verdict:
    job, pods = observed.job, observed.pods
    if observed.problems:
        return _Verdict(
            Phase.FAILED, INVALID_SPEC, "spec is invalid: " + "; ".join(observed.problems), False
        )
    if observed.rejected:
        reason, message = observed.rejected
        return _Verdict(Phase.FAILED, reason, _clip(message), job is not None)
    if job is None:
        previous = observed.previous.get("phase")
        same_generation = observed.previous.get("observedGeneration") == observed.generation
        if previous in {p.value for p in TERMINAL} and same_generation:
            return _Verdict(
                Phase(previous),
                "JobDeleted",
                f"{previous}; the trainer Job was deleted afterwards (ttlSecondsAfterFinished or by hand)",
                True,
            )
        if observed.ended_unseen:
            return _Verdict(
                Phase.SUCCEEDED,
                "JobDeleted",
                "training finished (progress.json says Succeeded); the trainer Job was deleted "
                "before the operator saw it end (ttlSecondsAfterFinished)",
                True,
            )
        return _Verdict(
            Phase.PENDING, "JobNotCreated", "waiting for the trainer Job to be created", False
        )

    done = _true_condition(job, "Complete", "SuccessCriteriaMet")
    if done:
        return _Verdict(
            Phase.SUCCEEDED,
            "Completed",
            "training finished; the final checkpoint is committed",
            True,
        )
    failed = _true_condition(job, "Failed", "FailureTarget")
    if failed:
        detail = failure_detail(pods)
        message = str(failed.get("message") or "the trainer Job failed")
        said = trainer_message(observed.progress)
        if said:
            message = f"{message}. Trainer: {said}"
        return _Verdict(
            Phase.FAILED,
            str(failed.get("reason") or "JobFailed"),
            _clip(f"{message}. {detail}" if detail else message),
            True,
        )
    if (job.get("spec") or {}).get("suspend"):
        stopping = [
            p for p in pods if (p.get("status") or {}).get("phase") in ("Pending", "Running")
        ]
        message = "suspended; unsuspend to resume from the last checkpoint"
        if stopping:
            message = (
                f"suspending: {len(stopping)} pod(s) still stopping (writing a final checkpoint)"
            )
        return _Verdict(Phase.SUSPENDED, "Suspended", message, True)
    running = [
        p
        for p in pods
        if (p.get("status") or {}).get("phase") == "Running"
        and not (p.get("metadata") or {}).get("deletionTimestamp")
    ]
    if running:
        wanted = (job.get("spec") or {}).get("parallelism") or len(running)
        message = f"{len(running)}/{wanted} trainer pod(s) running"
        detail = failure_detail(pods)
        if detail:
            message += f"; last failure: {detail}"
        return _Verdict(Phase.RUNNING, "PodsRunning", _clip(message), True)
    detail = waiting_detail(pods) or failure_detail(pods)
    return _Verdict(
        Phase.PENDING, "PodsPending", _clip(detail or "waiting for the trainer pods to start"), True
    )


def _conditions(
    verdict: _Verdict, previous: Sequence[Mapping[str, Any]], now: str
) -> list[dict[str, Any]]:
    earlier = {c.get("type"): c for c in previous if isinstance(c, Mapping)}
    true_type = {
        Phase.RUNNING: "Running",
        Phase.SUCCEEDED: "Succeeded",
        Phase.FAILED: "Failed",
        Phase.SUSPENDED: "Suspended",
    }.get(verdict.phase)
    out = []
    for kind in CONDITION_TYPES:
        if kind == "Created":
            is_true = verdict.created
            reason = "JobCreated" if is_true else verdict.reason
            message = "the trainer Job was created" if is_true else verdict.message
        else:
            # True or False, a phase condition says why things are as they are (the same reason).
            is_true = kind == true_type
            reason = verdict.reason
            message = verdict.message if is_true else ""
        status = "True" if is_true else "False"
        before = earlier.get(kind) or {}
        since = before.get("lastTransitionTime") if before.get("status") == status else None
        condition = {
            "type": kind,
            "status": status,
            "reason": reason,
            "lastTransitionTime": since or now,
        }
        if message:
            condition["message"] = message
        out.append(condition)
    return out


def derive_status(observed: Observed, now: datetime) -> dict[str, Any]:
    """Every managed status field; None means "absent". Progress fields are left out when unknown."""
    verdict = _verdict(observed)
    job_status = (observed.job or {}).get("status") or {}
    completion = job_status.get("completionTime")
    if verdict.phase is Phase.FAILED and not completion:
        failed = _true_condition(observed.job, "Failed")
        completion = failed.get("lastTransitionTime") if failed else None
    if observed.job is None and verdict.phase in TERMINAL:
        # The Job is gone; its times live on only in the status we wrote.
        start, completion = (
            observed.previous.get("startTime"),
            observed.previous.get("completionTime"),
        )
    else:
        start = job_status.get("startTime")
    if verdict.reason == INVALID_SPEC:
        start = completion = None
    status: dict[str, Any] = {
        "phase": verdict.phase.value,
        "conditions": _conditions(
            verdict, observed.previous.get("conditions") or (), timestamp(now)
        ),
        "message": verdict.message,
        "startTime": start,
        "completionTime": completion,
        "restarts": restarts(observed.job, observed.pods) if observed.job is not None else None,
        "worldSize": (
            observed.spec.resources.nodes * max(observed.spec.resources.gpus_per_node, 1)
            if observed.spec
            else None
        ),
        "observedGeneration": observed.generation,
    }
    if verdict.reason == INVALID_SPEC:
        status.update(dict.fromkeys(PROGRESS_FIELDS))
    elif observed.progress_known:
        status.update(progress_fields(observed.progress, observed.spec))
    if observed.job is None and verdict.phase in TERMINAL:
        status["restarts"] = observed.previous.get("restarts")
    return status


def status_patch(current: Mapping[str, Any] | None, derived: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch for `status`: changed fields, with None deleting a field that is gone."""
    current = current or {}
    return {key: value for key, value in derived.items() if current.get(key) != value}


@dataclass(frozen=True)
class PhaseEvent:
    """A Kubernetes Event to post on a phase transition."""

    type: str
    """Normal or Warning."""
    reason: str
    message: str


def phase_event(previous_phase: str | None, status: Mapping[str, Any]) -> PhaseEvent | None:
    """The Event announcing a new phase, or None when the phase did not change."""
    phase = status.get("phase")
    if not phase or phase == previous_phase:
        return None
    # Every condition but Created carries the reason of the current phase.
    reasons = [
        c.get("reason") for c in status.get("conditions") or () if c.get("type") != "Created"
    ]
    reason = str(reasons[0] if reasons and reasons[0] else phase)
    message = f"{phase}: {status.get('message') or ''}".rstrip(": ")
    return PhaseEvent("Warning" if phase == Phase.FAILED.value else "Normal", reason, message)
