"""Helpers for the operator's unit tests: a minimal spec and a fake Kubernetes API."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubedream_operator.k8s import ApiPermanentError

EXAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "examples"


def minimal_spec(**overrides: Any) -> dict[str, Any]:
    """The smallest valid spec mapping, with top-level sections replaced by `overrides`."""
    spec: dict[str, Any] = {
        "model": {"base": "tiny"},
        "data": {"roots": [{"uri": "s3://data-bucket/images"}]},
        "training": {"epochs": 3},
        "output": {"uri": "s3://runs-bucket/job"},
    }
    spec.update(overrides)
    return spec


class FakeKube:
    """An in-memory API server for the calls handlers make: objects by (kind, namespace, name).

    It records every write, fills in what the real one would (uid, suspend default), and can
    be told to reject creating a kind for good (`reject[kind] = message`).
    """

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.pods: dict[str, list[dict[str, Any]]] = {}
        self.writes: list[tuple[str, str, str]] = []
        self.reject: dict[str, str] = {}
        self._uids = 0

    def _key(self, kind: str, namespace: str, name: str) -> tuple[str, str, str]:
        return (kind, namespace, name)

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        found = self.objects.get(self._key(kind, namespace, name))
        return copy.deepcopy(found) if found is not None else None

    def _store(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        key = self._key(obj["kind"], meta["namespace"], meta["name"])
        stored = copy.deepcopy(dict(obj))
        if key not in self.objects:
            self._uids += 1
            stored["metadata"]["uid"] = f"uid-{obj['kind'].lower()}-{self._uids}"
        else:
            stored["metadata"]["uid"] = self.objects[key]["metadata"]["uid"]
        self.objects[key] = stored
        return copy.deepcopy(stored)

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        if obj["kind"] in self.reject:
            raise ApiPermanentError(self.reject[obj["kind"]])
        self.writes.append(("apply", obj["kind"], obj["metadata"]["name"]))
        return self._store(obj)

    def create_or_get(self, obj: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        if obj["kind"] in self.reject:
            raise ApiPermanentError(self.reject[obj["kind"]])
        meta = obj["metadata"]
        existing = self.get(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        if existing is not None:
            return existing, False
        self.writes.append(("create", obj["kind"], meta["name"]))
        return self._store(obj), True

    def patch_job_spec(
        self, namespace: str, name: str, fields: Mapping[str, Any]
    ) -> dict[str, Any]:
        self.writes.append(("patch", "Job", name))
        job = self.objects[self._key("Job", namespace, name)]
        for key, value in fields.items():
            if value is None:
                job["spec"].pop(key, None)
            else:
                job["spec"][key] = value
        return copy.deepcopy(job)

    def job_pods(self, job: Mapping[str, Any]) -> list[dict[str, Any]]:
        return copy.deepcopy(self.pods.get(job["metadata"]["name"], []))

    def job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.objects.get(self._key("Job", namespace, name))
