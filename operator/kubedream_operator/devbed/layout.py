"""What lives in the bed's folder (DIR, default ~/.local/state/kubedream/dev), and the small
JSON record of how the running bed was started (ports, S3 credentials).

    DIR/kubeconfig            admin kubeconfig (certificates embedded)
    DIR/env                   shell exports: KUBECONFIG, AWS_ENDPOINT_URL, AWS_* credentials
    DIR/state.json            ports and credentials of the running bed
    DIR/pki/                  CA, serving and admin certificates, service-account key pair
    DIR/run/<component>.pid   "pid start-time" of each component (its process group leader)
    DIR/logs/<component>.log  each component's stdout and stderr
    DIR/etcd/, DIR/minio/     data (wiped by every `up`: the bed starts empty)
    DIR/pods/<ns>/<pod>/      one folder per pod run by the node agent: log, pid, volumes/, work/

Used by devbed.bed, devbed.components, devbed.node_agent and the pytest fixtures.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_DIR = Path("~/.local/state/kubedream/dev").expanduser()
# Start order; `down` stops in reverse.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "minio", "node-agent")


@dataclass(frozen=True)
class Layout:
    """Paths inside the bed's folder."""

    dir: Path

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def env_file(self) -> Path:
        return self.dir / "env"

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def pki(self) -> Path:
        return self.dir / "pki"

    @property
    def run(self) -> Path:
        return self.dir / "run"

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def etcd_data(self) -> Path:
        return self.dir / "etcd"

    @property
    def minio_data(self) -> Path:
        return self.dir / "minio"

    @property
    def pods(self) -> Path:
        return self.dir / "pods"

    def pidfile(self, component: str) -> Path:
        return self.run / f"{component}.pid"

    def log(self, component: str) -> Path:
        return self.logs / f"{component}.log"

    def pod_dir(self, namespace: str, pod: str) -> Path:
        return self.pods / namespace / pod

    def pod_log(self, namespace: str, pod: str) -> Path:
        return self.pod_dir(namespace, pod) / "log"

    @property
    def agent_ready(self) -> Path:
        """Written by the node agent once its Node is registered and its pod watch runs."""
        return self.run / "node-agent.ready"


@dataclass(frozen=True)
class Ports:
    """The 127.0.0.1 ports the bed listens on (chosen free at `up`)."""

    etcd: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    minio: int


@dataclass(frozen=True)
class BedState:
    """How the running bed was started; written to DIR/state.json by `up`."""

    ports: Ports
    s3_access_key: str
    s3_secret_key: str
    s3_region: str
    node_name: str

    @property
    def apiserver_url(self) -> str:
        return f"https://127.0.0.1:{self.ports.apiserver}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports.minio}"

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        path.chmod(0o600)

    @classmethod
    def load(cls, path: Path) -> BedState | None:
        """The saved state, or None if there is none (or it is unreadable: a bed from an older
        version, which `up` then replaces)."""
        try:
            raw = json.loads(path.read_text())
            return cls(**{**raw, "ports": Ports(**raw["ports"])})
        except (FileNotFoundError, json.JSONDecodeError, KeyError, TypeError):
            return None
