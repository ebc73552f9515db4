"""The chart installed with real helm into the bed's kube-apiserver, and the operator running with
exactly the permissions the chart grants.

The bed's node agent cannot run an image's entrypoint, so the chart's Deployment is installed
with replicas 0 and its pod is run here instead: `kubedream operator` as a subprocess, with the
Deployment's own args and environment and a kubeconfig holding a token of the chart's
ServiceAccount (TokenRequest API). A sample FineTuneJob from manifests/examples that this
operator turns into a Job proves the RBAC is sufficient; an operator log without a single
"Forbidden" proves it is not missing anything the operator tries.
"""

from __future__ import annotations

import base64
import copy
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from kubedream_operator.crd import CRD_NAME
from kubedream_operator.devbed.bed import BedInfo, tail
from kubedream_operator.devbed.rest import MERGE, KubeRest
from kubedream_operator.spec import API_VERSION
from tests.plugins.bed import wait_for

from .conftest import CHART, ROOT, set_args

pytestmark = pytest.mark.testbed

KUBEDREAM = Path(sys.executable).with_name("kubedream")
CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
EXAMPLE = ROOT / "manifests" / "examples" / "tiny-local.yaml"
S3_SECRET = "kubedream-s3"
FORBIDDEN = ("Forbidden", "HTTP 403", "Not enough permissions")


def _get(rest: KubeRest, path: str) -> dict[str, Any] | None:
    try:
        return rest.get(path)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture
def rest(bed: BedInfo) -> Iterator[KubeRest]:
    client = bed.rest()
    yield client
    client.api.close()


@pytest.fixture
def jobs_namespace(rest: KubeRest) -> Iterator[str]:
    """A second namespace, where the FineTuneJobs live (the release has its own)."""
    created = rest.post(
        "/api/v1/namespaces",
        {"metadata": {"generateName": "t-jobs-", "labels": {"kubedream.dev/test": "chart"}}},
    )
    name: str = created["metadata"]["name"]
    yield name
    try:
        rest.delete(f"/api/v1/namespaces/{name}")
    except ApiException as exc:
        if exc.status != 404:
            raise


def adopt_crd(rest: KubeRest, release: str, namespace: str) -> None:
    """Let this release take over a CRD created outside it (by other tests, or from manifests/):
    Helm adopts an existing object that carries its ownership label and annotations."""

    def settled() -> dict[str, Any] | bool:
        crd = _get(rest, f"{CRDS}/{CRD_NAME}")
        if crd is None:
            return True
        return False if crd["metadata"].get("deletionTimestamp") else crd

    if wait_for(settled, 90, "a deleted FineTuneJob CRD to be gone") is True:
        return
    rest.patch(
        f"{CRDS}/{CRD_NAME}",
        {
            "metadata": {
                "labels": {"app.kubernetes.io/managed-by": "Helm"},
                "annotations": {
                    "meta.helm.sh/release-name": release,
                    "meta.helm.sh/release-namespace": namespace,
                },
            }
        },
        content_type=MERGE,
    )


def helm_install(
    bed: BedInfo, rest: KubeRest, release: str, namespace: str, values: dict[str, Any]
) -> str:
    adopt_crd(rest, release, namespace)
    proc = bed.helm("install", release, str(CHART), "-n", namespace, *set_args(values), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stderr


def chart_objects(rest: KubeRest, release: str, namespaces: list[str]) -> list[str]:
    """Every object labelled as this release's, as 'Kind namespace/name'."""
    selector = f"app.kubernetes.io/instance={release}"
    namespaced = {
        "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments",
        "ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
        "Service": "/api/v1/namespaces/{ns}/services",
        "Role": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
        "RoleBinding": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
        "KopfPeering": "/apis/kopf.dev/v1/namespaces/{ns}/kopfpeerings",
    }
    cluster = {
        "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
        "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        "ClusterKopfPeering": "/apis/kopf.dev/v1/clusterkopfpeerings",
        "CustomResourceDefinition": CRDS,
    }
    found = []
    for kind, path in namespaced.items():
        for ns in namespaces:
            items = (_get(rest, path.format(ns=ns) + f"?labelSelector={selector}") or {}).get(
                "items", []
            )
            found += [f"{kind} {ns}/{i['metadata']['name']}" for i in items]
    for kind, path in cluster.items():
        items = (_get(rest, f"{path}?labelSelector={selector}") or {}).get("items", [])
        found += [f"{kind} {i['metadata']['name']}" for i in items]
    return sorted(found)


def cluster_scoped(rest: KubeRest) -> set[str]:
    """Every CRD, ClusterRole and ClusterRoleBinding in the cluster, as 'Kind name': compared
    before install and after uninstall, so that anything left behind (labelled or not) shows."""
    paths = {
        "CustomResourceDefinition": CRDS,
        "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
        "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
    }
    return {
        f"{kind} {item['metadata']['name']}"
        for kind, path in paths.items()
        for item in rest.get(path)["items"]
    }


class ChartOperator:
    """The chart's operator pod, run as a local process with the chart's ServiceAccount token."""

    def __init__(self, bed: BedInfo, rest: KubeRest, release: str, namespace: str, folder: Path):
        self.bed, self.rest, self.folder = bed, rest, folder
        deployment = rest.get(f"/apis/apps/v1/namespaces/{namespace}/deployments/{release}")
        self.pod = deployment["spec"]["template"]["spec"]
        self.namespace = namespace
        self.log = folder / "operator.log"
        self.health_port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def kubeconfig(self) -> Path:
        """A kubeconfig for the bed's API server with a bound token of the pod's ServiceAccount."""
        account = self.pod["serviceAccountName"]
        token = self.rest.post(
            f"/api/v1/namespaces/{self.namespace}/serviceaccounts/{account}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
             "spec": {"expirationSeconds": 3600}},
        )["status"]["token"]  # fmt: skip
        admin = yaml.safe_load(self.bed.kubeconfig.read_text())
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": admin["clusters"],
            "users": [{"name": account, "user": {"token": token}}],
            "contexts": [
                {
                    "name": "operator",
                    "context": {"cluster": admin["clusters"][0]["name"], "user": account},
                }
            ],
            "current-context": "operator",
        }
        path = self.folder / "kubeconfig"
        path.write_text(yaml.safe_dump(config))
        return path

    def environment(self, container: dict[str, Any]) -> dict[str, str]:
        """The container's env as the kubelet would resolve it; nothing of this test's own."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.folder),
            "LANG": "C.UTF-8",
            "KUBECONFIG": str(self.kubeconfig()),
        }
        for entry in container.get("env", []):
            source = entry.get("valueFrom")
            if source is None:
                env[entry["name"]] = entry["value"]
            elif source.get("fieldRef", {}).get("fieldPath") == "metadata.name":
                env[entry["name"]] = "operator-from-chart"
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                secret = _get(
                    self.rest, f"/api/v1/namespaces/{self.namespace}/secrets/{ref['name']}"
                )
                if secret is None:
                    assert ref.get("optional"), f"secret {ref['name']} is required"
                    continue
                env[entry["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
            else:
                pytest.fail(f"unexpected env source {entry}")
        return env

    def start(self) -> None:
        container = self.pod["containers"][0]
        # The image's entrypoint is `kubedream operator`; the ports move off 8080/8081.
        args = [
            a for a in container["args"] if not a.startswith(("--metrics-port=", "--health-port="))
        ]
        args += [f"--metrics-port={_free_port()}", f"--health-port={self.health_port}"]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [str(KUBEDREAM), "operator", *args],
                env=self.environment(container),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def healthy(self) -> bool:
        """kopf's liveness endpoint, as the chart's probes call it."""
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.health_port}/healthz", timeout=2
            ) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.process = None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""


def sample_job(namespace: str) -> dict[str, Any]:
    """manifests/examples/tiny-local.yaml without its storage settings (the chart's S3 defaults
    fill them) and suspended (the Job is created, no pod runs)."""
    job: dict[str, Any] = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))
    del job["spec"]["storage"]
    job["spec"]["runPolicy"]["suspend"] = True
    job["metadata"]["namespace"] = namespace
    return job


def run_sample_job(
    bed: BedInfo,
    rest: KubeRest,
    release: str,
    namespace: str,
    jobs_ns: str,
    folder: Path,
    while_running: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Run the chart's operator against the sample job until its Job exists and its status is
    written, then call `while_running`; return the Job and the operator's log."""
    rest.post(
        f"/api/v1/namespaces/{namespace}/secrets",
        {"metadata": {"name": S3_SECRET},
         "stringData": {"AWS_ACCESS_KEY_ID": bed.s3_access_key, "AWS_SECRET_ACCESS_KEY": bed.s3_secret_key}},
    )  # fmt: skip
    # The sample's output bucket, so that reading progress.json needs only the operator's keys.
    s3 = bed.s3_client()
    bucket = sample_job(jobs_ns)["spec"]["output"]["uri"].split("/")[2]
    if bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
        s3.create_bucket(Bucket=bucket)
    operator = ChartOperator(bed, rest, release, namespace, folder)
    operator.start()
    try:
        wait_for(operator.healthy, 60, "the operator's /healthz")
        base = f"/apis/{API_VERSION}/namespaces/{jobs_ns}/finetunejobs"
        job = sample_job(jobs_ns)
        wait_for(lambda: _post_when_served(rest, base, job), 30, "the FineTuneJob API")
        name = job["metadata"]["name"]
        trainer_job = wait_for(
            lambda: _get(rest, f"/apis/batch/v1/namespaces/{jobs_ns}/jobs/{name}"),
            60,
            "the operator to create the trainer Job",
        )
        wait_for(
            lambda: (
                ((_get(rest, f"{base}/{name}") or {}).get("status") or {}).get("phase")
                == "Suspended"
            ),
            30,
            "the operator to write the Suspended phase",
        )
        events = rest.get(
            f"/api/v1/namespaces/{jobs_ns}/events",
            fieldSelector=f"involvedObject.name={name},involvedObject.kind=FineTuneJob",
        )["items"]
        assert events, "the operator posted no Event"
        while_running()
    finally:
        operator.stop()
        print(f"--- operator log ---\n{tail(operator.log, 80)}")
    denied = [line for line in operator.text().splitlines() if any(f in line for f in FORBIDDEN)]
    assert denied == [], "the chart's RBAC denied the operator something"
    return {"job": trainer_job, "log": operator.text()}


def _post_when_served(rest: KubeRest, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
    try:
        return rest.post(path, body)
    except ApiException as exc:
        if exc.status == 404:  # a CRD just established may take a moment to be served
            return None
        raise


def _trainer_env(job: dict[str, Any]) -> dict[str, Any]:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def _restrict(rest: KubeRest, namespace: str) -> None:
    rest.patch(
        f"/api/v1/namespaces/{namespace}",
        {"metadata": {"labels": {
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/warn": "restricted",
        }}},
        content_type=MERGE,
    )  # fmt: skip


def _dry_run_pod(rest: KubeRest, namespace: str, pod_spec: dict[str, Any]) -> None:
    rest.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/pods",
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "pss-check"}, "spec": pod_spec},
        query={"dryRun": "All"},
    )


@pytest.mark.timeout(240)
def test_cluster_wide_install_runs_jobs_under_the_restricted_profile_and_uninstalls_cleanly(
    bed: BedInfo, rest: KubeRest, namespace: str, jobs_namespace: str, tmp_path: Path
) -> None:
    release = "kubedream-cluster"  # contains the chart name: objects are named like it
    _restrict(rest, namespace)
    values = {
        "replicas": 0,
        "operator.statusInterval": 1,
        "s3.endpoint": bed.s3_endpoint,
        "s3.region": bed.s3_region,
        "s3.addressingStyle": "path",
        "s3.credentialsSecret": "minio-credentials",
        "s3.operatorCredentialsSecret": S3_SECRET,
    }
    before = cluster_scoped(rest)
    warnings = helm_install(bed, rest, release, namespace, values)
    assert "PodSecurity" not in warnings, warnings  # the namespace warns on violating templates
    try:
        # The operator pod passes the `restricted` admission; a pod without the chart's security
        # settings does not (so the check is live).
        deployment = rest.get(f"/apis/apps/v1/namespaces/{namespace}/deployments/{release}")
        pod_spec = deployment["spec"]["template"]["spec"]
        _dry_run_pod(rest, namespace, pod_spec)
        loose = copy.deepcopy(pod_spec)
        loose.pop("securityContext")
        loose["containers"][0].pop("securityContext")
        with pytest.raises(ApiException) as rejected:
            _dry_run_pod(rest, namespace, loose)
        assert "violates PodSecurity" in str(rejected.value.body)

        result = run_sample_job(bed, rest, release, namespace, jobs_namespace, tmp_path)
        job = result["job"]
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == "ghcr.io/kubedream/trainer:0.1.0"  # the chart's default
        assert job["spec"]["suspend"] is True
        env = _trainer_env(job)
        assert env["AWS_ENDPOINT_URL"] == bed.s3_endpoint  # the chart's S3 defaults reached it
        assert env["AWS_DEFAULT_REGION"] == bed.s3_region
        assert env["AWS_ACCESS_KEY_ID"]["secretKeyRef"]["name"] == "minio-credentials"
        config = rest.get(f"/api/v1/namespaces/{jobs_namespace}/configmaps/tiny-local-spec")
        storage = yaml.safe_load(config["data"]["job.yaml"])["spec"]["storage"]
        assert storage["addressingStyle"] == "path"
        assert "cannot read" not in result["log"]  # the operator's own S3 keys work
    finally:
        proc = bed.helm(
            "uninstall", release, "-n", namespace, "--wait", "--timeout", "90s", check=False
        )
    assert proc.returncode == 0, proc.stderr
    # Only the kept CRD remains; it still holds the user's FineTuneJob (and so its Job).
    assert chart_objects(rest, release, [namespace, jobs_namespace]) == [
        f"CustomResourceDefinition {CRD_NAME}"
    ]
    assert cluster_scoped(rest) - before <= {f"CustomResourceDefinition {CRD_NAME}"}
    crd = rest.get(f"{CRDS}/{CRD_NAME}")
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    kept = f"/apis/{API_VERSION}/namespaces/{jobs_namespace}/finetunejobs/tiny-local"
    assert _get(rest, kept)
    # kopf put its finalizer on the job (its status timer needs one) and no operator is left to
    # take it off: the recovery docs/install.md gives, so that the namespace can be deleted.
    rest.patch(kept, {"metadata": {"finalizers": None}}, content_type=MERGE)


@pytest.mark.timeout(360)
def test_namespace_scoped_peered_install_runs_jobs_and_uninstall_removes_everything(
    bed: BedInfo, rest: KubeRest, namespace: str, jobs_namespace: str, tmp_path: Path
) -> None:
    release = "kubedream-ns"
    values = {
        "replicas": 0,
        "peering.mode": "always",
        "watch.scope": "namespaces",
        "watch.namespaces": [jobs_namespace],
        "operator.statusInterval": 1,
        "crds.keep": False,
        "trainer.image.repository": "registry.example.com/kd/trainer",
        "trainer.image.tag": "7.7.7",
        "s3.endpoint": bed.s3_endpoint,
        "s3.region": bed.s3_region,
        "s3.addressingStyle": "path",
        "s3.credentialsSecret": S3_SECRET,
    }
    before = cluster_scoped(rest) - {f"CustomResourceDefinition {CRD_NAME}"}
    helm_install(bed, rest, release, namespace, values)
    try:
        # The peering CRDs came with the release (peering on), as its own objects.
        for name in ("kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"):
            labels = rest.get(f"{CRDS}/{name}")["metadata"]["labels"]
            assert labels["app.kubernetes.io/instance"] == release
        # No cluster-wide write access: the operator's rules are a Role in the jobs' namespace.
        assert _get(rest, f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{release}") is None
        peering = f"/apis/kopf.dev/v1/namespaces/{jobs_namespace}/kopfpeerings/{release}"

        ftj = f"/apis/{API_VERSION}/namespaces/{jobs_namespace}/finetunejobs/tiny-local"
        job = f"/apis/batch/v1/namespaces/{jobs_namespace}/jobs/tiny-local"

        def peered_then_delete() -> None:
            # kopf keeps its keep-alive in the chart's KopfPeering object, under the pod's name
            # (and, being the only peer, works: the Job above exists).
            status = rest.get(peering).get("status") or {}
            assert "operator-from-chart" in status, status
            # Before uninstalling: delete FineTuneJobs while the operator runs, so that it
            # releases kopf's finalizer, and let the garbage collector remove their Jobs while
            # the CRD still exists (docs/install.md, "Uninstall").
            rest.delete(ftj)
            wait_for(lambda: _get(rest, ftj) is None, 30, "the operator to release the job")
            wait_for(lambda: _get(rest, job) is None, 60, "the trainer Job to be garbage-collected")

        result = run_sample_job(
            bed,
            rest,
            release,
            namespace,
            jobs_namespace,
            tmp_path,
            while_running=peered_then_delete,
        )
        container = result["job"]["spec"]["template"]["spec"]["containers"][0]
        assert container["image"] == "registry.example.com/kd/trainer:7.7.7"
    finally:
        # No --wait: deleting three CRDs at once can leave the API server's CRD finalizer
        # retrying one ("storage is (re)initializing") for over a minute; the polling below
        # waits for everything to be gone instead.
        proc = bed.helm("uninstall", release, "-n", namespace, check=False)
    assert proc.returncode == 0, proc.stderr
    # crds.keep false: the CRD goes too.
    wait_for(
        lambda: not chart_objects(rest, release, [namespace, jobs_namespace]),
        180,
        "every object of the release, the CRD included, to be gone",
    )
    assert _get(rest, f"{CRDS}/{CRD_NAME}") is None
    # Nothing cluster-scoped left behind: kopf's peering CRDs went with the release.
    wait_for(
        lambda: cluster_scoped(rest) == before,
        60,
        "the CRDs, ClusterRoles and ClusterRoleBindings to be as before the install",
    )
