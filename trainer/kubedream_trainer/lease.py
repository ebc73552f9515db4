"""The output lease: at most one trainer writes an output at a time.

`<output>/lease.json` names its holder and is renewed by a background thread every TTL/3.
A new trainer that finds a lease held by someone else waits: a holder that stops renewing
(a dead pod) is taken over once the lease has not changed for a full TTL on the
newcomer's own clock (no clock sync needed) or is past its `expiresAt`; a holder that keeps
renewing makes the newcomer give up after `KUBEDREAM_LEASE_WAIT` seconds (exit 75). Before
committing a checkpoint the trainer re-reads the lease (`check`): a trainer whose lease
was taken over stops without committing.

Object stores have no compare-and-swap in the `Storage` interface, so two trainers that start
within the same instant could both believe they won; after writing, the lease is read back
after a short pause to narrow that window, and the never-overwrite rule of `checkpoint`
protects committed checkpoints regardless. Called by `train_cli`; rank 0 only.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from .errors import OutputLockedError
from .storage import Storage, StorageError, join_uri

log = logging.getLogger(__name__)

LEASE_KEY = "lease.json"


class OutputLease:
    """A lease on one output, held by this process."""

    def __init__(self, output: Storage, job: str, ttl_s: float, wait_s: float) -> None:
        self.output = output
        self.job = job
        self.ttl_s = max(ttl_s, 0.5)
        self.wait_s = wait_s
        self.owner = uuid.uuid4().hex
        self.acquired_at = time.time()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def uri(self) -> str:
        return join_uri(self.output.uri, LEASE_KEY)

    def _read(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.output.read_text(LEASE_KEY))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # garbage: treated as a foreign lease that will go stale
        return data if isinstance(data, dict) else {}

    def _write(self) -> None:
        now = time.time()
        record = {
            "owner": self.owner,
            "job": self.job,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "acquiredAt": _iso(self.acquired_at),
            "renewedAt": _iso(now),
            "expiresAt": _iso(now + self.ttl_s),
            "expiresAtUnix": now + self.ttl_s,
        }
        self.output.write_text(LEASE_KEY, json.dumps(record, indent=2) + "\n")

    def acquire(self) -> None:
        """Take the lease, waiting for a silent foreign holder; OutputLockedError if it stays alive."""
        deadline = time.monotonic() + self.wait_s
        seen: dict[str, Any] | None = None
        seen_since = time.monotonic()
        while True:
            current = self._read()
            if current != seen:
                seen, seen_since = current, time.monotonic()
            stale = time.monotonic() - seen_since >= self.ttl_s
            expired = current is not None and float(current.get("expiresAtUnix", 0)) < time.time()
            if current is None or current.get("owner") == self.owner or stale or expired:
                self._write()
                time.sleep(min(0.2, self.ttl_s / 10))
                confirmed = self._read()
                if confirmed is not None and confirmed.get("owner") == self.owner:
                    self._start_heartbeat()
                    return
                seen, seen_since = confirmed, time.monotonic()
            if time.monotonic() >= deadline:
                holder = current or {}
                raise OutputLockedError(
                    f"{self.output.uri} is in use by another trainer (job {holder.get('job')!r} on "
                    f"{holder.get('host')!r}, pid {holder.get('pid')}, lease renewed {holder.get('renewedAt')}). "
                    f"If that trainer is gone, its lease lapses after {self.ttl_s:g}s; or delete {self.uri}"
                )
            time.sleep(min(max(self.ttl_s / 4, 0.05), 2.0, max(deadline - time.monotonic(), 0.05)))

    def check(self) -> None:
        """Raise OutputLockedError unless the lease is still ours (the commit fence)."""
        current = self._read()
        if self.lost.is_set() or current is None or current.get("owner") != self.owner:
            self.lost.set()
            holder = (current or {}).get("host")
            raise OutputLockedError(
                f"lost the lease on {self.output.uri} (now held by {holder!r}); stopping without committing"
            )

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._heartbeat, name="kd-lease", daemon=True)
        self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                current = self._read()
                if current is None or current.get("owner") != self.owner:
                    log.error("lease on %s was taken over; training will stop", self.output.uri)
                    self.lost.set()
                    return
                self._write()
            except (OSError, StorageError) as exc:  # a hiccup: the next beat retries
                log.warning("could not renew the lease on %s: %s", self.output.uri, exc)

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            current = self._read()
            if current is not None and current.get("owner") == self.owner:
                self.output.delete_prefix(LEASE_KEY)
        except (OSError, StorageError) as exc:
            log.warning("could not release the lease on %s: %s", self.output.uri, exc)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
