"""Support for the operator's tests on the real test bed: the FineTuneJob CRD established in
the bed's kube-apiserver, `Jobs` (FineTuneJobs and their children in one namespace, over
REST), `PodWatch` (every version of every pod) and `Operator` (`kubedream operator -n NAMESPACE` as a subprocess). The fixtures that
wrap them (`crd`, `jobs`, `operator`) are in conftest.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import ProtocolError

from kubedream_operator.crd import CRD_NAME, build_crd
from kubedream_operator.devbed.bed import BedInfo, tail
from kubedream_operator.devbed.rest import MERGE, KubeRest
from kubedream_operator.spec import API_VERSION
from tests.plugins.bed import wait_for

CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
STATUS_INTERVAL = "1"
KUBEDREAM = Path(sys.executable).with_name("kubedream")


def condition(obj: dict[str, Any], kind: str) -> bool:
    return any(
        c.get("type") == kind and c.get("status") == "True"
        for c in (obj.get("status") or {}).get("conditions") or ()
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def get_or_none(rest: KubeRest, path: str) -> dict[str, Any] | None:
    try:
        return rest.get(path)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def establish_crd(bed: BedInfo) -> dict[str, Any]:
    """The generated CRD, created (or replaced) in the bed and established."""
    rest = bed.rest()
    wanted = build_crd()
    existing = get_or_none(rest, f"{CRDS}/{CRD_NAME}")
    if existing is None:
        rest.post(CRDS, wanted)
    else:
        wanted["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
        rest.request("PUT", f"{CRDS}/{CRD_NAME}", wanted)
    return wait_for(
        lambda: (lambda c: c if condition(c, "Established") else None)(
            rest.get(f"{CRDS}/{CRD_NAME}")
        ),
        30,
        "the FineTuneJob CRD to be established",
    )


class Jobs:
    """FineTuneJobs and their children in one namespace, through the bed's REST client."""

    def __init__(self, bed: BedInfo, namespace: str) -> None:
        self.rest = bed.rest()
        self.ns = namespace
        self.base = f"/apis/{API_VERSION}/namespaces/{namespace}/finetunejobs"

    def manifest(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": "FineTuneJob",
            "metadata": {"name": name},
            "spec": spec,
        }

    def create(self, name: str, spec: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
        body = self.manifest(name, spec)
        if dry_run:
            return self.rest.request("POST", self.base, body, query={"dryRun": "All"})
        # A CRD just established may take a moment to be served.
        return wait_for(lambda: self._post_when_served(body), 20, "the FineTuneJob API")

    def _post_when_served(self, body: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return self.rest.post(self.base, body)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def get(self, name: str) -> dict[str, Any] | None:
        return get_or_none(self.rest, f"{self.base}/{name}")

    def patch_spec(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return self.rest.patch(f"{self.base}/{name}", {"spec": spec}, content_type=MERGE)

    def delete(self, name: str) -> None:
        self.rest.delete(f"{self.base}/{name}")

    def status(self, name: str) -> dict[str, Any]:
        return (self.get(name) or {}).get("status") or {}

    def phase(self, name: str) -> str | None:
        phase: str | None = self.status(name).get("phase")
        return phase

    def job(self, name: str) -> dict[str, Any] | None:
        return get_or_none(self.rest, f"/apis/batch/v1/namespaces/{self.ns}/jobs/{name}")

    def config_map(self, name: str) -> dict[str, Any] | None:
        return get_or_none(self.rest, f"/api/v1/namespaces/{self.ns}/configmaps/{name}-spec")

    def service(self, name: str) -> dict[str, Any] | None:
        return get_or_none(self.rest, f"/api/v1/namespaces/{self.ns}/services/{name}")

    def pods(self, name: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.rest.get(
            f"/api/v1/namespaces/{self.ns}/pods", labelSelector=f"kubedream.io/job={name}"
        )["items"]
        return items

    def live_pods(self, name: str) -> list[dict[str, Any]]:
        return [p for p in self.pods(name) if p["status"].get("phase") in ("Pending", "Running")]

    def events(self, name: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.rest.get(
            f"/api/v1/namespaces/{self.ns}/events",
            fieldSelector=f"involvedObject.name={name},involvedObject.kind=FineTuneJob",
        )["items"]
        return items

    def secret(self, name: str, data: dict[str, str]) -> None:
        self.rest.post(
            f"/api/v1/namespaces/{self.ns}/secrets",
            {"metadata": {"name": name}, "stringData": data},
        )


class Operator:
    """`kubedream operator -n NAMESPACE` as a subprocess, pointed at the bed."""

    def __init__(self, bed: BedInfo, namespace: str, log: Path) -> None:
        self.bed, self.namespace, self.log = bed, namespace, log
        self.process: subprocess.Popen[bytes] | None = None
        self.metrics_port = free_port()
        self.health_port = free_port()

    def start(self) -> None:
        env = {
            **os.environ,
            **self.bed.env,
            "KUBEDREAM_STATUS_INTERVAL": STATUS_INTERVAL,
            "KUBEDREAM_HANDLER_RETRIES": "5",
        }
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    str(KUBEDREAM),
                    "operator",
                    "-n",
                    self.namespace,
                    "--metrics-port",
                    str(self.metrics_port),
                    "--health-port",
                    str(self.health_port),
                    "--trainer-image",
                    "kubedream-trainer:bed",
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self) -> None:
        """SIGKILL: no cleanup, no final status write, as when a node dies."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def tail(self) -> str:
        return tail(self.log, 60)


def trainer_exit(pod: dict[str, Any]) -> int | None:
    """The exit code of the pod's ended container, if one ended."""
    for container in pod["status"].get("containerStatuses") or ():
        terminated = (container.get("state") or {}).get("terminated")
        if terminated:
            code: int = terminated["exitCode"]
            return code
    return None


class PodWatch:
    """Every version of every pod in a namespace, recorded by a watch in a thread, so a short-
    lived state (a pod Failed just before its deletion completes) is not missed. A watch the
    server ends is resumed from the last version seen, until `stop`."""

    def __init__(self, bed: BedInfo, namespace: str) -> None:
        self.rest = bed.rest()
        self.path = f"/api/v1/namespaces/{namespace}/pods"
        self.versions: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        version = self.rest.get(self.path)["metadata"]["resourceVersion"]
        self._thread = threading.Thread(target=self._run, args=(version,), daemon=True)
        self._thread.start()

    def _run(self, version: str) -> None:
        while not self._stopped.is_set():
            try:
                for event in self.rest.watch(self.path, version, timeout_seconds=5):
                    version = event["object"]["metadata"]["resourceVersion"]
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        with self._lock:
                            self.versions.append(event["object"])
            except (ProtocolError, ApiException):
                if self._stopped.wait(0.5):
                    return

    def of(self, pod: str) -> list[dict[str, Any]]:
        with self._lock:
            return [v for v in self.versions if v["metadata"]["name"] == pod]

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(30)
        self.rest.api.close()


def progress_step(output: Path) -> int:
    """The step in a trainer's local progress.json (0 before there is one)."""
    try:
        return int(json.loads((output / "progress.json").read_text()).get("step") or 0)
    except (OSError, ValueError):
        return 0
