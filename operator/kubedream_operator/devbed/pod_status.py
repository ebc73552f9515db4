"""The status a kubelet would report for one pod: each container's state (waiting, running,
terminated, with restart count and last state), the pod's conditions and its phase.

Kept by devbed.pod_runner, which decides what happens; this module only records it and renders
the `status` object the node agent patches onto the pod.
"""

from __future__ import annotations

import datetime as dt

from .podspec import POD_IP, Obj

TERMINAL = ("Succeeded", "Failed")
NOT_RUN = "NotRunByNodeAgent"
NOT_RUN_MESSAGE = "the node agent runs only the first app container"


def now_rfc3339() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class PodStatus:
    """Container states and conditions of one pod, and its phase."""

    def __init__(self, pod: Obj) -> None:
        spec = pod["spec"]
        self.init_containers: list[Obj] = list(spec.get("initContainers") or [])
        self.containers: list[Obj] = list(spec["containers"])
        self.phase = "Pending"
        self.reason: str | None = None
        self.message: str | None = None
        self.start_time = now_rfc3339()
        self.states: dict[str, Obj] = {}
        self.conditions: dict[str, Obj] = {}
        for container in self.init_containers + self.containers[:1]:
            first = container is (self.init_containers + self.containers)[0]
            self.waiting(container, "ContainerCreating" if first else "PodInitializing")
        for container in self.containers[1:]:
            self.waiting(container, NOT_RUN, NOT_RUN_MESSAGE)

    def _base(self, container: Obj, keep: tuple[str, ...] = ("lastState",)) -> Obj:
        previous = self.states.get(container["name"], {})
        base: Obj = {
            "name": container["name"],
            "image": container.get("image", ""),
            "imageID": "",
            "ready": False,
            "started": False,
            "restartCount": previous.get("restartCount", 0),
        }
        base.update({key: previous[key] for key in keep if previous.get(key)})
        return base

    def waiting(self, container: Obj, reason: str, message: str | None = None) -> bool:
        """Record a waiting state; False if it was already exactly that."""
        waiting: Obj = {"reason": reason, **({"message": message} if message else {})}
        if self.states.get(container["name"], {}).get("state") == {"waiting": waiting}:
            return False
        self.states[container["name"]] = {**self._base(container), "state": {"waiting": waiting}}
        return True

    def running(self, container: Obj, container_id: str) -> None:
        self.states[container["name"]] = {
            **self._base(container),
            "containerID": container_id,
            "ready": True,
            "started": True,
            "state": {"running": {"startedAt": now_rfc3339()}},
        }

    def terminated(
        self, container: Obj, code: int, reason: str, message: str | None = None
    ) -> None:
        """Record an exit (or a container that never ran, when the pod ends)."""
        previous = self.states.get(container["name"], {})
        terminated: Obj = {"exitCode": code, "reason": reason, "finishedAt": now_rfc3339()}
        started = previous.get("state", {}).get("running", {}).get("startedAt")
        if started:
            terminated["startedAt"] = started
        if message:
            terminated["message"] = message
        self.states[container["name"]] = {
            **self._base(container, keep=("lastState", "containerID")),
            "state": {"terminated": terminated},
        }

    def is_terminated(self, container: Obj) -> bool:
        return "terminated" in self.states[container["name"]].get("state", {})

    def restarting(self, container: Obj) -> int:
        """The container will run again: its exit becomes lastState; returns the restart count."""
        previous = self.states[container["name"]]
        count: int = previous.get("restartCount", 0) + 1
        code = previous["state"].get("terminated", {}).get("exitCode", 0)
        self.states[container["name"]] = {
            **self._base(container, keep=()),
            "restartCount": count,
            "state": {"waiting": {"reason": "CrashLoopBackOff" if code else "Completed"}},
            "lastState": previous["state"],
        }
        return count

    def finish(self, phase: str, reason: str | None, message: str | None, killed: bool) -> None:
        """The pod is over: containers that did not end are marked terminated."""
        self.phase, self.reason, self.message = phase, reason, message
        for container in self.init_containers + self.containers[:1]:
            if not self.is_terminated(container):
                self.terminated(container, 137 if killed else 1, reason or "Terminated", message)
        for container in self.containers[1:]:
            self.terminated(container, 0, NOT_RUN, NOT_RUN_MESSAGE)

    def _condition(self, kind: str, status: bool, reason: str | None = None) -> None:
        value = "True" if status else "False"
        old = self.conditions.get(kind)
        if old is not None and old["status"] == value and old.get("reason") == reason:
            return
        self.conditions[kind] = {"type": kind, "status": value, "lastTransitionTime": now_rfc3339()}
        if reason:
            self.conditions[kind]["reason"] = reason

    def refresh_conditions(self, initialized: bool, main_running: bool) -> None:
        done = "PodCompleted" if self.phase in TERMINAL else None
        self._condition("PodScheduled", True)
        self._condition("PodReadyToStartContainers", self.phase not in TERMINAL)
        self._condition("Initialized", initialized or self.phase == "Succeeded")
        self._condition("ContainersReady", main_running, done)
        self._condition("Ready", main_running, done)

    def render(self) -> Obj:
        """The `status` object to patch onto the pod."""
        status: Obj = {
            "phase": self.phase,
            "hostIP": POD_IP,
            "hostIPs": [{"ip": POD_IP}],
            "podIP": POD_IP,
            "podIPs": [{"ip": POD_IP}],
            "startTime": self.start_time,
            "conditions": list(self.conditions.values()),
            "containerStatuses": [self.states[c["name"]] for c in self.containers],
            "reason": self.reason,
            "message": self.message,
        }
        if self.init_containers:
            status["initContainerStatuses"] = [self.states[c["name"]] for c in self.init_containers]
        return status
