"""Every Kubernetes API call the operator makes, and how its failures are classified.

The handlers call these functions; nothing else talks to the API server (kopf's own
watching, status patching and event posting aside). Requests go through the official
client's `ApiClient` as plain JSON dicts, so objects look exactly as `render` built them and
as `status` expects to read them.

Failures become one of two kopf errors:

- `ApiTemporaryError` (a `kopf.TemporaryError`): the world's hiccups - connection errors,
  timeouts, 409 conflicts, 429 throttling, 5xx, 404 of a namespace being created, and 403
  (RBAC being fixed). kopf retries the handler with the handlers' bounded backoff.
- `ApiPermanentError` (a `kopf.PermanentError`): requests that will never succeed as they
  are - 400/422 (an object the API server rejects, e.g. an invalid quantity) and name
  conflicts with objects this FineTuneJob does not own. They are reported in status.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

import kopf
import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from . import contract
from .spec import KIND

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = (5.0, 30.0)
"""Connect and read timeouts of one request (seconds): a hung API server is a temporary error."""

_PATHS = {
    ("v1", "ConfigMap"): "/api/v1/namespaces/{ns}/configmaps",
    ("v1", "Service"): "/api/v1/namespaces/{ns}/services",
    ("v1", "Pod"): "/api/v1/namespaces/{ns}/pods",
    ("batch/v1", "Job"): "/apis/batch/v1/namespaces/{ns}/jobs",
}
_PERMANENT_STATUSES = {400, 422}


class ApiTemporaryError(kopf.TemporaryError):
    """An API call failed for a reason that may pass; retry later. `status`: the HTTP status (0: none)."""

    def __init__(self, message: str, delay: float = 5, status: int = 0) -> None:
        super().__init__(message, delay=delay)
        self.status = status


class ApiPermanentError(kopf.PermanentError):
    """An API call can never succeed as it is; `reason` is a CamelCase word for status."""

    def __init__(self, message: str, reason: str = "ApiRejected") -> None:
        super().__init__(message)
        self.reason = reason


def _api_message(exc: ApiException) -> str:
    try:
        body = json.loads(exc.body or "")
    except ValueError:
        return str(exc.body or exc.reason or "")
    return str(body.get("message") or exc.reason or "") if isinstance(body, dict) else str(body)


class Kube:
    """A connection to one API server. Thread-safe: kopf calls sync handlers from a thread pool."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client

    @classmethod
    def connect(cls) -> Kube:
        """In-cluster credentials in a pod, else $KUBECONFIG / ~/.kube/config."""
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except ConfigException:
            config.load_kube_config(client_configuration=configuration)
        return cls(client.ApiClient(configuration))

    # -- one request -------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        what: str = "",
    ) -> dict[str, Any] | None:
        """One API request; the JSON answer as a dict, None for 404, classified errors otherwise."""
        params = {k: v for k, v in (query or {}).items() if v is not None}
        url_path = path + ("?" + urlencode(params) if params else "")
        headers = {"Accept": "application/json", "Content-Type": content_type}
        method, url, headers, body, _ = self.api_client.param_serialize(
            method, url_path, header_params=headers, body=body, auth_settings=["BearerToken"]
        )
        label = what or f"{method} {path}"
        try:
            response = self.api_client.call_api(
                method, url, headers, body, _request_timeout=REQUEST_TIMEOUT
            )
            data = response.read()
        except ApiException as exc:  # raised by the client for TLS trouble and throttling
            raise self._classify(exc.status or 0, _api_message(exc), label) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise ApiTemporaryError(
                f"{label}: cannot reach the API server: {exc}", delay=5
            ) from exc
        if response.status == 404:
            return None
        if response.status >= 300:
            try:
                message = str(json.loads(data).get("message", ""))
            except (ValueError, AttributeError):
                message = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
            raise self._classify(response.status, message, label)
        return json.loads(data) if data else {}

    @staticmethod
    def _classify(
        status: int, message: str, label: str
    ) -> kopf.TemporaryError | kopf.PermanentError:
        text = f"{label}: HTTP {status}: {message}".rstrip(": ")
        if status in _PERMANENT_STATUSES:
            return ApiPermanentError(text)
        return ApiTemporaryError(text, delay=30 if status == 403 else 5, status=status)

    # -- children ----------------------------------------------------------------------

    @staticmethod
    def _collection(obj: Mapping[str, Any]) -> str:
        key = (obj["apiVersion"], obj["kind"])
        return _PATHS[key].format(ns=quote(obj["metadata"]["namespace"]))

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """One object, or None when it does not exist."""
        path = _PATHS[(api_version, kind)].format(ns=quote(namespace)) + "/" + quote(name)
        return self.request("GET", path, what=f"get {kind} {namespace}/{name}")

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply (field manager `kubedream-operator`, forcing conflicts): create or update."""
        name = obj["metadata"]["name"]
        result = self.request(
            "PATCH",
            self._collection(obj) + "/" + quote(name),
            query={"fieldManager": contract.FIELD_MANAGER, "force": "true"},
            body=dict(obj),
            content_type="application/apply-patch+yaml",
            what=f"apply {obj['kind']} {name}",
        )
        if result is None:  # 404 on apply: the namespace is gone or not there yet
            raise ApiTemporaryError(f"apply {obj['kind']} {name}: namespace not found", delay=10)
        return result

    def create_or_get(self, obj: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create the object unless it exists; return (the object, whether this call created it)."""
        name = obj["metadata"]["name"]
        ns = obj["metadata"]["namespace"]
        existing = self.get(obj["apiVersion"], obj["kind"], ns, name)
        if existing is not None:
            return existing, False
        try:
            created = self.request(
                "POST",
                self._collection(obj),
                query={"fieldManager": contract.FIELD_MANAGER},
                body=dict(obj),
                what=f"create {obj['kind']} {name}",
            )
        except ApiTemporaryError as exc:
            if exc.status != 409:
                raise
            created = None  # someone (an earlier run of this handler) created it meanwhile
        if created is None:
            again = self.get(obj["apiVersion"], obj["kind"], ns, name)
            if again is None:
                raise ApiTemporaryError(
                    f"create {obj['kind']} {name}: created but not readable yet", delay=2
                )
            return again, False
        return created, True

    def patch_job_spec(
        self, namespace: str, name: str, fields: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Change mutable Job spec fields (suspend, backoffLimit, deadlines) with a merge patch.

        Not server-side apply: the Job's pod template is immutable, so the operator owns the
        Job whole at creation and afterwards touches only these fields. None removes a field.
        """
        result = self.request(
            "PATCH",
            _PATHS[("batch/v1", "Job")].format(ns=quote(namespace)) + "/" + quote(name),
            query={"fieldManager": contract.FIELD_MANAGER},
            body={"spec": dict(fields)},
            content_type="application/merge-patch+json",
            what=f"patch Job {name} ({', '.join(f'{k}={v}' for k, v in fields.items())})",
        )
        if result is None:
            raise ApiTemporaryError(f"Job {namespace}/{name} vanished while patching it", delay=2)
        return result

    def read_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The trainer Job, or None."""
        return self.get("batch/v1", "Job", namespace, name)

    def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        """Pods matching a label selector."""
        result = self.request(
            "GET",
            _PATHS[("v1", "Pod")].format(ns=quote(namespace)),
            query={"labelSelector": label_selector},
            what=f"list pods {label_selector}",
        )
        return list((result or {}).get("items") or [])

    def job_pods(self, job: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The pods of this very Job (by its uid label, so a same-named predecessor's pods never count)."""
        uid = job["metadata"]["uid"]
        return self.list_pods(
            job["metadata"]["namespace"], f"batch.kubernetes.io/controller-uid={uid}"
        )


def controller_uid(obj: Mapping[str, Any]) -> str | None:
    """The uid of the object's controlling FineTuneJob, if one controls it."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or ():
        if ref.get("controller") and ref.get("kind") == KIND:
            return str(ref.get("uid"))
    return None


def check_owned(obj: Mapping[str, Any], uid: str) -> None:
    """Refuse to touch an object of the same name that another owner controls."""
    owner = controller_uid(obj)
    if owner == uid:
        return
    kind, name = obj.get("kind", "object"), (obj.get("metadata") or {}).get("name")
    if owner is not None:
        # A FineTuneJob of the same name was deleted and re-created; GC removes the old children soon.
        raise ApiTemporaryError(
            f"{kind} {name} still belongs to a deleted FineTuneJob; waiting for garbage collection",
            delay=5,
        )
    raise ApiPermanentError(
        f"{kind} {name} already exists and is not managed by this FineTuneJob; delete or rename it",
        reason="NameConflict",
    )
