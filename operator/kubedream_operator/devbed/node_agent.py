"""The node agent: a stand-in for a kubelet, for the local test bed and tests only.

It registers one Node (Ready, with cpu, memory, pods and nvidia.com/gpu capacity), renews the
node's Lease and status, binds every pending pod that names no node to itself (there is no
scheduler), and runs each pod's containers as local processes (devbed.pod_runner). Deleting a
pod SIGTERMs its process group, SIGKILLs it after the grace period, reports the final status and
then finalizes the deletion, as a kubelet does.

It isolates nothing: no containers, images, cgroups, resource limits, probes or networking.
Never point it at a real cluster. Started by devbed.bed as
`python -m kubedream_operator.devbed.node_agent --kubeconfig K --dir DIR --node-name N`.

One thread watches pods and queues events; the main thread owns all state and makes every
other API call, so nothing needs a lock.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from kubernetes import config
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from . import procs
from .layout import Layout
from .node import Node, node_resources
from .pod_runner import PodRun, RunContext
from .pod_status import TERMINAL
from .podspec import Lookups, Obj
from .rest import KubeRest

log = logging.getLogger("kubedream.node_agent")

RENEW_SECONDS = 10.0
STATUS_SECONDS = 30.0
RESYNC_SECONDS = 30.0
TICK_SECONDS = 0.2
WATCH_SECONDS = 240
# Transient trouble talking to the API server: retry, never crash the agent.
API_ERRORS = (ApiException, HTTPError, OSError)


class NodeAgent:
    """Registers the node, runs its pods, keeps its Lease fresh."""

    def __init__(self, api: ApiClient, layout: Layout, node_name: str) -> None:
        self.kube = KubeRest(api)
        self.layout = layout
        self.node = Node(self.kube, node_name)
        self.events: queue.Queue[tuple[str, Obj]] = queue.Queue()
        self.runs: dict[str, PodRun] = {}
        self.pushed: dict[str, int] = {}
        self.done: set[str] = set()
        """Pods whose run ended here: late events about them must not start them again."""
        self.finalized: set[str] = set()
        self.stopping = threading.Event()
        self.synced = threading.Event()
        host = api.configuration.host.split("://", 1)[-1]
        port = host.rsplit(":", 1)[-1] if ":" in host else "443"
        bin_dir = str(Path(sys.executable).parent)
        self.ctx = RunContext(
            pods=layout.pods,
            claims=layout.dir / "claims",
            lookups=Lookups(
                config_map=self._read_config_map, secret=self._read_secret, token=self._token
            ),
            base_env={
                "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                "HOME": os.environ.get("HOME", "/root"),
                "LANG": os.environ.get("LANG", "C.UTF-8"),
                "KUBERNETES_SERVICE_HOST": "127.0.0.1",
                "KUBERNETES_SERVICE_PORT": port,
                "KUBERNETES_SERVICE_PORT_HTTPS": port,
            },
            allocatable=node_resources(),
        )

    # --- cluster reads for podspec -----------------------------------------------------------

    def _read(self, resource: str, namespace: str, name: str) -> Obj | None:
        try:
            return self.kube.get(f"/api/v1/namespaces/{namespace}/{resource}/{name}")
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _read_config_map(self, namespace: str, name: str) -> Obj | None:
        return self._read("configmaps", namespace, name)

    def _read_secret(self, namespace: str, name: str) -> Obj | None:
        return self._read("secrets", namespace, name)

    def _token(self, pod: Obj, account: str, seconds: int, audience: str | None) -> str:
        meta = pod["metadata"]
        spec: Obj = {
            "expirationSeconds": max(seconds, 600),
            "boundObjectRef": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta["name"],
                "uid": meta["uid"],
            },
        }
        if audience:
            spec["audiences"] = [audience]
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        path = f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}/token"
        token: str = self.kube.post(path, body)["status"]["token"]
        return token

    # --- node and lease ----------------------------------------------------------------------

    # --- the pod watch (its own thread) ------------------------------------------------------

    def watch_pods(self) -> None:
        """List, then watch from the list's resourceVersion; relist when the watch expires (410)
        or the connection breaks. Events go to the queue for the main thread."""
        backoff = 0.5
        while not self.stopping.is_set():
            try:
                listing = self.kube.get("/api/v1/pods")
                version = listing["metadata"]["resourceVersion"]
                self.events.put(("SYNC", {"items": listing["items"]}))
                self.synced.set()
                backoff = 0.5
                while not self.stopping.is_set():
                    for event in self.kube.watch("/api/v1/pods", version, WATCH_SECONDS):
                        version = event["object"]["metadata"].get("resourceVersion", version)
                        if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                            self.events.put((event["type"], event["object"]))
            except API_ERRORS as exc:
                gone = isinstance(exc, ApiException) and exc.status == 410
                if not gone:
                    log.warning("pod watch failed (%s); relisting in %.1fs", exc, backoff)
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, 5.0)

    # --- the main loop -----------------------------------------------------------------------

    def handle(self, kind: str, pod: Obj) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        uid = meta["uid"]
        if kind == "DELETED":
            run = self.runs.get(uid)
            if run is not None and not run.finished:
                run.stop(0.0, "the pod is gone from the API")
            self.done.discard(uid)
            self.finalized.discard(uid)
            return
        if not spec.get("nodeName"):
            if (
                not meta.get("deletionTimestamp")
                and spec.get("schedulerName", "default-scheduler") == "default-scheduler"
            ):
                self.bind(pod)
            return
        if spec["nodeName"] != self.node.name:
            return
        run = self.runs.get(uid)
        if run is None:
            if uid in self.done or (pod.get("status") or {}).get("phase") in TERMINAL:
                if meta.get("deletionTimestamp"):
                    self.finalize(pod)
                return
            run = self.runs[uid] = PodRun(pod, self.ctx)
        run.update(pod)

    def bind(self, pod: Obj) -> None:
        meta = pod["metadata"]
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": meta["name"], "uid": meta["uid"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.node.name},
        }
        try:
            self.kube.post(
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/binding", body
            )
            log.info("bound %s/%s to %s", meta["namespace"], meta["name"], self.node.name)
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    def finalize(self, pod: Obj) -> None:
        """Delete a terminated pod for good (grace 0), as a kubelet does once it is stopped."""
        meta = pod["metadata"]
        if meta["uid"] in self.finalized:
            return
        body = {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}}
        try:
            self.kube.delete(f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}", body)
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise
        self.finalized.add(meta["uid"])

    def push(self, run: PodRun) -> None:
        """Report the pod's status if it changed; finalize its deletion once it is finished."""
        if self.pushed.get(run.uid) != run.version:
            try:
                path = f"/api/v1/namespaces/{run.namespace}/pods/{run.name}/status"
                self.kube.patch(path, {"status": run.status()})
            except ApiException as exc:
                if exc.status != 404:
                    raise
            self.pushed[run.uid] = run.version
        if run.finished:
            if run.pod["metadata"].get("deletionTimestamp"):
                self.finalize(run.pod)
            del self.runs[run.uid]
            self.pushed.pop(run.uid, None)
            self.done.add(run.uid)

    def sync(self, pods: list[Obj]) -> None:
        """After a (re)list: pods we run that vanished meanwhile are stopped."""
        present = {p["metadata"]["uid"] for p in pods}
        for uid, run in list(self.runs.items()):
            if uid not in present and not run.finished:
                run.stop(0.0, "the pod is gone from the API")
        for pod in pods:
            self.handle("ADDED", pod)

    def step(self) -> None:
        """One pass of the main loop: drain events, tick every pod, push statuses."""
        try:
            event = self.events.get(timeout=TICK_SECONDS)
            while True:
                kind, obj = event
                if kind == "SYNC":
                    self.sync(obj["items"])
                else:
                    self.handle(kind, obj)
                event = self.events.get_nowait()
        except queue.Empty:
            pass
        for run in list(self.runs.values()):
            run.tick()
            self.push(run)

    def run(self) -> None:
        self.kill_orphans()
        self.node.register()
        watcher = threading.Thread(target=self.watch_pods, name="pod-watch", daemon=True)
        watcher.start()
        if not self.synced.wait(timeout=60):
            raise RuntimeError("could not list pods within 60s")
        self.layout.agent_ready.write_text(f"{os.getpid()}\n")
        log.info("node %s registered and watching pods", self.node.name)
        next_lease = next_status = time.monotonic()
        next_resync = next_lease + RESYNC_SECONDS
        try:
            while not self.stopping.is_set():
                if not watcher.is_alive():
                    raise RuntimeError("the pod watch thread died; see the traceback above")
                try:
                    self.step()
                    now = time.monotonic()
                    if now >= next_lease:
                        self.node.renew_lease()
                        next_lease = now + RENEW_SECONDS
                    if now >= next_status:
                        self.node.report()
                        next_status = now + STATUS_SECONDS
                    if now >= next_resync:
                        # Self-healing: an event whose handling failed is picked up here.
                        self.sync(self.kube.get("/api/v1/pods")["items"])
                        next_resync = now + RESYNC_SECONDS
                except API_ERRORS as exc:
                    log.warning("API call failed (%s); retrying", exc)
                    next_resync = time.monotonic() + 1.0
                    self.stopping.wait(1.0)
        finally:
            self.shutdown()

    def kill_orphans(self) -> None:
        """Pods left running by a previous agent in this folder are killed."""
        for pidfile in self.layout.pods.glob("*/*/pid"):
            tracked = procs.read_pidfile(pidfile)
            if tracked is not None and tracked.group_alive():
                log.info("killing orphaned pod process %d (%s)", tracked.pid, pidfile.parent)
                procs.stop_group(tracked, grace=5.0)
            pidfile.unlink(missing_ok=True)

    def shutdown(self) -> None:
        """Stop every pod process: SIGTERM all, then SIGKILL what is left after 10 seconds."""
        self.layout.agent_ready.unlink(missing_ok=True)
        runs = [r for r in self.runs.values() if r.running]
        for run in runs:
            run.stop(10.0, "the node agent is stopping")
        deadline = time.monotonic() + 10.0
        while any(r.running for r in runs) and time.monotonic() < deadline:
            for run in runs:
                if run.popen is not None:
                    run.popen.poll()
            time.sleep(0.1)
        for run in runs:
            run.kill_now()
            (run.folder / "pid").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--dir", required=True, type=Path, help="the bed's folder")
    parser.add_argument("--node-name", default="kubedream-dev")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout
    )
    api = config.new_client_from_config(config_file=args.kubeconfig)
    agent = NodeAgent(api, Layout(args.dir), args.node_name)

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        agent.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
