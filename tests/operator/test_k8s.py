"""The API layer: answers and failures classified as kopf expects, ownership checks."""

from __future__ import annotations

import json
from typing import Any

import pytest
import urllib3

from kubedream_operator import k8s
from kubedream_operator.k8s import ApiPermanentError, ApiTemporaryError, Kube, check_owned


class _Response:
    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self._data = json.dumps(body).encode() if body is not None else b""

    def read(self) -> bytes:
        return self._data


class _Client:
    """Stands in for kubernetes.client.ApiClient: replays answers, records requests."""

    def __init__(self, *answers: _Response | Exception) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, str, dict[str, str], Any]] = []

    def param_serialize(self, method: str, path: str, **kw: Any) -> tuple[Any, ...]:
        return method, "https://api" + path, kw["header_params"], kw.get("body"), None

    def call_api(
        self, method: str, url: str, headers: dict[str, str], body: Any, **_: Any
    ) -> _Response:
        self.calls.append((method, url, headers, body))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def _kube(*answers: _Response | Exception) -> tuple[Kube, _Client]:
    client = _Client(*answers)
    return Kube(client), client  # type: ignore[arg-type]


CONFIG_MAP = {
    "apiVersion": "v1",
    "kind": "ConfigMap",
    "metadata": {"name": "j-spec", "namespace": "ns"},
}


def test_answers_and_not_found() -> None:
    kube, client = _kube(_Response(200, {"kind": "Job"}), _Response(404, {"message": "not found"}))
    assert kube.read_job("ns", "j") == {"kind": "Job"}
    assert kube.read_job("ns", "gone") is None
    assert client.calls[0][1] == "https://api/apis/batch/v1/namespaces/ns/jobs/j"


@pytest.mark.parametrize(
    ("status", "kind", "delay"),
    [(422, ApiPermanentError, None), (400, ApiPermanentError, None), (409, ApiTemporaryError, 5),
     (429, ApiTemporaryError, 5), (500, ApiTemporaryError, 5), (403, ApiTemporaryError, 30)],
)  # fmt: skip
def test_failures_are_classified(status: int, kind: type[Exception], delay: float | None) -> None:
    kube, _ = _kube(_Response(status, {"message": "why"}))
    with pytest.raises(kind, match=f"HTTP {status}: why") as caught:
        kube.read_job("ns", "j")
    if delay is not None:
        assert getattr(caught.value, "delay", None) == delay


def test_unreachable_api_server_is_temporary() -> None:
    kube, _ = _kube(urllib3.exceptions.NewConnectionError(None, "refused"))  # type: ignore[arg-type]
    with pytest.raises(ApiTemporaryError, match="cannot reach the API server"):
        kube.read_job("ns", "j")


def test_apply_is_server_side_apply_with_our_field_manager() -> None:
    kube, client = _kube(_Response(200, CONFIG_MAP))
    kube.apply(CONFIG_MAP)
    method, url, headers, body = client.calls[0]
    assert method == "PATCH"
    assert (
        url
        == "https://api/api/v1/namespaces/ns/configmaps/j-spec?fieldManager=kubedream-operator&force=true"
    )
    assert headers["Content-Type"] == "application/apply-patch+yaml"
    assert body == CONFIG_MAP


def test_create_or_get_survives_a_concurrent_create() -> None:
    kube, client = _kube(
        _Response(404, {}),
        _Response(409, {"message": "already exists"}),
        _Response(200, CONFIG_MAP),
    )
    assert kube.create_or_get(CONFIG_MAP) == (CONFIG_MAP, False)
    assert [c[0] for c in client.calls] == ["GET", "POST", "GET"]


def test_job_spec_patch_is_a_merge_patch() -> None:
    kube, client = _kube(_Response(200, {"spec": {"suspend": True}}))
    kube.patch_job_spec("ns", "j", {"suspend": True, "activeDeadlineSeconds": None})
    _, _, headers, body = client.calls[0]
    assert headers["Content-Type"] == "application/merge-patch+json"
    assert body == {"spec": {"suspend": True, "activeDeadlineSeconds": None}}


def _owned_by(uid: str | None) -> dict[str, Any]:
    refs = [{"kind": "FineTuneJob", "uid": uid, "controller": True}] if uid else []
    return {"kind": "Job", "metadata": {"name": "j", "ownerReferences": refs}}


def test_ownership() -> None:
    check_owned(_owned_by("mine"), "mine")
    with pytest.raises(ApiTemporaryError, match="garbage collection"):
        check_owned(_owned_by("a-deleted-namesake"), "mine")
    with pytest.raises(ApiPermanentError, match="not managed by this FineTuneJob") as caught:
        check_owned(_owned_by(None), "mine")
    assert caught.value.reason == "NameConflict"
    assert k8s.controller_uid(_owned_by("x")) == "x"
