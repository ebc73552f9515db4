"""Plain-JSON calls to the Kubernetes API through a configured `kubernetes.client.ApiClient`.

The node agent works on pods as the API serves them (camelCase dicts, exactly the fields the
kubelet reads), and it needs a few calls the typed client handles awkwardly (a Binding, a
watch that survives expiry). This keeps the client's configuration, TLS and auth, and returns
dicts. Errors raise kubernetes.client.exceptions.ApiException with the HTTP status, as the typed
client does. Used by devbed.node_agent and the bed's tests.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

Obj = dict[str, Any]
STRATEGIC_MERGE = "application/strategic-merge-patch+json"
MERGE = "application/merge-patch+json"


class KubeRest:
    """GET/POST/PATCH/DELETE and WATCH on API paths such as /api/v1/namespaces/x/pods."""

    def __init__(self, api: ApiClient) -> None:
        self.api = api

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, str | int | bool] | None = None,
        content_type: str = "application/json",
        timeout: float | tuple[float, float] = 30.0,
    ) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        method, url, headers, body, _ = self.api.param_serialize(
            method, path, query_params=dict(query) if query else None, header_params=headers,
            body=body, auth_settings=["BearerToken"],
        )  # fmt: skip
        return self.api.call_api(
            method, url, header_params=headers, body=body, _request_timeout=timeout
        )

    @staticmethod
    def _check(resp: Any) -> bytes:
        data: bytes = resp.read()
        if not 200 <= resp.status <= 299:
            raise ApiException(
                status=resp.status, reason=resp.reason, body=data.decode(errors="replace")
            )
        return data

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, str | int | bool] | None = None,
        content_type: str = "application/json",
    ) -> Obj:
        """One call; the decoded JSON reply ({} if empty)."""
        data = self._check(self._call(method, path, body, query, content_type))
        result: Obj = json.loads(data) if data else {}
        return result

    def get(self, path: str, **query: str | int | bool) -> Obj:
        return self.request("GET", path, query=query)

    def post(self, path: str, body: Obj) -> Obj:
        return self.request("POST", path, body)

    def patch(self, path: str, body: Obj, content_type: str = STRATEGIC_MERGE) -> Obj:
        return self.request("PATCH", path, body, content_type=content_type)

    def delete(self, path: str, body: Obj | None = None, **query: str | int | bool) -> Obj:
        return self.request("DELETE", path, body, query=query)

    def watch(self, path: str, resource_version: str, timeout_seconds: int = 240) -> Iterator[Obj]:
        """Events ({"type", "object"}) of a watch from `resource_version`, until the server ends
        it. An ERROR event raises ApiException with its code (410: the version is too old)."""
        query = {
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        resp = self._call("GET", path, query=query, timeout=(10.0, timeout_seconds + 30.0))
        raw = resp.response
        try:
            if not 200 <= resp.status <= 299:
                self._check(resp)
            buffer = b""
            for chunk in raw.stream(amt=None, decode_content=True):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    event: Obj = json.loads(line)
                    if event.get("type") == "ERROR":
                        status = event.get("object") or {}
                        raise ApiException(status=status.get("code"), reason=status.get("message"))
                    yield event
        finally:
            raw.release_conn()
