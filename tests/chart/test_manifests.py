"""manifests/kubedream.yaml server-side applied to the bed's kube-apiserver (`kubectl apply
--server-side -f manifests/kubedream.yaml`, as docs/install.md says), then deleted again.

The manifests use fixed names (namespace and release `kubedream`, cluster-wide RBAC named
`kubedream`, the FineTuneJob CRD), so the test first waits for any FineTuneJob CRD left by
another test to be gone, and removes everything it applied afterwards. The Deployment is
applied with replicas 0 (the bed's node agent cannot run the operator image); the operator runs
as a local process with the manifests' ServiceAccount token instead (test_install.py's helper).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient

from kubedream_operator.crd import CRD_NAME
from kubedream_operator.devbed.bed import BedInfo
from kubedream_operator.devbed.rest import KubeRest
from tests.plugins.bed import wait_for

from .conftest import ROOT
from .test_install import CRDS, _get, run_sample_job

pytestmark = pytest.mark.testbed

MANIFESTS = ROOT / "manifests" / "kubedream.yaml"
FIELD_MANAGER = "kubedream-test-manifests"


def _documents() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(MANIFESTS.read_text()) if doc]


def _key(doc: dict[str, Any]) -> str:
    meta = doc["metadata"]
    where = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{doc['kind']} {where}{meta['name']}"


@pytest.fixture
def dynamic(bed: BedInfo) -> Iterator[DynamicClient]:
    api = bed.api_client()
    yield DynamicClient(api)
    api.close()


@pytest.fixture
def rest(bed: BedInfo) -> Iterator[KubeRest]:
    client = bed.rest()
    yield client
    client.api.close()


def _delete(dynamic: DynamicClient, doc: dict[str, Any]) -> None:
    meta = doc["metadata"]
    resource = dynamic.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
    try:
        resource.delete(name=meta["name"], namespace=meta.get("namespace"))
    except ApiException as exc:
        if exc.status != 404:
            raise


@pytest.mark.timeout(240)
def test_manifests_apply_server_side_run_the_operator_and_delete_cleanly(
    bed: BedInfo, dynamic: DynamicClient, rest: KubeRest, namespace: str, tmp_path: Path
) -> None:
    docs = _documents()
    kinds = {_key(d) for d in docs}
    for wanted in (
        "Namespace kubedream",
        f"CustomResourceDefinition {CRD_NAME}",
        "ServiceAccount kubedream/kubedream",
        "ClusterRole kubedream",
        "ClusterRoleBinding kubedream",
        "Deployment kubedream/kubedream",
    ):
        assert wanted in kinds, f"{wanted} missing from {MANIFESTS.name}"
    # A CRD another test left (kept, or still being deleted) would be taken over and deleted here.
    wait_for(lambda: _get(rest, f"{CRDS}/{CRD_NAME}") is None, 90, "no FineTuneJob CRD")
    wait_for(lambda: _get(rest, "/api/v1/namespaces/kubedream") is None, 90, "no kubedream ns")

    try:
        for doc in docs:
            body = doc
            if doc["kind"] == "Deployment":
                body = {**doc, "spec": {**doc["spec"], "replicas": 0}}
            resource = dynamic.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
            applied = resource.server_side_apply(
                body=body,
                name=doc["metadata"]["name"],
                namespace=doc["metadata"].get("namespace"),
                field_manager=FIELD_MANAGER,
                force_conflicts=True,
            )
            managers = {m["manager"] for m in applied.to_dict()["metadata"]["managedFields"]}
            assert FIELD_MANAGER in managers, _key(doc)

        def established() -> bool:
            crd = _get(rest, f"{CRDS}/{CRD_NAME}") or {}
            conditions = (crd.get("status") or {}).get("conditions") or []
            return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)

        wait_for(established, 60, "the FineTuneJob CRD to be Established")
        for path in (
            "/apis/apps/v1/namespaces/kubedream/deployments/kubedream",
            "/api/v1/namespaces/kubedream/serviceaccounts/kubedream",
            "/apis/rbac.authorization.k8s.io/v1/clusterroles/kubedream",
            "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/kubedream",
        ):
            assert _get(rest, path), path

        # The operator, with the manifests' ServiceAccount and RBAC, handles a suspended job.
        result = run_sample_job(bed, rest, "kubedream", "kubedream", namespace, tmp_path)
        assert result["job"]["spec"]["suspend"] is True
        ftj = f"/apis/kubedream.io/v1alpha1/namespaces/{namespace}/finetunejobs/tiny-local"
        # No operator is left to release kopf's finalizer (docs/install.md's recovery).
        rest.patch(
            ftj, {"metadata": {"finalizers": None}}, content_type="application/merge-patch+json"
        )
    finally:
        for doc in reversed(docs):
            _delete(dynamic, doc)
    for doc in docs:
        if doc["kind"] in ("Namespace", "CustomResourceDefinition"):
            path = (
                f"{CRDS}/{CRD_NAME}"
                if doc["kind"] != "Namespace"
                else "/api/v1/namespaces/kubedream"
            )
            wait_for(lambda p=path: _get(rest, p) is None, 90, f"{_key(doc)} to be deleted")
    for doc in docs:
        if not doc["metadata"].get("namespace") and doc["kind"] not in ("Namespace",):
            resource = dynamic.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
            with pytest.raises(ApiException) as gone:
                resource.get(name=doc["metadata"]["name"])
            assert gone.value.status == 404, _key(doc)
