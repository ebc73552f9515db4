"""Read the trainer's `<output>/progress.json` for the status timer.

The handlers call a `ProgressReader` once per FineTuneJob per status interval. Storage comes
from `spec.output.uri` with `spec.storage`'s endpoint and region through the trainer's storage
interface (`open_storage`); S3 credentials are the operator's own (its environment), not the
job's Secret. Opened storages are cached (a boto3 client is costly to build), and a failing
read is logged once per distinct error rather than every interval.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from typing import Any

from kubedream_trainer.storage import Storage, StorageError, open_storage

from . import contract
from .spec import FineTuneJobSpec

log = logging.getLogger(__name__)

CACHE_SIZE = 256


class ProgressReader:
    """Callable: spec -> (progress.json as a dict, or None when not written yet; whether the read worked).

    A read that fails (a storage outage, a file that is not a JSON object) returns
    `(None, False)`, which tells the status derivation to leave the progress fields as they are.
    Thread-safe: kopf runs sync handlers in a thread pool.
    """

    def __init__(self) -> None:
        self._storages: OrderedDict[str, Storage] = OrderedDict()
        self._last_error: dict[str, str] = {}
        self._lock = threading.Lock()

    def _storage(self, spec: FineTuneJobSpec) -> Storage:
        key = json.dumps([spec.output.uri, spec.storage.model_dump(mode="json")], sort_keys=True)
        with self._lock:
            storage = self._storages.get(key)
            if storage is not None:
                self._storages.move_to_end(key)
                return storage
        storage = open_storage(spec.output.uri, spec.storage, patient=False)
        with self._lock:
            self._storages[key] = storage
            while len(self._storages) > CACHE_SIZE:
                self._storages.popitem(last=False)
        return storage

    def _failed(self, uri: str, error: str) -> tuple[None, bool]:
        with self._lock:
            repeated = self._last_error.get(uri) == error
            self._last_error[uri] = error
        if not repeated:
            log.warning("cannot read %s/%s: %s", uri, contract.PROGRESS_FILE, error)
        return None, False

    def __call__(self, spec: FineTuneJobSpec) -> tuple[dict[str, Any] | None, bool]:
        uri = spec.output.uri
        try:
            text = self._storage(spec).read_text(contract.PROGRESS_FILE)
        except FileNotFoundError:
            return None, True
        except (StorageError, OSError) as exc:
            return self._failed(uri, str(exc))
        try:
            data = json.loads(text)
        except ValueError as exc:
            return self._failed(uri, f"not JSON: {exc}")
        if not isinstance(data, dict):
            return self._failed(uri, f"not a JSON object but {type(data).__name__}")
        with self._lock:
            self._last_error.pop(uri, None)
        return data, True
