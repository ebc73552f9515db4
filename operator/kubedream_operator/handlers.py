"""kopf glue: when a FineTuneJob changes (or every status interval), reconcile it.

Registered with kopf's default registry on import; `main.run` imports this module and starts
kopf. Each handler is a thin shell around `reconcile`, which is plain Python over a `Kube`
(real or fake): validate the spec, make sure the children exist (ConfigMap, Service, Job),
read what is there (Job, pods, progress.json), derive the status, and return the status
fields that changed plus the Event for a new phase. The handlers write those through kopf's
`patch` (kopf patches the status subresource) and post the Event.

- create / resume / update of `spec`: full reconcile; ConfigMap and Service are server-side
  applied; the Job's suspend, backoffLimit and deadlines follow `spec.runPolicy`
  (`suspend: true` stops the pods after a final checkpoint; `false` resumes from it).
- a timer every KUBEDREAM_STATUS_INTERVAL seconds (default 10): re-create missing children,
  refresh the status. Level-triggered, so a lost event or a crash between creating children
  and writing status heals on the next tick.
- every watch event: the phase gauge.

No finalizer of ours: the children carry controller owner references, so the garbage
collector deletes them with the FineTuneJob (kopf adds its own finalizer because of the timer).
Nothing here sleeps: retries are kopf's, bounded by KUBEDREAM_HANDLER_RETRIES with exponential
backoff, and progress.json is read with one attempt per request (a failed read leaves the
progress fields as they were until the next tick).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import kopf

from . import k8s
from .metrics import Metrics
from .progress import ProgressReader
from .render import (
    OperatorDefaults,
    Owner,
    frozen_changes,
    job_mutable_fields,
    render_children,
    with_storage_defaults,
)
from .spec import GROUP, PLURAL, VERSION, FineTuneJobSpec, SpecError, parse_spec
from .status import (
    Observed,
    PhaseEvent,
    derive_status,
    ended_unseen,
    finished,
    phase_event,
    status_patch,
)

STATUS_INTERVAL = float(os.environ.get("KUBEDREAM_STATUS_INTERVAL", "10"))
"""Seconds between status refreshes of each FineTuneJob."""
HANDLER_RETRIES = int(os.environ.get("KUBEDREAM_HANDLER_RETRIES", "12"))
"""Attempts of a failing handler before kopf gives up on that change (the timer keeps trying)."""
MAX_BACKOFF = 300.0

log = logging.getLogger(__name__)


class KubeLike(Protocol):
    """The part of `k8s.Kube` that reconciling needs (tests pass a fake)."""

    def get(
        self, api_version: str, kind: str, namespace: str, name: str
    ) -> dict[str, Any] | None: ...
    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]: ...
    def create_or_get(self, obj: Mapping[str, Any]) -> tuple[dict[str, Any], bool]: ...
    def patch_job_spec(
        self, namespace: str, name: str, fields: Mapping[str, Any]
    ) -> dict[str, Any]: ...
    def job_pods(self, job: Mapping[str, Any]) -> list[dict[str, Any]]: ...


@dataclass
class Context:
    """What the handlers share, kept in kopf's memo under `context`."""

    kube: KubeLike
    defaults: OperatorDefaults = field(default_factory=OperatorDefaults)
    metrics: Metrics = field(default_factory=Metrics)
    read_progress: Callable[[FineTuneJobSpec], tuple[dict[str, Any] | None, bool]] = field(
        default_factory=ProgressReader
    )
    """Reads <output>/progress.json: (the dict or None when not written yet, whether the read worked)."""


@dataclass(frozen=True)
class Outcome:
    """What one reconcile found and wants written."""

    status: dict[str, Any]
    """The derived status (every managed field)."""
    changes: dict[str, Any]
    """The merge patch for `status` (empty when nothing changed)."""
    event: PhaseEvent | None
    """The Event to post for a new phase."""
    job_exists: bool
    """Whether the trainer Job exists (after this reconcile)."""


def backoff(retry: int) -> float:
    """Exponential backoff for a retried handler: 5 s, 10 s, 20 s … capped at 5 minutes."""
    return float(min(5 * 2 ** max(retry, 0), MAX_BACKOFF))


def ensure_children(
    kube: KubeLike,
    owner: Owner,
    spec: FineTuneJobSpec,
    defaults: OperatorDefaults,
    *,
    full: bool,
    create_job: bool = True,
) -> dict[str, Any] | None:
    """Make the children exist and match the spec; return the Job (None if not created).

    `full` server-side applies the ConfigMap and Service even when they exist (create, update,
    resume); otherwise (the timer) only missing children are created. An existing Job is
    never re-applied - its pod template is immutable - only its mutable run-policy fields
    (suspend, backoffLimit, deadlines) are patched when they differ.
    """
    job: dict[str, Any] | None = None
    for obj in render_children(owner, spec, defaults):
        meta = obj["metadata"]
        existing = kube.get(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        if existing is not None:
            k8s.check_owned(existing, owner.uid)
        if obj["kind"] != "Job":
            if existing is None or full:
                kube.apply(obj)
            continue
        if existing is None:
            if not create_job:
                return None
            existing, _ = kube.create_or_get(obj)
            k8s.check_owned(existing, owner.uid)
        current = existing.get("spec") or {}
        drift = {k: v for k, v in job_mutable_fields(spec).items() if current.get(k) != v}
        if "suspend" in drift:
            drift["suspend"] = bool(drift["suspend"])
            if bool(current.get("suspend")) == drift["suspend"]:
                del drift["suspend"]  # absent and false mean the same
        if drift:
            existing = kube.patch_job_spec(meta["namespace"], meta["name"], drift)
        job = existing
    return job


def reconcile(
    ctx: Context,
    *,
    name: str,
    namespace: str,
    uid: str,
    generation: int | None,
    spec: Mapping[str, Any],
    status: Mapping[str, Any] | None,
    full: bool,
    now: datetime | None = None,
) -> Outcome:
    """Validate, ensure children, observe, derive. Idempotent: a second run changes nothing.

    Temporary API errors propagate (kopf retries); permanent ones (the API server rejects an
    object, a name conflict) become a Failed status, like an invalid spec.
    """
    previous = dict(status or {})
    problems: list[str] = []
    parsed: FineTuneJobSpec | None = None
    try:
        parsed = with_storage_defaults(parse_spec(spec), ctx.defaults)
    except SpecError as exc:
        problems = exc.problems
    job: dict[str, Any] | None = None
    pods: list[dict[str, Any]] = []
    rejected: tuple[str, str] | None = None
    progress: dict[str, Any] | None = None
    progress_known = False
    ended = False
    if parsed is not None:
        done = finished(previous, generation)
        if not done:
            progress, progress_known = ctx.read_progress(parsed)
            ended = ended_unseen(previous, generation, name, progress)
        try:
            job = ensure_children(
                ctx.kube,
                Owner(name, namespace, uid),
                parsed,
                ctx.defaults,
                full=full,
                create_job=not done and not ended,
            )
        except k8s.ApiPermanentError as exc:
            rejected = (exc.reason, str(exc))
        if job is not None:
            pods = ctx.kube.job_pods(job)
    observed = Observed(
        generation=generation,
        spec=parsed,
        problems=problems,
        rejected=rejected,
        job=job,
        pods=pods,
        progress=progress,
        progress_known=progress_known,
        previous=previous,
        ended_unseen=ended,
    )
    derived = derive_status(observed, now or datetime.now(UTC))
    return Outcome(
        derived,
        status_patch(previous, derived),
        phase_event(previous.get("phase"), derived),
        job is not None,
    )


# -- kopf shells ---------------------------------------------------------------------------


def _instrumented(handler: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Time the handler, count its errors, and give temporary errors an exponential backoff."""

    def wrap(fn: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(fn)
        def run(**kwargs: Any) -> None:
            metrics: Metrics = kwargs["memo"]["context"].metrics
            with metrics.timed(handler):
                try:
                    fn(**kwargs)
                except kopf.TemporaryError as exc:
                    metrics.errors.labels(handler, "temporary").inc()
                    raise kopf.TemporaryError(
                        str(exc), delay=backoff(int(kwargs.get("retry") or 0))
                    ) from exc
                except kopf.PermanentError:
                    metrics.errors.labels(handler, "permanent").inc()
                    raise
                except Exception:  # a bug or an unmapped API error: kopf retries it
                    metrics.errors.labels(handler, "unexpected").inc()
                    raise

        return run

    return wrap


def _write(outcome: Outcome, body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo) -> None:
    ctx: Context = memo["context"]
    for key, value in outcome.changes.items():
        patch.status[key] = value
    # The create handler and the first timer tick may both see the phase change before either
    # write lands; the per-object memo lets only the first one announce it.
    if outcome.event is not None and memo.get("announced") != outcome.status.get("phase"):
        memo["announced"] = outcome.status.get("phase")
        kopf.event(
            body,
            type=outcome.event.type,
            reason=outcome.event.reason,
            message=outcome.event.message,
        )
    meta = body.get("metadata") or {}
    ctx.metrics.observe_phase(
        meta.get("namespace", ""), meta.get("name", ""), outcome.status.get("phase")
    )


def _run(full: bool, body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo) -> Outcome:
    ctx: Context = memo["context"]
    meta = body["metadata"]
    outcome = reconcile(
        ctx,
        name=meta["name"],
        namespace=meta["namespace"],
        uid=meta["uid"],
        generation=meta.get("generation"),
        spec=body.get("spec") or {},
        status=body.get("status") or {},
        full=full,
    )
    _write(outcome, body, patch, memo)
    return outcome


@kopf.on.create(GROUP, VERSION, PLURAL, id="create", retries=HANDLER_RETRIES)
@_instrumented("create")
def on_create(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """A new FineTuneJob: validate, create the children, write the first status."""
    _run(True, body, patch, memo)


@kopf.on.resume(GROUP, VERSION, PLURAL, id="resume", retries=HANDLER_RETRIES)
@_instrumented("resume")
def on_resume(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """The operator (re)started: bring existing jobs' children up to date (no duplicates: names are fixed)."""
    _run(True, body, patch, memo)


@kopf.on.update(GROUP, VERSION, PLURAL, id="update", field="spec", retries=HANDLER_RETRIES)
@_instrumented("update")
def on_update(
    body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, old: Any, new: Any, **_: Any
) -> None:
    """The spec changed: re-validate and re-apply; `runPolicy.suspend` suspends or resumes the Job."""
    outcome = _run(True, body, patch, memo)
    try:
        before, after = parse_spec(old or {}), parse_spec(new or {})
    except SpecError:
        return
    changed = frozen_changes(before, after)
    if changed and outcome.job_exists:
        kopf.event(
            body,
            type="Warning",
            reason="JobImmutable",
            message=f"changes to {', '.join(changed)} do not affect the running Job; "
            "create a new FineTuneJob for them (training settings apply from the trainer's next start)",
        )


@kopf.timer(GROUP, VERSION, PLURAL, id="status", interval=STATUS_INTERVAL, retries=HANDLER_RETRIES)
@_instrumented("status")
def refresh_status(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """Every interval: re-create missing children and mirror the Job, pods and progress.json into status."""
    _run(False, body, patch, memo)


@kopf.on.event(GROUP, VERSION, PLURAL, id="phase-gauge")
def track_phase(event: Mapping[str, Any], body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Keep the jobs-by-phase gauge in step with what the watch shows (deletions included)."""
    meta = body.get("metadata") or {}
    phase = (
        None
        if event.get("type") == "DELETED"
        else (body.get("status") or {}).get("phase") or "Pending"
    )
    memo["context"].metrics.observe_phase(meta.get("namespace", ""), meta.get("name", ""), phase)


__all__ = [
    "Context",
    "Outcome",
    "backoff",
    "ensure_children",
    "reconcile",
]
