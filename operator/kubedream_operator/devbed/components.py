"""The command line, environment and health probe of each test-bed component.

Pure description, no process handling (that is devbed.bed): what the bed runs and how it knows
each part is healthy. Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from .build import Binaries
from .certs import Pki
from .layout import BedState, Layout

SERVICE_CIDR = "10.0.0.0/24"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"


@dataclass(frozen=True)
class Component:
    """One process of the bed."""

    name: str
    argv: list[str]
    probe: Callable[[], bool]
    """True once the component serves (its /readyz, /healthz or equivalent answers 200)."""
    timeout: float
    """Seconds to wait for the probe after starting (generous: the machine may be busy)."""
    env: dict[str, str] = field(default_factory=dict)
    """Added to the environment of the `up` process."""


def http_ok(
    url: str, context: ssl.SSLContext | None = None, expect: Callable[[bytes], bool] | None = None
) -> bool:
    """True if GET `url` answers 200 within 2 seconds (and its body passes `expect`)."""
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as resp:
            body: bytes = resp.read()
            return resp.status == 200 and (expect is None or expect(body))
    except (urllib.error.URLError, OSError, ValueError):
        # Refused, reset, timed out or not ready (HTTPError is a URLError): not healthy yet.
        return False


def tls_context(pki: Pki, client_cert: bool) -> ssl.SSLContext:
    """Verify the bed's serving certificate; present the admin certificate if asked."""
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    if client_cert:
        context.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
    return context


def _etcd_healthy(body: bytes) -> bool:
    try:
        return bool(json.loads(body).get("health") == "true")
    except json.JSONDecodeError:
        return False


def _controllers_running(state: BedState, pki: Pki) -> bool:
    """The controller-manager answers /healthz before its controllers run (and exits if the API
    server goes away while it builds them). Healthy once the serviceaccount and root-CA
    publisher controllers have done their work in `default`."""
    admin = tls_context(pki, client_cert=True)
    namespace = f"{state.apiserver_url}/api/v1/namespaces/default"
    return (
        http_ok(
            f"https://127.0.0.1:{state.ports.controller_manager}/healthz",
            tls_context(pki, client_cert=False),
        )
        and http_ok(f"{namespace}/serviceaccounts/default", admin)
        and http_ok(f"{namespace}/configmaps/kube-root-ca.crt", admin)
    )


def components(layout: Layout, state: BedState, binaries: Binaries, pki: Pki) -> list[Component]:
    """The bed's processes in start order (see layout.COMPONENTS)."""
    p = state.ports
    etcd_url = f"http://127.0.0.1:{p.etcd}"
    peer_url = f"http://127.0.0.1:{p.etcd_peer}"
    kubeconfig = str(layout.kubeconfig)
    etcd = Component(
        "etcd",
        [
            str(binaries.etcd), "--name=kubedream", f"--data-dir={layout.etcd_data}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=kubedream={peer_url}", "--initial-cluster-state=new",
            # Disposable data: skipping fsync makes the bed much faster on a busy disk.
            "--unsafe-no-fsync", "--log-level=warn",
        ],
        lambda: http_ok(f"{etcd_url}/health", expect=_etcd_healthy),
        timeout=60,
    )  # fmt: skip
    apiserver = Component(
        "kube-apiserver",
        [
            str(binaries.kube_apiserver), f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={p.apiserver}",
            f"--tls-cert-file={pki.serving_cert}", f"--tls-private-key-file={pki.serving_key}",
            f"--client-ca-file={pki.ca_cert}", "--authorization-mode=RBAC",
            # Published for delegating servers (the controller-manager's own /healthz auth);
            # only a client certificate named front-proxy-client may assert identities.
            f"--requestheader-client-ca-file={pki.ca_cert}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--service-account-issuer={SA_ISSUER}", f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--allow-privileged=true",
            # The `kubernetes` Endpoints may not hold a loopback address, and nothing here
            # routes service IPs anyway.
            "--endpoint-reconciler-type=none", "--profiling=false",
        ],
        lambda: http_ok(f"{state.apiserver_url}/readyz", tls_context(pki, client_cert=True)),
        timeout=120,
    )  # fmt: skip
    controller_manager = Component(
        "kube-controller-manager",
        [
            str(binaries.kube_controller_manager), f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}", f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1", f"--secure-port={p.controller_manager}",
            f"--tls-cert-file={pki.serving_cert}", f"--tls-private-key-file={pki.serving_key}",
            f"--service-account-private-key-file={pki.sa_key}", f"--root-ca-file={pki.ca_cert}",
            f"--cluster-signing-cert-file={pki.ca_cert}", f"--cluster-signing-key-file={pki.ca_key}",
            "--use-service-account-credentials=true", "--leader-elect=false",
            "--cluster-name=kubedream-dev", "--profiling=false",
        ],
        lambda: _controllers_running(state, pki),
        timeout=90,
    )  # fmt: skip
    minio = Component(
        "minio",
        [
            str(binaries.minio), "server", str(layout.minio_data), f"--address=127.0.0.1:{p.minio}",
            f"--certs-dir={layout.dir / 'minio-certs'}", "--quiet",
        ],
        lambda: http_ok(f"{state.s3_endpoint}/minio/health/ready"),
        timeout=60,
        env={
            "MINIO_ROOT_USER": state.s3_access_key,
            "MINIO_ROOT_PASSWORD": state.s3_secret_key,
            "MINIO_REGION": state.s3_region,
            "MINIO_BROWSER": "off",
            "MINIO_UPDATE": "off",
        },
    )  # fmt: skip
    node_agent = Component(
        "node-agent",
        [
            sys.executable, "-m", "kubedream_operator.devbed.node_agent", f"--kubeconfig={kubeconfig}",
            f"--dir={layout.dir}", f"--node-name={state.node_name}",
        ],
        layout.agent_ready.is_file,
        timeout=60,
        env={"PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    return [etcd, apiserver, controller_manager, minio, node_agent]
