"""The real kube-apiserver, kube-controller-manager and the node agent working together: CRD
schemas, Jobs run to completion, the downward API and volumes in a pod, graceful pod deletion,
and garbage collection."""

from __future__ import annotations

import json
import textwrap
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from kubedream_operator.devbed.bed import BedInfo
from kubedream_operator.devbed.procs import start_time
from kubedream_operator.devbed.rest import KubeRest
from tests.plugins.bed import wait_for

pytestmark = pytest.mark.testbed

CRD_GROUP = "testbed.kubedream.dev"
CRD_NAME = f"widgets.{CRD_GROUP}"
CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": CRD_NAME},
    "spec": {
        "group": CRD_GROUP,
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["size"],
                                "properties": {
                                    "size": {"type": "integer", "minimum": 1},
                                    "color": {"type": "string", "enum": ["red", "blue"]},
                                },
                            }
                        },
                    }
                },
            }
        ],
    },
}


def _missing(rest: KubeRest, path: str) -> bool:
    try:
        rest.get(path)
    except ApiException as exc:
        if exc.status == 404:
            return True
        raise
    return False


def _job(name: str, command: list[str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "main", "image": "ignored:latest", "command": command}],
                }
            },
            **spec,
        },
    }


def _finished(rest: KubeRest, job_path: str) -> dict[str, Any] | None:
    """The Job once it is Complete or Failed, else None."""
    job = rest.get(job_path)
    return job if _condition(job, "Complete") or _condition(job, "Failed") else None


def _condition(obj: dict[str, Any], kind: str) -> bool:
    return any(
        c["type"] == kind and c["status"] == "True"
        for c in (obj.get("status") or {}).get("conditions") or []
    )


@pytest.mark.timeout(120)
def test_components_report_their_versions_and_the_node_is_ready(bed: BedInfo) -> None:
    rest = bed.rest()
    assert rest.get("/version")["gitVersion"] == "v1.37.2"
    node = rest.get(f"/api/v1/nodes/{bed.node_name}")
    assert _condition(node, "Ready")
    assert node["status"]["capacity"]["nvidia.com/gpu"] == "8"
    lease = rest.get(
        f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{bed.node_name}"
    )
    assert lease["spec"]["holderIdentity"] == bed.node_name
    assert bed.helm("version", "--short").stdout.startswith("v3.22.0")


@pytest.mark.timeout(60)
def test_crd_schema_accepts_a_valid_resource_and_rejects_an_invalid_one(
    bed: BedInfo, namespace: str
) -> None:
    rest = bed.rest()
    crd_path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD_NAME}"
    try:
        rest.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", CRD)
    except ApiException as exc:
        if exc.status != 409:
            raise
    wait_for(lambda: _condition(rest.get(crd_path), "Established"), 30, "the CRD to be established")
    widgets = f"/apis/{CRD_GROUP}/v1/namespaces/{namespace}/widgets"

    def create(name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return rest.post(
            widgets,
            {
                "apiVersion": f"{CRD_GROUP}/v1",
                "kind": "Widget",
                "metadata": {"name": name},
                "spec": spec,
            },
        )

    # A new CRD may take a moment to be served even once Established.
    created = wait_for(
        lambda: _created_or_none(lambda: create("ok", {"size": 2, "color": "red", "extra": 1})),
        20,
        "the Widget API",
    )
    assert created["spec"] == {"size": 2, "color": "red"}, "unknown fields are pruned"
    with pytest.raises(ApiException) as rejected:
        create("bad", {"size": 0, "color": "green"})
    assert rejected.value.status == 422
    assert "spec.size" in str(rejected.value.body)
    assert "spec.color" in str(rejected.value.body)
    with pytest.raises(ApiException) as missing:
        create("empty", {})
    assert "spec.size: Required value" in str(missing.value.body)
    assert [w["metadata"]["name"] for w in rest.get(widgets)["items"]] == ["ok"]


def _created_or_none(create: Any) -> dict[str, Any] | None:
    try:
        result: dict[str, Any] = create()
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return result


@pytest.mark.timeout(120)
def test_a_job_runs_to_completion_and_its_pods_are_collected_with_it(
    bed: BedInfo, namespace: str
) -> None:
    rest = bed.rest()
    jobs = f"/apis/batch/v1/namespaces/{namespace}/jobs"
    rest.post(jobs, _job("answer", ["python", "-c", "print(42)"]))
    job = wait_for(
        lambda: _finished(rest, f"{jobs}/answer"),
        90,
        "the Job to finish",
    )
    assert _condition(job, "Complete"), job["status"]
    assert job["status"]["succeeded"] == 1
    pods = f"/api/v1/namespaces/{namespace}/pods"
    (pod,) = rest.get(pods, labelSelector="job-name=answer")["items"]
    assert pod["spec"]["nodeName"] == bed.node_name
    assert pod["status"]["phase"] == "Succeeded"
    assert pod["status"]["podIP"] == "127.0.0.1"
    (container,) = pod["status"]["containerStatuses"]
    assert container["state"]["terminated"]["exitCode"] == 0
    assert container["state"]["terminated"]["reason"] == "Completed"
    assert bed.pod_log(namespace, pod["metadata"]["name"]) == "42\n"

    rest.delete(f"{jobs}/answer", propagationPolicy="Foreground")
    wait_for(
        lambda: not rest.get(pods, labelSelector="job-name=answer")["items"],
        60,
        "the Job's pod to be collected",
    )
    wait_for(lambda: _missing(rest, f"{jobs}/answer"), 60, "the Job to be deleted")


@pytest.mark.timeout(120)
def test_a_pod_sees_its_env_and_volumes_at_their_container_paths(
    bed: BedInfo, namespace: str
) -> None:
    rest = bed.rest()
    base = f"/api/v1/namespaces/{namespace}"
    rest.post(
        f"{base}/configmaps",
        {"metadata": {"name": "job"}, "data": {"job.yaml": "kind: FineTuneJob\n"}},
    )
    rest.post(f"{base}/secrets", {"metadata": {"name": "s3"}, "stringData": {"secret-key": "hush"}})
    script = textwrap.dedent(
        """
        import json, os, pathlib, sys
        pathlib.Path("/scratch/out.txt").write_text("scratch ok")
        print(json.dumps({
            "index": os.environ["INDEX"],
            "pod": os.environ["POD"],
            "ip": os.environ["POD_IP"],
            "secret": os.environ["SECRET"],
            "config_from_env": pathlib.Path(os.environ["CONFIG"]).read_text(),
            "config_from_arg": pathlib.Path(sys.argv[1]).read_text(),
            "scratch": pathlib.Path("/scratch/out.txt").read_text(),
            "token": bool(pathlib.Path("/var/run/secrets/kubernetes.io/serviceaccount/token").read_text()),
        }))
        """
    )
    job = _job(
        "indexed",
        ["python", "-c", script, "/etc/kubedream/job.yaml"],
        completionMode="Indexed",
        completions=2,
        parallelism=2,
    )
    pod_spec = job["spec"]["template"]["spec"]
    pod_spec["volumes"] = [
        {"name": "job", "configMap": {"name": "job"}},
        {"name": "scratch", "emptyDir": {}},
    ]
    pod_spec["containers"][0]["volumeMounts"] = [
        {"name": "job", "mountPath": "/etc/kubedream", "readOnly": True},
        {"name": "scratch", "mountPath": "/scratch"},
    ]
    pod_spec["containers"][0]["env"] = [
        {
            "name": "INDEX",
            "valueFrom": {
                "fieldRef": {
                    "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"
                }
            },
        },
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "secret-key"}}},
        {"name": "CONFIG", "value": "/etc/kubedream/job.yaml"},
    ]
    jobs = f"/apis/batch/v1/namespaces/{namespace}/jobs"
    rest.post(jobs, job)
    done = wait_for(
        lambda: _finished(rest, f"{jobs}/indexed"),
        90,
        "the indexed Job to finish",
    )
    assert _condition(done, "Complete"), done["status"]
    outputs = []
    for pod in rest.get(f"{base}/pods", labelSelector="job-name=indexed")["items"]:
        outputs.append(json.loads(bed.pod_log(namespace, pod["metadata"]["name"])))
        assert outputs[-1]["pod"] == pod["metadata"]["name"]
    assert sorted(o["index"] for o in outputs) == ["0", "1"]
    for output in outputs:
        assert output["ip"] == "127.0.0.1"
        assert output["secret"] == "hush"
        assert output["config_from_env"] == output["config_from_arg"] == "kind: FineTuneJob\n"
        assert output["scratch"] == "scratch ok"
        assert output["token"] is True


@pytest.mark.timeout(90)
def test_deleting_a_running_pod_stops_it_gracefully(bed: BedInfo, namespace: str) -> None:
    rest = bed.rest()
    pods = f"/api/v1/namespaces/{namespace}/pods"
    script = textwrap.dedent(
        """
        import signal, sys, time
        def stop(signum, frame):
            print("got SIGTERM", flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        print("ready", flush=True)
        time.sleep(600)
        """
    )
    pod = {
        "metadata": {"name": "sleeper"},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 20,
            "containers": [
                {"name": "main", "image": "ignored", "command": ["python", "-c", script]}
            ],
        },
    }
    rest.post(pods, pod)
    wait_for(lambda: "ready" in bed.pod_log(namespace, "sleeper"), 60, "the pod to start")
    running = rest.get(f"{pods}/sleeper")
    assert running["status"]["phase"] == "Running"
    assert _condition(running, "Ready")
    pid = int(running["status"]["containerStatuses"][0]["containerID"].rsplit("/", 1)[1])
    assert start_time(pid) is not None

    rest.delete(f"{pods}/sleeper")
    wait_for(lambda: _missing(rest, f"{pods}/sleeper"), 30, "the pod to be deleted")
    assert "got SIGTERM" in bed.pod_log(namespace, "sleeper")
    assert start_time(pid) is None, "the pod's process is gone"


@pytest.mark.timeout(60)
def test_deleting_an_owner_garbage_collects_its_dependents(bed: BedInfo, namespace: str) -> None:
    rest = bed.rest()
    config_maps = f"/api/v1/namespaces/{namespace}/configmaps"
    owner = rest.post(config_maps, {"metadata": {"name": "owner"}})
    reference = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "owner",
        "uid": owner["metadata"]["uid"],
    }
    rest.post(config_maps, {"metadata": {"name": "child", "ownerReferences": [reference]}})
    rest.post(config_maps, {"metadata": {"name": "bystander"}})

    rest.delete(f"{config_maps}/owner")
    wait_for(
        lambda: _missing(rest, f"{config_maps}/child"),
        45,
        "the garbage collector to delete the child",
    )
    assert not _missing(rest, f"{config_maps}/bystander")


@pytest.mark.timeout(60)
def test_a_pod_waits_for_a_missing_secret_then_restarts_on_failure(
    bed: BedInfo, namespace: str
) -> None:
    rest = bed.rest()
    base = f"/api/v1/namespaces/{namespace}"
    script = textwrap.dedent(
        """
        import os, pathlib, sys
        tries = pathlib.Path("/state/tries")
        tries.write_text(tries.read_text() + "x" if tries.exists() else "x")
        print("try", len(tries.read_text()), os.environ["TOKEN"], flush=True)
        sys.exit(0 if len(tries.read_text()) >= 2 else 3)
        """
    )
    pod = {
        "metadata": {"name": "flaky"},
        "spec": {
            "restartPolicy": "OnFailure",
            "volumes": [{"name": "state", "emptyDir": {}}],
            "containers": [
                {
                    "name": "main",
                    "image": "ignored",
                    "command": ["python", "-c", script],
                    "env": [
                        {
                            "name": "TOKEN",
                            "valueFrom": {"secretKeyRef": {"name": "late", "key": "token"}},
                        }
                    ],
                    "volumeMounts": [{"name": "state", "mountPath": "/state"}],
                }
            ],
        },
    }
    rest.post(f"{base}/pods", pod)

    def waiting_reason() -> str | None:
        statuses = (rest.get(f"{base}/pods/flaky").get("status") or {}).get(
            "containerStatuses"
        ) or [{}]
        reason: str | None = statuses[0].get("state", {}).get("waiting", {}).get("reason")
        return reason if reason == "CreateContainerConfigError" else None

    wait_for(waiting_reason, 30, "the pod to report its missing secret")
    rest.post(f"{base}/secrets", {"metadata": {"name": "late"}, "stringData": {"token": "t0"}})
    done = wait_for(
        lambda: (
            (p := rest.get(f"{base}/pods/flaky"))["status"]["phase"] in ("Succeeded", "Failed")
            and p
        ),
        30,
        "the pod to finish",
    )
    assert done["status"]["phase"] == "Succeeded"
    status = done["status"]["containerStatuses"][0]
    assert status["restartCount"] == 1
    assert status["lastState"]["terminated"]["exitCode"] == 3
    assert bed.pod_log(namespace, "flaky") == "try 1 t0\ntry 2 t0\n"
