"""Reconciling against a fake API: children, idempotence, suspend, invalid specs, conflicts, progress."""

from __future__ import annotations

from typing import Any

import kopf
import pytest

from kubedream_operator import handlers, k8s
from kubedream_operator.handlers import Context, Outcome, backoff, reconcile
from kubedream_operator.metrics import Metrics
from kubedream_operator.render import OperatorDefaults

from .helpers import FakeKube, minimal_spec

UID = "ftj-uid-1"


def make_context(
    kube: FakeKube, progress: dict[str, Any] | None = None, known: bool = True
) -> Context:
    return Context(
        kube=kube,
        defaults=OperatorDefaults(trainer_image="img:test"),
        metrics=Metrics(),
        read_progress=lambda spec: (progress, known),
    )


def run(
    ctx: Context,
    spec: dict[str, Any],
    status: dict[str, Any] | None = None,
    *,
    full: bool = True,
    generation: int = 1,
    name: str = "j",
) -> Outcome:
    return reconcile(
        ctx,
        name=name,
        namespace="ns",
        uid=UID,
        generation=generation,
        spec=spec,
        status=status,
        full=full,
    )


def settle(
    ctx: Context, spec: dict[str, Any], status: dict[str, Any] | None = None, **kw: Any
) -> dict[str, Any]:
    """Reconcile and apply the status patch, as kopf would; return the new status."""
    outcome = run(ctx, spec, status, **kw)
    new = dict(status or {})
    for key, value in outcome.changes.items():
        if value is None:
            new.pop(key, None)
        else:
            new[key] = value
    return new


def test_create_renders_children_and_reports_pending(kube: FakeKube) -> None:
    outcome = run(make_context(kube), minimal_spec())
    assert kube.writes == [("apply", "ConfigMap", "j-spec"), ("create", "Job", "j")]
    job = kube.job("ns", "j")
    assert job is not None
    assert job["metadata"]["ownerReferences"][0]["uid"] == UID
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "img:test"
    assert outcome.status["phase"] == "Pending"
    assert outcome.job_exists
    assert outcome.event is not None
    assert outcome.event.type == "Normal"


def test_multi_node_gets_a_service(kube: FakeKube) -> None:
    run(make_context(kube), minimal_spec(resources={"nodes": 2}))
    assert ("apply", "Service", "j") in kube.writes


def test_reconcile_is_idempotent(kube: FakeKube) -> None:
    ctx = make_context(kube)
    status = settle(ctx, minimal_spec())
    writes = list(kube.writes)
    again = run(ctx, minimal_spec(), status, full=False)
    assert kube.writes == writes  # the timer finds everything in place: no writes at all
    assert again.changes == {}
    assert again.event is None
    run(ctx, minimal_spec(), status, full=True)
    assert [w for w in kube.writes[len(writes) :] if w[1] == "Job"] == []  # never a second Job


def test_crash_before_status_was_written_creates_no_duplicate(kube: FakeKube) -> None:
    ctx = make_context(kube)
    run(ctx, minimal_spec())  # children created, status never written (operator killed)
    outcome = run(ctx, minimal_spec(), status={})  # restarted: resume with an empty status
    assert [w for w in kube.writes if w[0] == "create"] == [("create", "Job", "j")]
    assert outcome.status["phase"] == "Pending"
    assert outcome.changes["phase"] == "Pending"


def test_invalid_spec_fails_without_children(kube: FakeKube) -> None:
    bad = minimal_spec(
        training={"epochs": 1, "batchSize": 0}, data={"roots": [{"uri": "x", "multiplier": -1}]}
    )
    outcome = run(make_context(kube), bad)
    assert kube.writes == []
    assert outcome.status["phase"] == "Failed"
    failed = {c["type"]: c for c in outcome.status["conditions"]}["Failed"]
    assert failed["reason"] == "InvalidSpec"
    assert "spec.training.batchSize: must be >= 1, got 0" in failed["message"]
    assert "spec.data.roots[0].multiplier: must be > 0, got -1" in failed["message"]
    assert outcome.event is not None
    assert (outcome.event.type, outcome.event.reason) == ("Warning", "InvalidSpec")


def test_fixing_an_invalid_spec_creates_the_children(kube: FakeKube) -> None:
    ctx = make_context(kube)
    status = settle(ctx, minimal_spec(training={}))
    assert status["phase"] == "Failed"
    fixed = run(ctx, minimal_spec(), status, generation=2)
    assert fixed.status["phase"] == "Pending"
    assert kube.job("ns", "j") is not None


def test_suspend_and_resume_toggle_the_job(kube: FakeKube) -> None:
    ctx = make_context(kube)
    status = settle(ctx, minimal_spec())
    suspended = minimal_spec(runPolicy={"suspend": True})
    status = settle(ctx, suspended, status, generation=2)
    job = kube.job("ns", "j")
    assert job is not None
    assert job["spec"]["suspend"] is True
    assert status["phase"] == "Suspended"
    status = settle(ctx, minimal_spec(runPolicy={"suspend": False}), status, generation=3)
    job = kube.job("ns", "j")
    assert job is not None
    assert job["spec"]["suspend"] is False
    assert status["phase"] == "Pending"
    assert [w for w in kube.writes if w[0] == "patch"] == [
        ("patch", "Job", "j"),
        ("patch", "Job", "j"),
    ]


def test_run_policy_changes_reach_the_existing_job(kube: FakeKube) -> None:
    ctx = make_context(kube)
    status = settle(ctx, minimal_spec(runPolicy={"activeDeadlineSeconds": 60}))
    settle(ctx, minimal_spec(runPolicy={"backoffLimit": 5}), status, generation=2)
    job = kube.job("ns", "j")
    assert job is not None
    assert job["spec"]["backoffLimit"] == 5
    assert "activeDeadlineSeconds" not in job["spec"]


def test_foreign_object_with_the_same_name_is_a_permanent_conflict(kube: FakeKube) -> None:
    kube.objects[("ConfigMap", "ns", "j-spec")] = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "j-spec", "namespace": "ns", "uid": "x"},
    }
    outcome = run(make_context(kube), minimal_spec())
    assert outcome.status["phase"] == "Failed"
    assert {c["type"]: c for c in outcome.status["conditions"]}["Failed"][
        "reason"
    ] == "NameConflict"
    assert kube.job("ns", "j") is None


def test_children_of_a_deleted_namesake_are_waited_for(kube: FakeKube) -> None:
    run(make_context(kube), minimal_spec())
    with pytest.raises(k8s.ApiTemporaryError, match="garbage collection"):
        reconcile(
            make_context(kube),
            name="j",
            namespace="ns",
            uid="a-newer-uid",
            generation=1,
            spec=minimal_spec(),
            status={},
            full=True,
        )


def test_api_rejection_becomes_failed_status(kube: FakeKube) -> None:
    kube.reject["Job"] = (
        "create Job j: HTTP 422: spec.template.spec.containers[0].resources: Invalid value"
    )
    outcome = run(make_context(kube), minimal_spec())
    assert outcome.status["phase"] == "Failed"
    assert "HTTP 422" in outcome.status["message"]


def test_finished_job_deleted_by_ttl_is_not_recreated(kube: FakeKube) -> None:
    ctx = make_context(kube)
    status = settle(ctx, minimal_spec())
    job = kube.job("ns", "j")
    assert job is not None
    job["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    status = settle(ctx, minimal_spec(), status, full=False)
    assert status["phase"] == "Succeeded"
    del kube.objects[("Job", "ns", "j")]  # ttlSecondsAfterFinished
    status = settle(ctx, minimal_spec(), status, full=False)
    assert kube.job("ns", "j") is None
    assert status["phase"] == "Succeeded"


def test_a_job_deleted_by_ttl_before_its_end_was_seen_is_not_recreated(kube: FakeKube) -> None:
    running = {"phase": "Training", "job": "j", "step": 3, "totalSteps": 4}
    started = settle(make_context(kube, running), minimal_spec())
    assert started["phase"] in ("Pending", "Running")
    del kube.objects[("Job", "ns", "j")]  # finished and deleted between two ticks
    ended = {**running, "phase": "Succeeded", "step": 4}
    status = settle(make_context(kube, ended), minimal_spec(), started, full=False)
    assert kube.job("ns", "j") is None
    assert status["phase"] == "Succeeded"
    assert "progress.json says Succeeded" in status["message"]
    # A new generation (say, more steps) runs again; so does a job whose trainer did not end.
    settle(make_context(kube, ended), minimal_spec(), status, full=False, generation=2)
    assert kube.job("ns", "j") is not None
    del kube.objects[("Job", "ns", "j")]
    settle(make_context(kube, running), minimal_spec(), started, full=False)
    assert kube.job("ns", "j") is not None


def test_progress_is_mirrored_and_kept_through_read_errors(kube: FakeKube) -> None:
    progress = {"epoch": 2, "totalEpochs": 3, "step": 40, "loss": 0.25, "imagesPerSecond": 9.5}
    status = settle(make_context(kube, progress), minimal_spec())
    assert (status["progress"], status["loss"]) == ("epoch 2/3", 0.25)
    outcome = run(make_context(kube, None, known=False), minimal_spec(), status, full=False)
    assert "progress" not in outcome.changes
    assert "loss" not in outcome.changes


def test_backoff_is_exponential_and_bounded() -> None:
    assert [backoff(r) for r in range(4)] == [5.0, 10.0, 20.0, 40.0]
    assert backoff(30) == handlers.MAX_BACKOFF


def _body(spec: dict[str, Any], status: dict[str, Any] | None = None) -> kopf.Body:
    return kopf.Body(
        {
            "apiVersion": "kubedream.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "j", "namespace": "ns", "uid": UID, "generation": 1},
            "spec": spec,
            "status": status or {},
        }
    )


def test_kopf_shell_writes_status_and_posts_the_event(
    kube: FakeKube, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, str]] = []
    monkeypatch.setattr(
        kopf, "event", lambda body, *, type, reason, message: events.append((type, reason))
    )
    ctx = make_context(kube)
    patch = kopf.Patch()
    memo = kopf.Memo(context=ctx)
    handlers.on_create(body=_body(minimal_spec(training={})), patch=patch, memo=memo, retry=0)
    assert patch["status"]["phase"] == "Failed"
    assert events == [("Warning", "InvalidSpec")]
    # The first timer tick races the create handler and sees no status either: no second Event.
    handlers.refresh_status(
        body=_body(minimal_spec(training={})), patch=kopf.Patch(), memo=memo, retry=0
    )
    assert events == [("Warning", "InvalidSpec")]
    assert ctx.metrics.jobs.labels("Failed")._value.get() == 1


def test_update_warns_about_changes_the_job_cannot_take(
    kube: FakeKube, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, str]] = []
    monkeypatch.setattr(
        kopf, "event", lambda body, *, type, reason, message: events.append((type, reason))
    )
    ctx = make_context(kube)
    old, new = minimal_spec(), minimal_spec(resources={"memory": "8Gi"})
    run(ctx, old)
    handlers.on_update(
        body=_body(new), patch=kopf.Patch(), memo=kopf.Memo(context=ctx), old=old, new=new, retry=0
    )
    assert ("Warning", "JobImmutable") in events


def test_temporary_errors_get_backoff_and_are_counted(
    kube: FakeKube, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = make_context(kube)

    def unreachable(*args: Any, **kwargs: Any) -> None:
        raise k8s.ApiTemporaryError("cannot reach the API server", delay=1)

    monkeypatch.setattr(kube, "get", unreachable)
    with pytest.raises(kopf.TemporaryError) as caught:
        handlers.refresh_status(
            body=_body(minimal_spec()), patch=kopf.Patch(), memo=kopf.Memo(context=ctx), retry=3
        )
    assert caught.value.delay == 40.0
    assert ctx.metrics.errors.labels("status", "temporary")._value.get() == 1


def test_unexpected_errors_are_counted_and_left_to_kopf(
    kube: FakeKube, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = make_context(kube)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(kube, "get", broken)
    with pytest.raises(KeyError):
        handlers.refresh_status(
            body=_body(minimal_spec()), patch=kopf.Patch(), memo=kopf.Memo(context=ctx), retry=0
        )
    assert ctx.metrics.errors.labels("status", "unexpected")._value.get() == 1
