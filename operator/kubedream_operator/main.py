"""`kubedream operator`: run the FineTuneJob operator (kopf, in this process).

Watches the namespaces given with `-n` (repeatable), every namespace with `-A`, or else the
current kubeconfig context's namespace (like kubectl). Standalone unless `--peering NAME`
names a kopf peering object, which lets several replicas elect one active operator (the
KopfPeering CRD and the named object must exist then). Each process takes a random peering
priority: kopf pauses every operator that sees a peer of the same priority, so equal ones
would all stand still; with distinct ones the highest runs and the others wait.

Serves Prometheus metrics on --metrics-port and kopf's liveness probe on
http://0.0.0.0:<--health-port>/healthz; 0 disables either.

Further settings come from the environment:

- KUBEDREAM_TRAINER_IMAGE: default trainer image (--trainer-image wins).
- KUBEDREAM_TRAINER_SERVICE_ACCOUNT: ServiceAccount of trainer pods (default `default`).
- KUBEDREAM_TERMINATION_GRACE_SECONDS: trainer pods' grace period for a final checkpoint (600).
- KUBEDREAM_STATUS_INTERVAL: seconds between status refreshes (10).
- KUBEDREAM_HANDLER_RETRIES: retries of a failing handler (12, with backoff up to 5 minutes).
- KUBEDREAM_S3_ENDPOINT, KUBEDREAM_S3_REGION, KUBEDREAM_S3_ADDRESSING_STYLE,
  KUBEDREAM_S3_CREDENTIALS_SECRET: defaults for the `spec.storage` fields a job leaves unset
  (endpoint, region, addressingStyle, credentialsSecret); empty or absent means no default.
- AWS_* : the operator's own S3 credentials and endpoint for reading progress.json.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
from pathlib import Path
from typing import Any

import kopf
from kubernetes import config
from kubernetes.config.config_exception import ConfigException

from .k8s import Kube
from .metrics import Metrics
from .render import defaults_from
from .spec import SpecError

_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


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
    try:
        defaults = defaults_from(args.trainer_image)
    except SpecError as exc:
        print("kubedream operator: invalid settings:", *exc.problems, sep="\n  ", file=sys.stderr)
        return 2
    metrics = Metrics()
    if args.metrics_port:
        metrics.serve(args.metrics_port)
    context = handlers.Context(kube=kube, defaults=defaults, metrics=metrics)
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
        priority=random.SystemRandom().randrange(1, 2**31) if args.peering else None,
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz"
        if args.health_port
        else None,
        memo=kopf.Memo(context=context),
    )
    return 0
