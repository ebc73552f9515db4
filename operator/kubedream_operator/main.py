"""`kubedream operator`: run the FineTuneJob operator (kopf, in this process).

Watches the namespaces given with `-n` (repeatable), every namespace with `-A`, or else the
current kubeconfig context's namespace (like kubectl). Standalone unless `--peering NAME`
names a kopf peering object, which lets several replicas elect one active operator (the
KopfPeering CRD must be installed then).

Serves Prometheus metrics on --metrics-port and kopf's liveness probe on
http://0.0.0.0:<--health-port>/healthz; 0 disables either.

Further settings come from the environment:

- KUBEDREAM_TRAINER_IMAGE: default trainer image (--trainer-image wins).
- KUBEDREAM_TRAINER_SERVICE_ACCOUNT: ServiceAccount of trainer pods (default `default`).
- KUBEDREAM_TERMINATION_GRACE_SECONDS: trainer pods' grace period for a final checkpoint (600).
- KUBEDREAM_STATUS_INTERVAL: seconds between status refreshes (10).
- KUBEDREAM_HANDLER_RETRIES: retries of a failing handler (12, with backoff up to 5 minutes).
- AWS_* : the operator's own S3 credentials and endpoint for reading progress.json.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

import kopf
from kubernetes import config
from kubernetes.config.config_exception import ConfigException

from .k8s import Kube
from .metrics import Metrics
from .render import DEFAULT_TRAINER_IMAGE, OperatorDefaults

_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def defaults_from(args: argparse.Namespace, env: dict[str, str] | None = None) -> OperatorDefaults:
    """Operator defaults from the command line and the environment."""
    env = dict(os.environ) if env is None else env
    return OperatorDefaults(
        trainer_image=args.trainer_image
        or env.get("KUBEDREAM_TRAINER_IMAGE")
        or DEFAULT_TRAINER_IMAGE,
        service_account=env.get("KUBEDREAM_TRAINER_SERVICE_ACCOUNT", "default"),
        termination_grace_seconds=int(env.get("KUBEDREAM_TERMINATION_GRACE_SECONDS", "600")),
    )


def current_namespace() -> str:
    """The pod's namespace in a cluster, else the kubeconfig context's, else `default`."""
    if _SA_NAMESPACE.exists():
        return _SA_NAMESPACE.read_text().strip()
    try:
        _, active = config.list_kube_config_contexts()
    except (ConfigException, OSError):
        return "default"
    return str((active or {}).get("context", {}).get("namespace") or "default")


def _configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Handler log lines stay logs; Kubernetes Events are the ones the handlers post on purpose,
    # plus kopf's warnings and errors (a handler that keeps failing).
    settings.posting.level = logging.WARNING
    # A watch that hangs silently is restarted rather than trusted.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60


def run(args: argparse.Namespace) -> int:
    """Start the operator; returns when it stops (SIGINT/SIGTERM)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from . import handlers  # registers the handlers with kopf

    try:
        kube = Kube.connect()
    except (ConfigException, OSError) as exc:
        print(f"kubedream operator: no Kubernetes credentials: {exc}", file=sys.stderr)
        return 1
    if args.all_namespaces and args.namespace:
        print("kubedream operator: give -n NAMESPACE or -A, not both", file=sys.stderr)
        return 2
    namespaces = [] if args.all_namespaces else (args.namespace or [current_namespace()])
    metrics = Metrics()
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    context = handlers.Context(kube=kube, defaults=defaults_from(args), metrics=metrics)
    kopf.on.startup()(_configure)
    logging.getLogger(__name__).info(
        "watching %s; trainer image %s",
        "all namespaces" if args.all_namespaces else ", ".join(namespaces),
        context.defaults.trainer_image,
    )
    kopf.run(
        clusterwide=bool(args.all_namespaces),
        namespaces=namespaces,
        standalone=args.peering is None,
        peering_name=args.peering,
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz"
        if args.health_port
        else None,
        memo=kopf.Memo(context=context),
    )
    return 0
