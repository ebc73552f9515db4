"""The chart through real helm: lint, `helm template` with default and non-default values, the
values schema rejecting bad values, the CRD template and manifests/ in sync with their sources."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import yaml

from kubedream_operator.crd import build_crd

from .conftest import CHART, KUBE_VERSION, ROOT, Docs, Helm, Render, find, load_render_script, one

pytestmark = [pytest.mark.testbed, pytest.mark.timeout(120)]

CUSTOM: dict[str, Any] = {
    "watch.scope": "namespaces",
    "watch.namespaces": ["team-a", "team-b"],
    "replicas": 2,
    "metrics.serviceMonitor.enabled": True,
    "metrics.serviceMonitor.labels": {"release": "prometheus"},
    "image.repository": "registry.example.com/kd/operator",
    "image.digest": "sha256:" + "ab" * 32,
    "trainer.image.repository": "registry.example.com/kd/trainer",
    "trainer.image.tag": "1.2.3",
    "s3.endpoint": "http://minio.minio.svc:9000",
    "s3.region": "eu-west-1",
    "s3.addressingStyle": "path",
    "s3.credentialsSecret": "s3-keys",
    "operator.statusInterval": 30,
    "crds.keep": False,
}
"""Non-default values: namespace-scoped RBAC, two peered replicas, a ServiceMonitor, custom
images (one by digest), S3 defaults."""

OPERATOR_RULES = [
    {"apiGroups": ["kubedream.io"], "resources": ["finetunejobs"], "verbs": ["list", "watch", "patch"]},
    {"apiGroups": ["kubedream.io"], "resources": ["finetunejobs/status"], "verbs": ["patch"]},
    {"apiGroups": ["kubedream.io"], "resources": ["finetunejobs/finalizers"], "verbs": ["update"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    {"apiGroups": [""], "resources": ["configmaps", "services"], "verbs": ["get", "create", "patch"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "create", "patch"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
]  # fmt: skip
"""Everything the operator may do where FineTuneJobs live; nothing else (no delete, no secrets)."""


def _container(docs: Docs) -> dict[str, Any]:
    deployment = one(docs, "Deployment")
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_lint_passes_with_default_and_custom_values(helm: Helm) -> None:
    from .conftest import set_args

    for values in ({}, CUSTOM):
        proc = helm.run(
            "lint", str(CHART), "--strict", "--kube-version", KUBE_VERSION, *set_args(values)
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "0 chart(s) failed" in proc.stdout


def test_default_values_watch_the_cluster_with_one_standalone_replica(render: Render) -> None:
    docs = render()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted([
        "CustomResourceDefinition", "ServiceAccount", "Deployment", "Service",
        "ClusterRole", "ClusterRoleBinding", "ClusterRole", "ClusterRoleBinding",
    ])  # fmt: skip
    container = _container(docs)
    assert container["args"] == [
        "--all-namespaces",
        "--trainer-image=ghcr.io/kubedream/trainer:0.1.0",
        "--metrics-port=8080",
        "--health-port=8081",
    ]
    assert container["image"] == "ghcr.io/kubedream/operator:0.1.0"
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # never two standalone operators
    assert one(docs, "ClusterRole", "kd-kubedream")["rules"] == OPERATOR_RULES
    observer = one(docs, "ClusterRole", "kd-kubedream-observer")["rules"]
    assert observer == [
        {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]}
    ]  # fmt: skip
    for binding in find(docs, "ClusterRoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "kd-kubedream", "namespace": "ops"}
        ]
    env = _env(container)
    assert not any(name.startswith(("KUBEDREAM_S3_", "AWS_")) for name in env)
    # Namespaced objects name their namespace, so `helm template | kubectl apply` lands right.
    for doc in docs:
        if doc["kind"] in {"ServiceAccount", "Deployment", "Service"}:
            assert doc["metadata"]["namespace"] == "ops"


def test_pod_security_defaults_meet_the_restricted_profile(render: Render) -> None:
    docs = render()
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    container = pod["containers"][0]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert [v["emptyDir"] for v in pod["volumes"]] == [{"sizeLimit": "64Mi"}]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8081, "protocol": "TCP"} in container["ports"]
    assert container["resources"]["limits"]["memory"] == "512Mi"
    # null leaves the ids to the platform (OpenShift assigns them); non-root stays enforced.
    openshift = render({"securityContext.runAsUser": None, "securityContext.runAsGroup": None})
    context = one(openshift, "Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert context == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


def test_custom_values_scope_rbac_to_namespaces_and_peer_the_replicas(render: Render) -> None:
    docs = render(CUSTOM)
    container = _container(docs)
    assert container["args"] == [
        "--namespace=team-a",
        "--namespace=team-b",
        "--trainer-image=registry.example.com/kd/trainer:1.2.3",
        "--metrics-port=8080",
        "--health-port=8081",
        "--peering=kd-kubedream",
    ]
    assert container["image"] == "registry.example.com/kd/operator@sha256:" + "ab" * 32
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"

    # No cluster-wide write access: Roles where FineTuneJobs live, bound to the operator.
    assert [r["metadata"]["name"] for r in find(docs, "ClusterRole")] == ["kd-kubedream-observer"]
    peering_rules = [
        {"apiGroups": ["kopf.dev"], "resources": ["kopfpeerings"], "resourceNames": ["kd-kubedream"], "verbs": ["get", "patch"]},
        {"apiGroups": ["kopf.dev"], "resources": ["kopfpeerings"], "verbs": ["list", "watch"]},
    ]  # fmt: skip
    for kind in ("Role", "RoleBinding", "KopfPeering"):
        assert sorted(d["metadata"]["namespace"] for d in find(docs, kind)) == ["team-a", "team-b"]
    for role in find(docs, "Role"):
        assert role["rules"] == OPERATOR_RULES + peering_rules
    for binding in find(docs, "RoleBinding"):
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"][0] == {
            "kind": "ServiceAccount",
            "name": "kd-kubedream",
            "namespace": "ops",
        }
    observer = one(docs, "ClusterRole")["rules"]
    assert {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]} in observer

    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "30s"}
    ]
    service = one(docs, "Service")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()

    env = _env(container)
    assert env["KUBEDREAM_S3_ENDPOINT"] == "http://minio.minio.svc:9000"
    assert env["KUBEDREAM_S3_REGION"] == "eu-west-1"
    assert env["KUBEDREAM_S3_ADDRESSING_STYLE"] == "path"
    assert env["KUBEDREAM_S3_CREDENTIALS_SECRET"] == "s3-keys"
    assert env["KUBEDREAM_STATUS_INTERVAL"] == "30"
    # The operator's own keys: by reference, optional, never inline.
    assert env["AWS_ACCESS_KEY_ID"] == {
        "secretKeyRef": {"name": "s3-keys", "key": "AWS_ACCESS_KEY_ID", "optional": True}
    }
    crd = one(docs, "CustomResourceDefinition", build_crd()["metadata"]["name"])
    assert "annotations" not in crd["metadata"]


def test_cluster_wide_peering_uses_a_cluster_peering_object(render: Render) -> None:
    docs = render({"peering.mode": "always", "peering.name": "kubedream-peers"})
    assert "--peering=kubedream-peers" in _container(docs)["args"]
    assert one(docs, "ClusterKopfPeering")["metadata"]["name"] == "kubedream-peers"
    rules = one(docs, "ClusterRole", "kd-kubedream")["rules"]
    assert rules[len(OPERATOR_RULES) :] == [
        {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings"], "resourceNames": ["kubedream-peers"], "verbs": ["get", "patch"]},
        {"apiGroups": ["kopf.dev"], "resources": ["clusterkopfpeerings"], "verbs": ["list", "watch"]},
    ]  # fmt: skip
    # The peering CRDs are templates, rendered only with peering (so `helm uninstall` removes
    # them), labelled and kept like the FineTuneJob CRD; the peering object is a post-install hook
    # (Helm cannot map its kind before the CRD exists).
    names = {d["metadata"]["name"] for d in find(docs, "CustomResourceDefinition")}
    assert names == {
        build_crd()["metadata"]["name"],
        "kopfpeerings.kopf.dev",
        "clusterkopfpeerings.kopf.dev",
    }
    for crd in find(docs, "CustomResourceDefinition"):
        assert crd["metadata"]["labels"]["app.kubernetes.io/instance"] == "kd"
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    hook = one(docs, "ClusterKopfPeering")["metadata"]["annotations"]
    assert hook["helm.sh/hook"] == "post-install,post-upgrade"
    unkept = render({"peering.mode": "always", "crds.keep": False})
    assert all("annotations" not in d["metadata"] for d in find(unkept, "CustomResourceDefinition"))
    # Without peering (the default) or without crds.install, no kopf.dev CRD at all.
    for values in ({}, {"peering.mode": "always", "crds.install": False}):
        crds = render(values, "--include-crds")
        assert not [
            d for d in find(crds, "CustomResourceDefinition") if "kopf.dev" in d["metadata"]["name"]
        ]


def test_switches_leave_out_what_they_disable(render: Render) -> None:
    docs = render({
        "crds.install": False, "rbac.create": False, "serviceAccount.create": False,
        "serviceAccount.name": "existing", "metrics.enabled": False, "replicas": 0,
    })  # fmt: skip
    assert sorted(d["kind"] for d in docs) == ["Deployment"]
    container = _container(docs)
    assert "--metrics-port=0" in container["args"]
    assert [p["name"] for p in container["ports"]] == ["health"]
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "existing"
    namespaced = render({"watch.scope": "namespaces", "rbac.observeCluster": False})
    assert find(namespaced, "ClusterRole") == []
    assert one(namespaced, "Role")["metadata"]["namespace"] == "ops"  # the release namespace
    assert "--namespace=ops" in _container(namespaced)["args"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replica": 2}, "additional properties 'replica' not allowed"),
        ({"metrics.serviceMonitor.enabeld": True}, "additional properties 'enabeld' not allowed"),
        ({"trainer.image.name": "x"}, "additional properties 'name' not allowed"),
        ({"tolerations": [{"key": "gpu", "operater": "Exists"}]}, "'operater' not allowed"),
        ({"replicas": "2"}, "got string, want integer"),
        ({"replicas": -1}, "minimum"),
        ({"crds": {"keep": "yes"}}, "got string, want boolean"),
        ({"watch.scope": "all"}, "value must be one of"),
        ({"watch.namespaces": "team-a"}, "got string, want array"),
        ({"podLabels": {"team": 1}}, "got number, want string"),
        ({"resources.limits.memory": "lots"}, "does not match pattern"),
        ({"s3.endpoint": "minio:9000"}, "does not match pattern"),
        ({"image.digest": "latest"}, "does not match pattern"),
        ({"metrics.port": 70000}, "maximum"),
    ],
)
def test_the_schema_rejects_bad_values(helm: Helm, values: dict[str, Any], message: str) -> None:
    from .conftest import set_args

    proc = helm.run("template", "kd", str(CHART), "--kube-version", KUBE_VERSION, *set_args(values))
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert message in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"watch.namespaces": ["a"]}, 'watch.namespaces is only used with watch.scope "namespaces"'),
        ({"metrics.enabled": False, "metrics.serviceMonitor.enabled": True}, "needs metrics.enabled"),
        ({"serviceAccount.create": False}, "serviceAccount.name is required"),
    ],
)  # fmt: skip
def test_contradictory_values_fail_with_a_message(
    helm: Helm, values: dict[str, Any], message: str
) -> None:
    from .conftest import set_args

    proc = helm.run("template", "kd", str(CHART), "--kube-version", KUBE_VERSION, *set_args(values))
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


# -- generated files ---------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [True, False])
def test_the_chart_crd_is_kubedream_crd(render: Render, keep: bool) -> None:
    """The CRD helm installs is exactly what the spec model generates, plus the chart's labels."""
    wanted = build_crd()
    crd = one(render({"crds.keep": keep}), "CustomResourceDefinition")
    assert crd["spec"] == wanted["spec"]
    assert crd["metadata"]["name"] == wanted["metadata"]["name"]
    assert wanted["metadata"]["labels"].items() <= crd["metadata"]["labels"].items()
    assert crd["metadata"]["labels"]["app.kubernetes.io/instance"] == "kd"
    policy = (crd["metadata"].get("annotations") or {}).get("helm.sh/resource-policy")
    assert policy == ("keep" if keep else None)


def test_crd_template_is_generated_from_the_spec_model() -> None:
    script = load_render_script()
    assert (CHART / "templates" / "crd.yaml").read_text() == script.crd_template(), (
        "charts/kubedream/templates/crd.yaml is stale: run `make manifests`"
    )


def test_manifests_are_the_chart_rendered_with_default_values(helm: Helm) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "render-manifests.py"), "--check"],
        env={**os.environ, "HELM": str(helm.binary)},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr
    docs = [d for d in yaml.safe_load_all((ROOT / "manifests" / "kubedream.yaml").read_text()) if d]
    namespace = one(docs, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert one(docs, "CustomResourceDefinition")["spec"] == build_crd()["spec"]
    assert _container(docs)["args"][0] == "--all-namespaces"


def test_the_drift_check_notices_a_stale_manifest(
    helm: Helm, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--check compares against a fresh render: an edited copy of the manifests fails it."""
    script = load_render_script()
    stale = tmp_path / "kubedream.yaml"
    stale.write_text(
        (ROOT / "manifests" / "kubedream.yaml").read_text().replace("replicas: 1", "replicas: 3")
    )
    monkeypatch.setattr(script, "MANIFESTS", stale)
    monkeypatch.setenv("HELM", str(helm.binary))
    assert script.main(["--check"]) == 1
    stale.write_text(script.manifests(str(helm.binary)))
    assert script.main(["--check"]) == 0
