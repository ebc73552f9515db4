"""One pod on the node agent's node: its containers run as local processes, in order (init
containers, then the first app container), and its status is kept the way a kubelet reports it.

`PodRun` is a small state machine driven by the agent's loop (devbed.node_agent): `update` with
each new version of the pod, `tick` to notice exits, restarts and kill deadlines, `stop` on
deletion. It never calls the API itself; the agent pushes `status()` when `version` changes.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import procs
from .podspec import (
    POD_IP,
    Lookups,
    Obj,
    PodConfigError,
    UnsupportedPod,
    container_env,
    container_mounts,
    expand,
    materialize_volumes,
    rewriter,
)

log = logging.getLogger(__name__)

TERMINAL = ("Succeeded", "Failed")
DEFAULT_GRACE = 30
CONFIG_RETRY_SECONDS = 2.0
MAX_RESTART_BACKOFF = 10.0


def now_rfc3339() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class RunContext:
    """What every pod run shares: where pods live and how to read the cluster."""

    pods: Path
    """DIR/pods: each pod gets <ns>/<pod>/ with log, pid, volumes/ and work/."""
    claims: Path
    """Folder standing in for persistentVolumeClaims, <ns>/<claim>."""
    lookups: Lookups
    base_env: Mapping[str, str]
    """PATH (the agent's venv bin first), HOME, KUBERNETES_SERVICE_HOST/PORT, ..."""
    allocatable: Mapping[str, str]
    """The node's allocatable resources (limits default to these in resourceFieldRef)."""


def _exit_code(returncode: int) -> int:
    """Popen reports death by signal N as -N; a container runtime reports 128+N."""
    return 128 - returncode if returncode < 0 else returncode


class PodRun:
    """A pod bound to this node, from first sight until its processes are gone."""

    def __init__(self, pod: Obj, ctx: RunContext) -> None:
        self.pod = pod
        self.ctx = ctx
        meta = pod["metadata"]
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.folder = ctx.pods / self.namespace / self.name
        spec = pod["spec"]
        self.steps: list[tuple[Obj, bool]] = [(c, True) for c in spec.get("initContainers") or []]
        self.steps.append((spec["containers"][0], False))
        self.restart_policy: str = spec.get("restartPolicy") or "Always"
        self.phase = "Pending"
        self.step = 0
        self.popen: subprocess.Popen[bytes] | None = None
        self.tracked: procs.Tracked | None = None
        self.volumes: dict[str, Path] | None = None
        self.container_status: dict[str, Obj] = {}
        self.conditions: dict[str, Obj] = {}
        self.start_time = now_rfc3339()
        self.retry_at = 0.0
        self.kill_at: float | None = None
        self.stopping = False
        self.message: str | None = None
        self.reason: str | None = None
        self.version = 0
        """Bumped on every status change; the agent pushes status when it moves."""
        for container, _ in self.steps:
            self._waiting(
                container,
                "ContainerCreating" if container is self.steps[0][0] else "PodInitializing",
            )
        for container in spec["containers"][1:]:
            self._waiting(
                container, "NotRunByNodeAgent", "the node agent runs only the first app container"
            )
        self._changed()

    # --- driving -----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.tracked is not None and self.tracked.group_alive()

    @property
    def finished(self) -> bool:
        """Terminal, and no process of the pod is left."""
        return self.phase in TERMINAL and not self.running

    def update(self, pod: Obj) -> None:
        """A newer version of the pod was observed."""
        self.pod = pod
        meta = pod["metadata"]
        if meta.get("deletionTimestamp") and not self.stopping:
            grace = meta.get("deletionGracePeriodSeconds")
            if grace is None:
                grace = pod["spec"].get("terminationGracePeriodSeconds", DEFAULT_GRACE)
            self.stop(float(grace), "the pod was deleted")

    def stop(self, grace: float, why: str) -> None:
        """SIGTERM the running container's process group; SIGKILL it after `grace` seconds."""
        self.stopping = True
        if self.running and self.tracked is not None:
            log.info("%s/%s: stopping (%s), grace %.0fs", self.namespace, self.name, why, grace)
            procs.signal_group(self.tracked, signal.SIGTERM)
            self.kill_at = time.monotonic() + grace
        elif self.phase not in TERMINAL:
            self._finish("Failed", "Terminated", why)

    def tick(self) -> None:
        """Notice exits, start what is due, enforce kill deadlines."""
        if self.popen is not None and self.popen.poll() is not None:
            self._exited(_exit_code(self.popen.returncode))
        if (
            self.tracked is not None
            and self.kill_at is not None
            and time.monotonic() >= self.kill_at
        ):
            procs.signal_group(self.tracked, signal.SIGKILL)
            self.kill_at = None
        if (
            self.popen is None
            and not self.stopping
            and self.phase not in TERMINAL
            and time.monotonic() >= self.retry_at
        ):
            self._start_step()

    def kill_now(self) -> None:
        """SIGKILL what is left, and reap it (agent shutdown, or the pod vanished)."""
        if self.tracked is not None:
            procs.stop_group(self.tracked, grace=0.0, popen=self.popen)

    # --- starting and exits ------------------------------------------------------------------

    def _prepare_folder(self) -> None:
        """A new pod under an old name moves the old pod's folder aside."""
        uid_file = self.folder / "uid"
        if self.folder.exists() and (not uid_file.is_file() or uid_file.read_text() != self.uid):
            old = uid_file.read_text()[:8] if uid_file.is_file() else "old"
            aside = self.folder.with_name(f"{self.name}.{old}")
            shutil.rmtree(aside, ignore_errors=True)
            self.folder.rename(aside)
        self.folder.mkdir(parents=True, exist_ok=True)
        uid_file.write_text(self.uid)
        (self.folder / "work").mkdir(exist_ok=True)

    def _start_step(self) -> None:
        container, _ = self.steps[self.step]
        try:
            if self.volumes is None:
                self._prepare_folder()
                self.volumes = materialize_volumes(
                    self.pod,
                    self.folder / "volumes",
                    self.ctx.claims,
                    self.ctx.lookups,
                    self.ctx.allocatable,
                )
            argv, env, cwd = self._command(container)
        except PodConfigError as exc:
            self.retry_at = time.monotonic() + CONFIG_RETRY_SECONDS
            if self._waiting(container, "CreateContainerConfigError", str(exc)):
                self._changed()
            return
        except UnsupportedPod as exc:
            self._finish("Failed", "UnsupportedByNodeAgent", str(exc))
            return
        try:
            self.popen, self.tracked = procs.spawn(argv, log=self.folder / "log", env=env, cwd=cwd)
        except OSError as exc:
            self._terminated(
                container, 128, "StartError", f"cannot run {argv[0]!r}: {exc}", now_rfc3339()
            )
            self._after_exit(container, 128)
            return
        procs.write_pidfile(self.folder / "pid", self.tracked)
        log.info(
            "%s/%s: started %s (pid %d): %s",
            self.namespace,
            self.name,
            container["name"],
            self.popen.pid,
            argv,
        )
        previous = self.container_status[container["name"]]
        self.container_status[container["name"]] = {
            **self._base_status(container, previous.get("restartCount", 0)),
            "containerID": f"kubedream://{self.popen.pid}",
            "ready": True,
            "started": True,
            "state": {"running": {"startedAt": now_rfc3339()}},
            **({"lastState": previous["lastState"]} if previous.get("lastState") else {}),
        }
        if not self.steps[self.step][1]:
            self.phase = "Running"
        self._changed()

    def _command(self, container: Obj) -> tuple[list[str], dict[str, str], Path]:
        assert self.volumes is not None
        if not container.get("command"):
            raise UnsupportedPod(
                f"container {container['name']!r} has no command; the node agent cannot run an image's entrypoint"
            )
        rewrite = rewriter(container_mounts(container, self.volumes))
        base = {**self.ctx.base_env, "HOSTNAME": self.name}
        env = container_env(self.pod, container, self.ctx.lookups, base, self.ctx.allocatable)
        env = {key: rewrite(value) for key, value in env.items()}
        # The trainer and helpers run from the agent's environment: its bin folder comes first.
        env["PATH"] = f"{self.ctx.base_env['PATH'].split(':')[0]}:{env.get('PATH', '')}".rstrip(":")
        argv = [
            rewrite(expand(part, env))
            for part in [*container["command"], *(container.get("args") or [])]
        ]
        cwd = (
            Path(rewrite(container["workingDir"]))
            if container.get("workingDir")
            else self.folder / "work"
        )
        if not cwd.is_dir():
            cwd = self.folder / "work"
        return argv, env, cwd

    def _exited(self, code: int) -> None:
        container, _ = self.steps[self.step]
        assert self.tracked is not None
        # As a runtime tears down the container's cgroup: nothing of the group outlives it.
        procs.stop_group(self.tracked, grace=0.0, popen=self.popen)
        (self.folder / "pid").unlink(missing_ok=True)
        started = (
            self.container_status[container["name"]]
            .get("state", {})
            .get("running", {})
            .get("startedAt")
        )
        self._terminated(container, code, "Completed" if code == 0 else "Error", None, started)
        self.popen = None
        log.info("%s/%s: %s exited with %d", self.namespace, self.name, container["name"], code)
        self._after_exit(container, code)

    def _after_exit(self, container: Obj, code: int) -> None:
        is_init = self.steps[self.step][1]
        if self.stopping:
            self._finish("Succeeded" if code == 0 and not is_init else "Failed", None, None)
            return
        restart = self.restart_policy == "Always" or (
            self.restart_policy == "OnFailure" and code != 0
        )
        if is_init and code == 0:
            self.step += 1
            self._waiting(self.steps[self.step][0], "PodInitializing")
            self._changed()
        elif restart:
            status = self.container_status[container["name"]]
            count = status.get("restartCount", 0) + 1
            self.container_status[container["name"]] = {
                **self._base_status(container, count),
                "state": {"waiting": {"reason": "CrashLoopBackOff" if code else "Completed"}},
                "lastState": status["state"],
            }
            self.retry_at = time.monotonic() + min(
                MAX_RESTART_BACKOFF, float(2 ** min(count, 4)) / 2
            )
            self._changed()
        else:
            self._finish("Succeeded" if code == 0 and not is_init else "Failed", None, None)

    def _finish(self, phase: str, reason: str | None, message: str | None) -> None:
        self.phase = phase
        self.reason, self.message = reason, message
        for container, _ in self.steps:
            if "terminated" not in self.container_status[container["name"]].get("state", {}):
                why = reason or "Terminated"
                self._terminated(container, 137 if self.stopping else 1, why, message, None)
        for container in self.pod["spec"]["containers"][1:]:
            self._terminated(
                container,
                0,
                "NotRunByNodeAgent",
                "the node agent runs only the first app container",
                None,
            )
        self._changed()

    # --- status ------------------------------------------------------------------------------

    def _base_status(self, container: Obj, restarts: int) -> Obj:
        return {
            "name": container["name"],
            "image": container.get("image", ""),
            "imageID": "",
            "ready": False,
            "started": False,
            "restartCount": restarts,
        }

    def _waiting(self, container: Obj, reason: str, message: str | None = None) -> bool:
        """Set a waiting state; False if it was already exactly that."""
        previous = self.container_status.get(container["name"], {})
        waiting: Obj = {"reason": reason, **({"message": message} if message else {})}
        if previous.get("state") == {"waiting": waiting}:
            return False
        self.container_status[container["name"]] = {
            **self._base_status(container, previous.get("restartCount", 0)),
            "state": {"waiting": waiting},
            **({"lastState": previous["lastState"]} if previous.get("lastState") else {}),
        }
        return True

    def _terminated(
        self, container: Obj, code: int, reason: str, message: str | None, started: str | None
    ) -> None:
        previous = self.container_status.get(container["name"], {})
        terminated: Obj = {"exitCode": code, "reason": reason, "finishedAt": now_rfc3339()}
        if started:
            terminated["startedAt"] = started
        if message:
            terminated["message"] = message
        self.container_status[container["name"]] = {
            **self._base_status(container, previous.get("restartCount", 0)),
            **({"containerID": previous["containerID"]} if previous.get("containerID") else {}),
            "state": {"terminated": terminated},
            **({"lastState": previous["lastState"]} if previous.get("lastState") else {}),
        }

    def _condition(self, kind: str, status: bool, reason: str | None = None) -> None:
        value = "True" if status else "False"
        old = self.conditions.get(kind)
        if old is not None and old["status"] == value and old.get("reason") == reason:
            return
        self.conditions[kind] = {
            "type": kind,
            "status": value,
            "lastTransitionTime": now_rfc3339(),
            "lastProbeTime": None,
        }
        if reason:
            self.conditions[kind]["reason"] = reason

    def _changed(self) -> None:
        initialized = not any(is_init for _, is_init in self.steps[self.step :])
        main_running = self.phase == "Running" and self.popen is not None
        done_reason = "PodCompleted" if self.phase in TERMINAL else None
        self._condition("PodScheduled", True)
        self._condition("PodReadyToStartContainers", self.phase not in TERMINAL)
        self._condition("Initialized", initialized or self.phase == "Succeeded")
        self._condition("ContainersReady", main_running, done_reason)
        self._condition("Ready", main_running, done_reason)
        self.version += 1

    def status(self) -> Obj:
        """The pod status to report (a strategic-merge patch body's `status`)."""
        init_names = [c["name"] for c, is_init in self.steps if is_init]
        status: Obj = {
            "phase": self.phase,
            "hostIP": POD_IP,
            "hostIPs": [{"ip": POD_IP}],
            "podIP": POD_IP,
            "podIPs": [{"ip": POD_IP}],
            "startTime": self.start_time,
            "conditions": list(self.conditions.values()),
            "containerStatuses": [
                self.container_status[c["name"]] for c in self.pod["spec"]["containers"]
            ],
            "reason": self.reason,
            "message": self.message,
        }
        if init_names:
            status["initContainerStatuses"] = [self.container_status[name] for name in init_names]
        return status
