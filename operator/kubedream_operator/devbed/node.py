"""The node agent's Node: registration, its status (Ready, capacity with 8 pretend GPUs) and
its Lease in kube-node-lease, renewed so that the node-lifecycle controller keeps it Ready.

Used by devbed.node_agent, whose main loop calls `renew_lease` every 10 s and `report` every
30 s.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path

from kubernetes.client.exceptions import ApiException

from .podspec import Obj
from .rest import KubeRest

GPU_RESOURCE = "nvidia.com/gpu"
GPUS = "8"
LEASE_SECONDS = 40
VERSION = "v0.1.0-kubedream-node-agent"


def _now_micro() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _memory_kib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return 0


def node_resources() -> dict[str, str]:
    """What the node offers: the host's cores and memory, 110 pods, and 8 pretend GPUs."""
    return {
        "cpu": str(os.cpu_count() or 1),
        "memory": f"{_memory_kib()}Ki",
        "pods": "110",
        "ephemeral-storage": "100Gi",
        GPU_RESOURCE: GPUS,
    }


class Node:
    """One Node object, kept Ready by whoever calls `report` and `renew_lease` in time."""

    def __init__(self, kube: KubeRest, name: str) -> None:
        self.kube = kube
        self.name = name
        self.uid = ""
        self.reported = False

    def register(self) -> None:
        """Create the Node if needed, then report it Ready."""
        labels = {
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "kubedream.dev/node-agent": "true",
            "nvidia.com/gpu.present": "true",
        }
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.name, "labels": labels},
        }
        try:
            self.kube.post("/api/v1/nodes", body)
        except ApiException as exc:
            if exc.status != 409:
                raise
        node = self.kube.get(f"/api/v1/nodes/{self.name}")
        self.uid = node["metadata"]["uid"]
        self.report()
        self.renew_lease()

    def report(self) -> None:
        """Post the node's status: Ready, no pressure, the host's resources."""
        now = _now_micro()[:19] + "Z"
        resources = node_resources()

        def condition(kind: str, status: str, reason: str, message: str) -> Obj:
            return {"type": kind, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": now, "lastTransitionTime": now}  # fmt: skip

        status: Obj = {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [
                condition("Ready", "True", "KubeletReady", "kubedream node agent is posting ready status"),
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "no memory pressure"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "no disk pressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "no PID pressure"),
            ],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": self.name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "machineID": "kubedream", "systemUUID": "kubedream", "bootID": "kubedream",
                "kernelVersion": platform.release(), "osImage": "kubedream node agent (no containers)",
                "containerRuntimeVersion": f"kubedream://{VERSION}", "kubeletVersion": VERSION,
                "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64",
            },
        }  # fmt: skip
        if self.reported:
            # Conditions keep their first transition time: the API merges them by type.
            for item in status["conditions"]:
                item.pop("lastTransitionTime")
        self.kube.patch(f"/api/v1/nodes/{self.name}/status", {"status": status})
        self.reported = True

    def renew_lease(self) -> None:
        """Renew (or create) the node's Lease: the node-lifecycle controller's heartbeat."""
        leases = "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"
        spec = {
            "holderIdentity": self.name,
            "leaseDurationSeconds": LEASE_SECONDS,
            "renewTime": _now_micro(),
        }
        try:
            self.kube.patch(f"{leases}/{self.name}", {"spec": spec})
        except ApiException as exc:
            if exc.status != 404:
                raise
            owner = {"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": self.uid}
            body = {"metadata": {"name": self.name, "ownerReferences": [owner]}, "spec": spec}
            self.kube.post(leases, body)
