"""The operator's metrics: jobs by phase follow the watch, errors and latency are exported."""

from __future__ import annotations

from prometheus_client import generate_latest

from kubedream_operator.metrics import Metrics


def test_jobs_by_phase_follow_each_job() -> None:
    metrics = Metrics()
    metrics.observe_phase("ns", "a", "Running")
    metrics.observe_phase("ns", "b", "Running")
    metrics.observe_phase("ns", "a", "Succeeded")
    assert metrics.jobs.labels("Running")._value.get() == 1
    assert metrics.jobs.labels("Succeeded")._value.get() == 1
    metrics.observe_phase("ns", "b", None)  # deleted
    assert metrics.jobs.labels("Running")._value.get() == 0


def test_exposition_names() -> None:
    metrics = Metrics()
    with metrics.timed("create"):
        pass
    metrics.errors.labels("create", "temporary").inc()
    text = generate_latest(metrics.registry).decode()
    assert 'kubedream_finetunejobs{phase="Pending"} 0.0' in text
    assert 'kubedream_reconcile_errors_total{handler="create",kind="temporary"} 1.0' in text
    assert 'kubedream_reconcile_duration_seconds_count{handler="create"} 1.0' in text
