"""Start, stop and inspect the test bed: `up` starts each component in order and waits until it
is healthy, `down` stops every process group (pods of the node agent included), `status` says
what runs.

Called by devbed.cli (`kubedream dev up|down|status`) and by the `bed` pytest fixture, which
uses `Bed` in-process. Components outlive the `up` process: each is a session leader tracked by
a pidfile in DIR/run.
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import procs
from .build import Binaries, ensure_binaries
from .certs import Pki, ensure_pki, write_kubeconfig
from .components import Component, components
from .layout import COMPONENTS, BedState, Layout, Ports

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from .rest import KubeRest

NODE_NAME = "kubedream-dev"
S3_REGION = "us-east-1"


class BedError(RuntimeError):
    """The bed could not start; the message names the component and ends with its log tail."""


def tail(path: Path, lines: int = 40) -> str:
    """The last `lines` lines of a text file ('' if it does not exist)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@contextmanager
def _free_ports(count: int) -> Iterator[list[int]]:
    """`count` distinct free ports on 127.0.0.1, held until the block ends."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        yield [s.getsockname()[1] for s in sockets]


@dataclass(frozen=True)
class BedInfo:
    """A running bed: what a client needs to use it. Returned by `Bed.up`."""

    dir: Path
    state: BedState
    binaries: Binaries

    @property
    def layout(self) -> Layout:
        return Layout(self.dir)

    @property
    def kubeconfig(self) -> Path:
        return self.layout.kubeconfig

    @property
    def apiserver_url(self) -> str:
        return self.state.apiserver_url

    @property
    def s3_endpoint(self) -> str:
        return self.state.s3_endpoint

    @property
    def node_name(self) -> str:
        return self.state.node_name

    @property
    def s3_access_key(self) -> str:
        return self.state.s3_access_key

    @property
    def s3_secret_key(self) -> str:
        return self.state.s3_secret_key

    @property
    def s3_region(self) -> str:
        return self.state.s3_region

    @property
    def env(self) -> dict[str, str]:
        """The variables DIR/env exports: point kubernetes clients, boto3 and helm at the bed."""
        return {
            "KUBECONFIG": str(self.kubeconfig),
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": self.state.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": self.state.s3_secret_key,
            "AWS_DEFAULT_REGION": self.state.s3_region,
        }

    def api_client(self) -> ApiClient:
        """A new kubernetes ApiClient with admin credentials (close it when done)."""
        from kubernetes import config

        client: ApiClient = config.new_client_from_config(config_file=str(self.kubeconfig))
        return client

    def rest(self) -> KubeRest:
        """Plain-JSON access to the API (dicts in, dicts out); see devbed.rest."""
        from .rest import KubeRest

        return KubeRest(self.api_client())

    def s3_client(self) -> Any:
        """A boto3 S3 client for the bed's MinIO."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            aws_access_key_id=self.state.s3_access_key,
            aws_secret_access_key=self.state.s3_secret_key,
            region_name=self.state.s3_region,
        )

    def pod_log(self, namespace: str, pod: str) -> str:
        """Everything the pod's containers wrote so far ('' if it has not started)."""
        path = self.layout.pod_log(namespace, pod)
        return path.read_text(errors="replace") if path.is_file() else ""

    def component_log(self, component: str) -> Path:
        return self.layout.log(component)

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run the bed's helm against the bed (KUBECONFIG set, output captured)."""
        env = {**os.environ, **self.env, "HELM_CACHE_HOME": str(self.dir / "helm" / "cache"),
               "HELM_CONFIG_HOME": str(self.dir / "helm" / "config"),
               "HELM_DATA_HOME": str(self.dir / "helm" / "data")}  # fmt: skip
        return subprocess.run(
            [str(self.binaries.helm), *args], env=env, capture_output=True, text=True, check=check
        )


class Bed:
    """The test bed in one folder. Keeps the Popen handles of what it started so that stopping
    from the same process reaps them."""

    def __init__(self, directory: Path, out: Callable[[str], None] = print) -> None:
        self.layout = Layout(directory.expanduser().resolve())
        self._out = out
        self._popens: dict[int, subprocess.Popen[bytes]] = {}

    def running(self) -> dict[str, bool]:
        """Whether each component's recorded process is alive."""
        result = {}
        for name in COMPONENTS:
            tracked = procs.read_pidfile(self.layout.pidfile(name))
            result[name] = tracked is not None and tracked.alive()
        return result

    def info(self, binaries: Binaries | None = None) -> BedInfo | None:
        """The running bed, or None if it is not (completely) running."""
        state = BedState.load(self.layout.state_file)
        if state is None or not all(self.running().values()):
            return None
        return BedInfo(self.layout.dir, state, binaries or ensure_binaries(build=False))

    def up(self, binaries: Binaries | None = None) -> BedInfo:
        """Start the bed and wait until every component is healthy. Harmless when it already
        runs; a half-running bed is stopped and started afresh."""
        existing = self.info(binaries)
        if existing is not None:
            self._out(f"test bed already running in {self.layout.dir}")
            return existing
        if any(self.running().values()):
            self._out("test bed is partly running; stopping it first")
            self.down()
        binaries = binaries or ensure_binaries()
        layout = self.layout
        for folder in (layout.etcd_data, layout.minio_data, layout.pods, layout.run):
            shutil.rmtree(folder, ignore_errors=True)
        layout.logs.mkdir(parents=True, exist_ok=True)
        pki = ensure_pki(layout.pki)
        with _free_ports(5) as ports:
            state = BedState(
                ports=Ports(*ports),
                s3_access_key="kubedream",
                s3_secret_key=secrets.token_urlsafe(18),
                s3_region=S3_REGION,
                node_name=NODE_NAME,
            )
        state.save(layout.state_file)
        write_kubeconfig(layout.kubeconfig, state.apiserver_url, pki)
        try:
            for component in components(layout, state, binaries, pki):
                self._start(component)
        except BaseException:
            self.down()
            raise
        info = BedInfo(layout.dir, state, binaries)
        _write_env(layout.env_file, info.env)
        self._out(f"test bed up in {layout.dir}:")
        for line in describe(info):
            self._out(f"  {line}")
        self._out(f"use it with: source {layout.env_file}")
        return info

    def _start(self, component: Component) -> None:
        log = self.layout.log(component.name)
        log.write_bytes(b"")
        env = {**os.environ, **component.env}
        start = time.monotonic()
        try:
            popen, tracked = procs.spawn(component.argv, log=log, env=env, cwd=self.layout.dir)
        except OSError as exc:
            raise BedError(f"{component.name}: cannot start {component.argv[0]}: {exc}") from exc
        self._popens[tracked.pid] = popen
        procs.write_pidfile(self.layout.pidfile(component.name), tracked)
        deadline = start + component.timeout
        while not component.probe():
            if popen.poll() is not None:
                raise BedError(
                    f"{component.name} exited with status {popen.returncode} while starting; "
                    f"last lines of {log}:\n{tail(log)}"
                )
            if time.monotonic() > deadline:
                raise BedError(
                    f"{component.name} not healthy after {component.timeout:.0f}s; last lines of {log}:\n{tail(log)}"
                )
            time.sleep(0.2)
        self._out(
            f"  {component.name} healthy after {time.monotonic() - start:.1f}s (pid {tracked.pid})"
        )

    def down(self) -> list[str]:
        """Stop every component and every pod process; return the names of what was stopped."""
        stopped = []
        for name in reversed(COMPONENTS):
            pidfile = self.layout.pidfile(name)
            tracked = procs.read_pidfile(pidfile)
            if tracked is not None and tracked.group_alive():
                # The node agent stops its pods on SIGTERM; give it time to do so.
                grace = 30.0 if name == "node-agent" else 10.0
                procs.stop_group(tracked, grace=grace, popen=self._popens.pop(tracked.pid, None))
                stopped.append(name)
            pidfile.unlink(missing_ok=True)
        # Pods whose agent died without stopping them.
        for pidfile in sorted(self.layout.pods.glob("*/*/pid")):
            tracked = procs.read_pidfile(pidfile)
            if tracked is not None and tracked.group_alive():
                procs.stop_group(tracked, grace=5.0)
                stopped.append(f"pod {pidfile.parent.parent.name}/{pidfile.parent.name}")
        for stale in (self.layout.env_file, self.layout.state_file, self.layout.agent_ready):
            stale.unlink(missing_ok=True)
        return stopped

    def status(self) -> list[str]:
        """One line per component: running (with pid) or not."""
        lines = []
        for name, alive in self.running().items():
            tracked = procs.read_pidfile(self.layout.pidfile(name))
            lines.append(
                f"{name:<24} {'running (pid ' + str(tracked.pid) + ')' if alive and tracked else 'not running'}"
            )
        return lines


def describe(info: BedInfo) -> list[str]:
    """Human-readable endpoints and files of a running bed."""
    p = info.state.ports
    return [
        f"etcd                     http://127.0.0.1:{p.etcd}",
        f"kube-apiserver           {info.apiserver_url}",
        f"kube-controller-manager  https://127.0.0.1:{p.controller_manager}/healthz",
        f"minio (S3)               {info.s3_endpoint}  (access key {info.state.s3_access_key})",
        f"node agent               Node {info.node_name!r}",
        f"kubeconfig               {info.kubeconfig}",
        f"logs                     {info.layout.logs}/<component>.log, {info.layout.pods}/<ns>/<pod>/log",
    ]


def _write_env(path: Path, env: dict[str, str]) -> None:
    lines = ["# Written by `kubedream dev up`; use with: source " + str(path)]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in env.items()]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)


def pki_of(info: BedInfo) -> Pki:
    """The key material of a running bed (for clients that want the CA file)."""
    return Pki(info.layout.pki)
