"""Status derivation: each phase from what is observed, conditions, progress and patches."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from kubedream_operator.spec import FineTuneJobSpec, parse_spec
from kubedream_operator.status import (
    MANAGED_FIELDS,
    PROGRESS_FIELDS,
    Observed,
    derive_status,
    finished,
    phase_event,
    progress_fields,
    status_patch,
)

from .helpers import minimal_spec

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
LATER = NOW + timedelta(minutes=5)


def job(
    *, suspend: bool = False, conditions: list[dict[str, Any]] | None = None, **status: Any
) -> dict[str, Any]:
    return {
        "metadata": {"name": "j", "namespace": "ns", "uid": "job-uid"},
        "spec": {"parallelism": 1, "suspend": suspend},
        "status": {"conditions": conditions or [], **status},
    }


def pod(phase: str, name: str = "j-0-abcde", **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {"phase": phase, **status}}


def terminated(
    code: int, message: str = "", finished_at: str = "2025-01-02T03:00:00Z"
) -> dict[str, Any]:
    return {
        "containerStatuses": [
            {
                "name": "trainer",
                "state": {
                    "terminated": {"exitCode": code, "message": message, "finishedAt": finished_at}
                },
            }
        ]
    }


def derive(
    spec: FineTuneJobSpec | None = None, now: datetime = NOW, **kwargs: Any
) -> dict[str, Any]:
    kwargs.setdefault("generation", 1)
    return derive_status(Observed(spec=spec, **kwargs), now)


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def true_conditions(status: dict[str, Any]) -> set[str]:
    return {c["type"] for c in status["conditions"] if c["status"] == "True"}


def test_invalid_spec_fails_with_the_field_paths() -> None:
    status = derive(
        problems=["spec.training: set epochs or maxSteps (or both)", "spec.x: unknown field"]
    )
    assert status["phase"] == "Failed"
    failed = conditions(status)["Failed"]
    assert failed["reason"] == "InvalidSpec"
    assert "spec.training: set epochs or maxSteps (or both)" in failed["message"]
    assert "spec.x: unknown field" in status["message"]
    assert true_conditions(status) == {"Failed"}
    assert conditions(status)["Created"]["status"] == "False"
    assert status["observedGeneration"] == 1
    assert all(status[f] is None for f in PROGRESS_FIELDS)


def test_pending_without_job(spec: FineTuneJobSpec) -> None:
    status = derive(spec)
    assert status["phase"] == "Pending"
    assert true_conditions(status) == set()
    assert conditions(status)["Created"]["reason"] == "JobNotCreated"
    assert status["worldSize"] == 1
    assert status["restarts"] is None


def test_pending_with_job_but_no_running_pod_says_why(spec: FineTuneJobSpec) -> None:
    waiting = pod(
        "Pending",
        containerStatuses=[
            {
                "name": "trainer",
                "state": {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}},
            }
        ],
    )
    status = derive(spec, job=job(active=1), pods=[waiting])
    assert status["phase"] == "Pending"
    assert true_conditions(status) == {"Created"}
    assert status["message"] == "pod j-0-abcde: ImagePullBackOff: no such image"


def test_unschedulable_pod_is_explained(spec: FineTuneJobSpec) -> None:
    unschedulable = pod(
        "Pending",
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes have GPUs",
            }
        ],
    )
    status = derive(spec, job=job(), pods=[unschedulable])
    assert status["message"] == "pod j-0-abcde: Unschedulable: 0/3 nodes have GPUs"


def test_running(spec: FineTuneJobSpec) -> None:
    status = derive(
        spec, job=job(startTime="2025-01-02T03:00:00Z", active=1), pods=[pod("Running")]
    )
    assert status["phase"] == "Running"
    assert true_conditions(status) == {"Created", "Running"}
    assert status["startTime"] == "2025-01-02T03:00:00Z"
    assert status["completionTime"] is None
    assert status["restarts"] == 0
    assert status["message"] == "1/1 trainer pod(s) running"


def test_terminating_pod_is_not_running(spec: FineTuneJobSpec) -> None:
    leaving = pod("Running")
    leaving["metadata"]["deletionTimestamp"] = "2025-01-02T03:00:00Z"
    assert derive(spec, job=job(), pods=[leaving])["phase"] == "Pending"


def test_restarts_count_failed_pods(spec: FineTuneJobSpec) -> None:
    pods = [
        pod("Failed", "j-0-aaaaa", **terminated(1, "Traceback...\nRuntimeError: CUDA error")),
        pod("Running", "j-0-bbbbb"),
    ]
    status = derive(spec, job=job(failed=1), pods=pods)
    assert status["restarts"] == 1
    assert status["phase"] == "Running"
    assert (
        "last failure: pod j-0-aaaaa: trainer exited with code 1 (a crash, or a failed worker): RuntimeError: CUDA error"
        in status["message"]
    )
    # Failed pods the Job controller already removed still count through job.status.failed.
    assert derive(spec, job=job(failed=3), pods=pods)["restarts"] == 3


def test_restarts_leave_out_what_the_backoff_limit_does_not_count(spec: FineTuneJobSpec) -> None:
    """An evicted pod (DisruptionTarget) and a rank that stopped with its group (exit 76) are
    replaced without counting against the backoff limit: not restarts either."""
    disrupted = pod("Failed", "j-0-aaaaa", **terminated(143))
    disrupted["status"]["conditions"] = [
        {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}
    ]
    pods = [
        disrupted,
        pod("Failed", "j-1-bbbbb", **terminated(76)),
        pod("Running", "j-0-ccccc"),
        pod("Running", "j-1-ddddd"),
    ]
    assert derive(spec, job=job(failed=0), pods=pods)["restarts"] == 0
    pods.append(pod("Failed", "j-1-eeeee", **terminated(1)))
    assert derive(spec, job=job(failed=1), pods=pods)["restarts"] == 1


def test_succeeded(spec: FineTuneJobSpec) -> None:
    complete = job(
        conditions=[
            {"type": "Complete", "status": "True", "lastTransitionTime": "2025-01-02T04:00:00Z"}
        ],
        startTime="2025-01-02T03:00:00Z",
        completionTime="2025-01-02T04:00:00Z",
        succeeded=1,
    )
    status = derive(spec, job=complete, pods=[pod("Succeeded")])
    assert status["phase"] == "Succeeded"
    assert true_conditions(status) == {"Created", "Succeeded"}
    assert status["completionTime"] == "2025-01-02T04:00:00Z"


def test_failed_by_pod_failure_policy_shows_the_trainers_words(spec: FineTuneJobSpec) -> None:
    failed = job(
        conditions=[
            {
                "type": "Failed",
                "status": "True",
                "reason": "PodFailurePolicy",
                "message": "Container trainer for pod ns/j-0-aaaaa failed with exit code 3 matching FailJob rule at index 1",
                "lastTransitionTime": "2025-01-02T03:30:00Z",
            }
        ]
    )
    pods = [
        pod("Failed", "j-0-aaaaa", **terminated(3, "kubedream: the loss is not finite at step 120"))
    ]
    progress = {
        "phase": "Failed",
        "message": "the loss is not finite at step 120; lower the learning rate",
    }
    status = derive(spec, job=failed, pods=pods, progress=progress)
    assert status["phase"] == "Failed"
    condition = conditions(status)["Failed"]
    assert condition["reason"] == "PodFailurePolicy"
    assert (
        "Trainer: the loss is not finite at step 120; lower the learning rate"
        in condition["message"]
    )
    assert (
        "trainer exited with code 3 (diverged): kubedream: the loss is not finite"
        in condition["message"]
    )
    assert status["completionTime"] == "2025-01-02T03:30:00Z"
    assert true_conditions(status) == {"Created", "Failed"}


def test_failure_target_counts_as_failed(spec: FineTuneJobSpec) -> None:
    target = job(
        conditions=[{"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded"}]
    )
    status = derive(spec, job=target)
    assert status["phase"] == "Failed"
    assert conditions(status)["Failed"]["reason"] == "BackoffLimitExceeded"


def test_disrupted_pod_is_explained(spec: FineTuneJobSpec) -> None:
    evicted = pod(
        "Failed",
        conditions=[
            {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}
        ],
    )
    status = derive(spec, job=job(), pods=[evicted])
    assert status["phase"] == "Pending"
    assert "disrupted (PreemptionByScheduler)" in status["message"]


def test_suspended(spec: FineTuneJobSpec) -> None:
    status = derive(spec, job=job(suspend=True), pods=[])
    assert status["phase"] == "Suspended"
    assert true_conditions(status) == {"Created", "Suspended"}
    assert "resume from the last checkpoint" in status["message"]
    stopping = derive(spec, job=job(suspend=True), pods=[pod("Running")])
    assert stopping["phase"] == "Suspended"
    assert "1 pod(s) still stopping" in stopping["message"]


def test_rejected_child_fails_the_job(spec: FineTuneJobSpec) -> None:
    status = derive(spec, rejected=("NameConflict", "ConfigMap j-spec already exists"))
    assert status["phase"] == "Failed"
    assert conditions(status)["Failed"]["reason"] == "NameConflict"


def test_finished_phase_survives_the_jobs_deletion(spec: FineTuneJobSpec) -> None:
    before = derive(
        spec,
        job=job(
            conditions=[{"type": "Complete", "status": "True"}], completionTime="T1", startTime="T0"
        ),
    )
    after = derive(spec, job=None, previous=before, now=LATER)
    assert after["phase"] == "Succeeded"
    assert (after["startTime"], after["completionTime"]) == ("T0", "T1")
    assert (
        conditions(after)["Succeeded"]["lastTransitionTime"]
        == conditions(before)["Succeeded"]["lastTransitionTime"]
    )
    assert finished(before, 1)
    assert not finished(before, 2)
    # A new generation (the spec was edited) is not finished: the Job may be created again.
    assert derive(spec, job=None, previous=before, generation=2)["phase"] == "Pending"


def test_transition_times_are_kept_while_a_condition_holds(spec: FineTuneJobSpec) -> None:
    first = derive(spec, job=job(), pods=[pod("Running")], now=NOW)
    second = derive(spec, job=job(), pods=[pod("Running")], now=LATER, previous=first)
    assert conditions(second)["Running"]["lastTransitionTime"] == "2025-01-02T03:04:05Z"
    assert status_patch(first, second) == {}
    third = derive(spec, job=job(suspend=True), now=LATER, previous=second)
    assert conditions(third)["Running"]["lastTransitionTime"] == "2025-01-02T03:09:05Z"
    assert conditions(third)["Created"]["lastTransitionTime"] == "2025-01-02T03:04:05Z"


def test_progress_fields_from_progress_json(spec: FineTuneJobSpec) -> None:
    progress = {
        "epoch": 2,
        "totalEpochs": 3,
        "step": 120,
        "totalSteps": 180,
        "loss": 0.123456789,
        "imagesPerSecond": 12.3456,
        "lastCheckpoint": "s3://runs-bucket/job/checkpoints/step-000120",
        "checkpoints": [
            "s3://runs-bucket/job/checkpoints/step-000060",
            "s3://runs-bucket/job/checkpoints/step-000120",
        ],
    }
    status = derive(spec, job=job(), pods=[pod("Running")], progress=progress)
    assert status["progress"] == "epoch 2/3"
    assert (status["epoch"], status["step"], status["totalSteps"]) == (2, 120, 180)
    assert status["loss"] == 0.123457
    assert status["imagesPerSecond"] == 12.35
    assert status["lastCheckpoint"].endswith("step-000120")
    assert len(status["checkpoints"]) == 2


def test_progress_accepts_snake_case_and_drops_bad_values(spec: FineTuneJobSpec) -> None:
    fields = progress_fields(
        {"epoch": 1, "total_epochs": 5, "loss": "nan?", "images_per_second": True}, spec
    )
    assert fields["totalEpochs"] == 5
    assert fields["progress"] == "epoch 1/5"
    assert fields["loss"] is None
    assert fields["imagesPerSecond"] is None
    assert progress_fields({"loss": float("nan")}, spec)["loss"] is None


def test_progress_by_steps_when_only_max_steps() -> None:
    spec = parse_spec(minimal_spec(training={"maxSteps": 1000}))
    assert progress_fields({"step": 120}, spec)["progress"] == "step 120/1000"
    assert progress_fields(None, spec)["progress"] is None


def test_unknown_progress_leaves_progress_fields_alone(spec: FineTuneJobSpec) -> None:
    status = derive(spec, job=job(), pods=[pod("Running")], progress=None, progress_known=False)
    assert not set(PROGRESS_FIELDS) & set(status)
    patch = status_patch({"epoch": 3, "loss": 0.5}, status)
    assert "epoch" not in patch
    assert "loss" not in patch


def test_status_patch_is_minimal_and_deletes_with_none() -> None:
    current = {"phase": "Running", "loss": 0.5, "kopf": {"progress": {}}}
    assert status_patch(current, {"phase": "Running", "loss": None}) == {"loss": None}
    assert status_patch(None, {"phase": "Pending"}) == {"phase": "Pending"}


def test_derived_status_covers_every_managed_field(spec: FineTuneJobSpec) -> None:
    assert set(derive(spec, job=job())) == set(MANAGED_FIELDS)


@pytest.mark.parametrize(
    ("before", "after", "expected"),
    [
        (None, "Pending", ("Normal", "JobNotCreated")),
        ("Pending", "Running", ("Normal", "PodsRunning")),
        ("Running", "Failed", ("Warning", "BackoffLimitExceeded")),
    ],
)
def test_phase_events(
    spec: FineTuneJobSpec, before: str | None, after: str, expected: tuple[str, str]
) -> None:
    observed_job = {
        "Pending": None,
        "Running": job(),
        "Failed": job(
            conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]
        ),
    }[after]
    status = derive(spec, job=observed_job, pods=[pod("Running")] if after == "Running" else [])
    assert status["phase"] == after
    event = phase_event(before, status)
    assert event is not None
    assert (event.type, event.reason) == expected
    assert event.message.startswith(after)
    assert phase_event(after, status) is None
