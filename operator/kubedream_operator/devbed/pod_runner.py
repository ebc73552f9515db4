"""One pod on the node agent's node: its containers run as local processes, in order (init
containers, then the first app container), restarted as its restartPolicy says.

`PodRun` is a small state machine driven by the agent's loop (devbed.node_agent): `update` with
each new version of the pod, `tick` to notice exits, restarts and kill deadlines, `stop` on
deletion. It never calls the API itself: it records what happens in a `PodStatus`
(devbed.pod_status) and bumps `version`, and the agent pushes `status()` when that moves.
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import procs
from .pod_status import TERMINAL, PodStatus
from .podspec import (
    Lookups,
    Obj,
    PodConfigError,
    UnsupportedPod,
    container_env,
    container_mounts,
    expand,
    materialize_volumes,
    resolve_service_names,
    rewriter,
)

log = logging.getLogger(__name__)

DEFAULT_GRACE = 30
CONFIG_RETRY_SECONDS = 2.0
MAX_RESTART_BACKOFF = 8.0
# The kubelet's limits for a termination message taken from the logs
# (kubecontainer.MaxContainerTerminationMessageLogLines / ...LogLength).
MESSAGE_LOG_LINES = 80
MESSAGE_LOG_BYTES = 2048


def fallback_message(container: Obj, log_file: Path) -> str | None:
    """A failed container's termination message under `terminationMessagePolicy:
    FallbackToLogsOnError`, as the kubelet makes it: the last 80 lines of the log, at most
    2048 bytes. (The pod's log holds its init containers' output too; the tail is the
    failed container's.) None for the default policy, `File`: there is no message file."""
    if container.get("terminationMessagePolicy") != "FallbackToLogsOnError":
        return None
    try:
        with log_file.open("rb") as log:
            size = log.seek(0, 2)
            log.seek(max(0, size - 16 * MESSAGE_LOG_BYTES))
            data = log.read()
    except OSError:
        return None
    tail = b"".join(data.splitlines(keepends=True)[-MESSAGE_LOG_LINES:])[-MESSAGE_LOG_BYTES:]
    return tail.decode(errors="replace") or None


@dataclass(frozen=True)
class RunContext:
    """What every pod run shares: where pods live and how to read the cluster."""

    pods: Path
    """DIR/pods: each pod gets <ns>/<pod>/ with log, pid, uid, volumes/ and work/."""
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
        self.step = 0
        self.popen: subprocess.Popen[bytes] | None = None
        self.tracked: procs.Tracked | None = None
        self.volumes: dict[str, Path] | None = None
        self.retry_at = 0.0
        self.kill_at: float | None = None
        self.stopping = False
        self.record = PodStatus(pod)
        self.version = 0
        """Bumped on every status change; the agent pushes status when it moves."""
        self._changed()

    # --- driving -----------------------------------------------------------------------------

    @property
    def phase(self) -> str:
        return self.record.phase

    @property
    def running(self) -> bool:
        return self.tracked is not None and self.tracked.group_alive()

    @property
    def finished(self) -> bool:
        """Terminal, and no process of the pod is left."""
        return self.phase in TERMINAL and not self.running

    def status(self) -> Obj:
        """The pod status to report (the `status` of a strategic-merge patch)."""
        return self.record.render()

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
        due = time.monotonic() >= self.retry_at
        if self.popen is None and not self.stopping and self.phase not in TERMINAL and due:
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
        container, is_init = self.steps[self.step]
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
            argv, env, cwd = self._command(container, self.volumes)
        except PodConfigError as exc:
            self.retry_at = time.monotonic() + CONFIG_RETRY_SECONDS
            if self.record.waiting(container, "CreateContainerConfigError", str(exc)):
                self._changed()
            return
        except UnsupportedPod as exc:
            self._finish("Failed", "UnsupportedByNodeAgent", str(exc))
            return
        try:
            self.popen, self.tracked = procs.spawn(argv, log=self.folder / "log", env=env, cwd=cwd)
        except OSError as exc:
            self.record.terminated(container, 128, "StartError", f"cannot run {argv[0]!r}: {exc}")
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
        self.record.running(container, f"kubedream://{self.popen.pid}")
        if not is_init:
            self.record.phase = "Running"
        self._changed()

    def _command(
        self, container: Obj, volumes: Mapping[str, Path]
    ) -> tuple[list[str], dict[str, str], Path]:
        """argv, environment and working directory, every mountPath rewritten to its folder."""
        if not container.get("command"):
            raise UnsupportedPod(
                f"container {container['name']!r} has no command; the node agent cannot run an image's entrypoint"
            )
        rewrite = rewriter(container_mounts(container, volumes))
        base = {**self.ctx.base_env, "HOSTNAME": self.name}
        env = container_env(self.pod, container, self.ctx.lookups, base, self.ctx.allocatable)
        env = {key: resolve_service_names(rewrite(value)) for key, value in env.items()}
        # The trainer and helpers run from the agent's environment: its bin folder comes first.
        env["PATH"] = f"{self.ctx.base_env['PATH'].split(':')[0]}:{env.get('PATH', '')}".rstrip(":")
        words = [*container["command"], *(container.get("args") or [])]
        argv = [resolve_service_names(rewrite(expand(word, env))) for word in words]
        cwd = self.folder / "work"
        if container.get("workingDir") and Path(rewrite(container["workingDir"])).is_dir():
            cwd = Path(rewrite(container["workingDir"]))
        return argv, env, cwd

    def _exited(self, code: int) -> None:
        container, _ = self.steps[self.step]
        if self.tracked is not None:
            # As a runtime tears down the container's cgroup: nothing of the group outlives it.
            procs.stop_group(self.tracked, grace=0.0, popen=self.popen)
        (self.folder / "pid").unlink(missing_ok=True)
        message = fallback_message(container, self.folder / "log") if code else None
        self.record.terminated(container, code, "Completed" if code == 0 else "Error", message)
        self.popen = None
        log.info("%s/%s: %s exited with %d", self.namespace, self.name, container["name"], code)
        self._after_exit(container, code)

    def _after_exit(self, container: Obj, code: int) -> None:
        is_init = self.steps[self.step][1]
        if self.stopping:
            self._finish("Succeeded" if code == 0 and not is_init else "Failed", None, None)
            return
        if is_init and code == 0:
            self.step += 1
            self.record.waiting(self.steps[self.step][0], "PodInitializing")
            self._changed()
        elif self.restart_policy == "Always" or (self.restart_policy == "OnFailure" and code != 0):
            count = self.record.restarting(container)
            self.retry_at = time.monotonic() + min(MAX_RESTART_BACKOFF, 2.0 ** (count - 1))
            self._changed()
        else:
            self._finish("Succeeded" if code == 0 and not is_init else "Failed", None, None)

    def _finish(self, phase: str, reason: str | None, message: str | None) -> None:
        self.record.finish(phase, reason, message, killed=self.stopping)
        self._changed()

    def _changed(self) -> None:
        initialized = not any(is_init for _, is_init in self.steps[self.step :])
        self.record.refresh_conditions(
            initialized, self.phase == "Running" and self.popen is not None
        )
        self.version += 1
