"""Retrying S3 calls through outages that outlast boto3's own retries.

boto3's `standard` retry mode retries transient errors (5xx, throttling, timeouts, refused
or reset connections) with exponential backoff and full jitter, but for anything other
than throttling its backoff starts at 50 ms (botocore's `non_throttling_base_scale`), so
its attempts are spent within a few seconds: a MinIO restart or a load-balancer failover
that takes ten seconds would kill a run of many hours. `RetryPolicy.call` adds an outer
layer around each storage operation: the same kinds of error, retried with exponential
backoff and "equal" jitter (half the delay fixed, half random, so retries of many workers
spread out but still back off) until a time budget is spent. Permanent errors (access
denied, no such bucket or key, bad parameters, local file errors) are never retried.

Used by `storage.s3` only; every S3 operation is idempotent (whole-object PUTs, GETs,
listings, deletes), so repeating one is safe.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from boto3.exceptions import Boto3Error, RetriesExceededError, S3UploadFailedError
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    HTTPClientError,
    IncompleteReadError,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_BUDGET_S = 120.0
"""Seconds one operation is retried for when KUBEDREAM_S3_RETRY_BUDGET is not set."""

TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "RequestTimeout",
        "RequestTimeoutException",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "XMinioServerNotInitialized",
        "XMinioStorageFull",  # not transient in itself, but an operator can free space
    }
)
"""S3 error codes that a later attempt may not meet (besides every HTTP 5xx)."""


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        return max(0.0, float(raw)) if raw else default
    except ValueError:
        return default


def is_transient(exc: BaseException) -> bool:
    """Whether a later attempt of the same call may succeed."""
    if isinstance(exc, ConnectionError | HTTPClientError | IncompleteReadError):
        return True  # refused, reset, timed out, or cut off mid-body
    if isinstance(exc, RetriesExceededError):  # s3transfer gave up on a download's body
        return True
    if isinstance(exc, S3UploadFailedError):  # boto3 wraps an upload's ClientError in this
        cause = exc.__cause__ or exc.__context__
        return cause is None or is_transient(cause)
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return status >= 500 or str(error.get("Code", "")) in TRANSIENT_CODES
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded by a total time budget."""

    budget_s: float = field(
        default_factory=lambda: _env_seconds("KUBEDREAM_S3_RETRY_BUDGET", DEFAULT_BUDGET_S)
    )
    """Seconds to keep retrying one operation (KUBEDREAM_S3_RETRY_BUDGET); 0 disables."""
    first_delay_s: float = 1.0
    """Delay before the first outer retry (doubled each time, up to `max_delay_s`)."""
    max_delay_s: float = 15.0
    """Longest single delay."""

    def delay(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """The pause before outer attempt `attempt + 1`: half fixed, half random."""
        ceiling = min(self.max_delay_s, self.first_delay_s * 2**attempt)
        return ceiling / 2 + rng() * ceiling / 2

    def call(self, operation: Callable[[], T], what: str) -> T:
        """Run `operation`, retrying transient errors until the budget is spent; the last
        error is raised with `attempts` and `waited_s` attributes for the message."""
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                return operation()
            except (BotoCoreError, ClientError, Boto3Error) as exc:
                if not is_transient(exc):
                    raise
                pause = self.delay(attempt)
                waited = time.monotonic() - started
                if waited + pause > self.budget_s:
                    setattr(exc, "kd_attempts", attempt + 1)  # noqa: B010 - read by s3._error
                    setattr(exc, "kd_waited_s", waited)  # noqa: B010
                    raise
                attempt += 1
                log.warning(
                    "%s: %s; retrying in %.1fs (retry %d, %.0fs of %.0fs budget used)",
                    what,
                    _short(exc),
                    pause,
                    attempt,
                    waited,
                    self.budget_s,
                )
                time.sleep(pause)


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__
