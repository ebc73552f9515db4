"""The operator's Prometheus metrics, served on `kubedream operator --metrics-port`.

- `kubedream_finetunejobs{phase}`: FineTuneJobs by status.phase, as last seen by the watch.
- `kubedream_reconcile_errors_total{handler, kind}`: failed handler runs (kind: temporary,
  permanent, or unexpected: an exception the handler did not expect, which kopf retries).
- `kubedream_reconcile_duration_seconds{handler}`: handler run time.

The handlers update them; `serve` starts the HTTP endpoint. A registry of our own keeps the
metrics apart from anything else in the process (and lets tests create fresh ones).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .status import Phase


class Metrics:
    """One set of the operator's metrics and the per-job phase bookkeeping behind the gauge."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.jobs = Gauge(
            "kubedream_finetunejobs", "FineTuneJobs by phase.", ["phase"], registry=self.registry
        )
        self.errors = Counter(
            "kubedream_reconcile_errors",
            "Handler runs that failed, by handler and kind (temporary, permanent, unexpected).",
            ["handler", "kind"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "kubedream_reconcile_duration_seconds",
            "Handler run time.",
            ["handler"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self._phases: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()
        for phase in Phase:
            self.jobs.labels(phase.value).set(0)

    def observe_phase(self, namespace: str, name: str, phase: str | None) -> None:
        """Record a job's current phase (None: the job is gone)."""
        with self._lock:
            if phase is None:
                self._phases.pop((namespace, name), None)
            else:
                self._phases[(namespace, name)] = phase
            counts = {p.value: 0 for p in Phase}
            for value in self._phases.values():
                counts[value] = counts.get(value, 0) + 1
        for value, count in counts.items():
            self.jobs.labels(value).set(count)

    @contextmanager
    def timed(self, handler: str) -> Iterator[None]:
        """Time a handler run."""
        with self.latency.labels(handler).time():
            yield

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        """Serve /metrics over HTTP from a daemon thread."""
        start_http_server(port, addr=address, registry=self.registry)
