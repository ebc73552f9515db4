"""Rendering: golden files for a single-node and a multi-node job, and the rules behind them.

Regenerate the golden files after an intended change with
    KUBEDREAM_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/operator/test_render.py
and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubedream_operator import contract
from kubedream_operator.render import (
    OperatorDefaults,
    Owner,
    frozen_changes,
    job_mutable_fields,
    render_children,
    trainer_command,
    with_storage_defaults,
)
from kubedream_operator.render_cli import to_yaml_stream
from kubedream_operator.spec import (
    API_VERSION,
    KIND,
    FineTuneJobSpec,
    StorageSpec,
    load_job,
    parse_spec,
)
from kubedream_trainer.cli import main

from .helpers import EXAMPLES, minimal_spec

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("KUBEDREAM_UPDATE_GOLDEN") == "1"
DEFAULTS = OperatorDefaults(trainer_image="ghcr.io/kubedream/trainer:test")
OWNER_UID = "3f1e9c2a-5b7d-4e8f-9a0b-1c2d3e4f5a6b"


def _render(example: str) -> list[dict[str, Any]]:
    job = load_job(EXAMPLES / example)
    return render_children(Owner(job.name, "ml", OWNER_UID), job.spec, DEFAULTS)


@pytest.mark.parametrize(
    ("example", "golden"),
    [("tiny-local.yaml", "single-node.yaml"), ("multinode.yaml", "multi-node.yaml")],
)
def test_golden(example: str, golden: str) -> None:
    text = to_yaml_stream(_render(example))
    path = GOLDEN / golden
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"{path} missing; run with KUBEDREAM_UPDATE_GOLDEN=1"
    assert text == path.read_text(), (
        f"{golden} differs; rerun with KUBEDREAM_UPDATE_GOLDEN=1 and review"
    )


def _by_kind(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["kind"]: o for o in objects}


def test_single_node_objects() -> None:
    objects = _by_kind(_render("tiny-local.yaml"))
    assert set(objects) == {"ConfigMap", "Job"}  # no rendezvous Service for one pod
    job = objects["Job"]
    assert job["metadata"]["name"] == "tiny-local"
    assert job["metadata"]["namespace"] == "ml"
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 1, 1)
    assert spec["backoffLimit"] == 1
    assert spec["podReplacementPolicy"] == "Failed"
    assert spec["suspend"] is False
    pod = spec["template"]["spec"]
    assert "subdomain" not in pod
    [container] = pod["containers"]
    assert container["command"] == ["kubedream", "train", "/etc/kubedream/job.yaml"]
    assert container["resources"] == {
        "requests": {"cpu": "2", "memory": "4Gi"},
        "limits": {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": 1},
    }
    assert container["image"] == "ghcr.io/kubedream/trainer:test"


def test_config_map_holds_the_manifest_the_trainer_reads() -> None:
    config_map = _by_kind(_render("tiny-local.yaml"))["ConfigMap"]
    assert config_map["metadata"]["name"] == "tiny-local-spec"
    manifest = yaml.safe_load(config_map["data"]["job.yaml"])
    assert manifest["kind"] == "FineTuneJob"
    assert manifest["metadata"] == {
        "name": "tiny-local",
        "namespace": "ml",
    }
    assert parse_spec(manifest["spec"]) == load_job(EXAMPLES / "tiny-local.yaml").spec


def test_pod_security_and_no_api_access() -> None:
    pod = _by_kind(_render("tiny-local.yaml"))["Job"]["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = pod["containers"][0]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts == {
        "/etc/kubedream": "spec",
        "/tmp": "tmp",
        contract.CACHE_DIR: "cache",
        "/dev/shm": "dshm",
    }
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory"}
    assert volumes["spec"]["configMap"] == {"name": "tiny-local-spec"}
    assert pod["terminationGracePeriodSeconds"] == 600


def test_storage_settings_and_credentials_by_reference() -> None:
    env = _by_kind(_render("tiny-local.yaml"))["Job"]["spec"]["template"]["spec"]["containers"][0][
        "env"
    ]
    by_name = {e["name"]: e for e in env}
    assert by_name["AWS_ENDPOINT_URL"]["value"] == "http://minio.minio.svc:9000"
    assert by_name["AWS_DEFAULT_REGION"]["value"] == "us-east-1"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert by_name[key] == {
            "name": key,
            "valueFrom": {"secretKeyRef": {"name": "minio-credentials", "key": key}},
        }


def test_no_storage_env_without_storage_settings(spec: FineTuneJobSpec) -> None:
    job = _by_kind(render_children(Owner("j", "ns"), spec))["Job"]
    names = {e["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert not {n for n in names if n.startswith("AWS_")}


def test_pod_failure_policy_ignores_disruptions_and_peer_stops_and_fails_on_bad_input() -> None:
    rules = _by_kind(_render("tiny-local.yaml"))["Job"]["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {
        "action": "Ignore",
        "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
    }
    assert rules[1]["action"] == "FailJob"
    assert 1 not in contract.PERMANENT_EXIT_CODES
    assert rules[1]["onExitCodes"] == {
        "containerName": "trainer",
        "operator": "In",
        "values": [2, 3],  # usage, diverged; never 1 (a crash, torchrun's code)
    }
    # A pod that stopped only because another pod of its group got the stop signal.
    assert rules[2] == {
        "action": "Ignore",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [76]},
    }
    assert len(rules) == 3


def test_multi_node_objects() -> None:
    objects = _by_kind(_render("multinode.yaml"))
    assert list(objects) == ["ConfigMap", "Service", "Job"]
    service = objects["Service"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"kubedream.io/job": "sdxl-multinode"}
    job = objects["Job"]["spec"]
    assert (job["completions"], job["parallelism"]) == (4, 4)
    assert job["backoffLimit"] == 2 * 4  # runPolicy.backoffLimit counts world restarts
    pod = job["template"]["spec"]
    assert pod["subdomain"] == "sdxl-multinode"
    assert pod["containers"][0]["image"] == "registry.example.com/kubedream/trainer:0.1.0"
    # kubedream train launches torchrun itself and keeps a failed worker's exit code.
    assert pod["containers"][0]["command"] == [
        "kubedream",
        "train",
        "/etc/kubedream/job.yaml",
        "--nproc-per-node=8",
        "--nnodes=4",
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        "--master-addr=sdxl-multinode-0.sdxl-multinode.ml.svc",
        "--master-port=29500",
    ]
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    # The pod labels match the Service selector, so pod 0 gets its DNS name.
    assert service["spec"]["selector"].items() <= job["template"]["metadata"]["labels"].items()


def test_single_node_multi_gpu_launches_one_process_per_gpu() -> None:
    spec = parse_spec(minimal_spec(resources={"gpusPerNode": 4}))
    assert trainer_command(Owner("j", "ns"), spec) == [
        "kubedream",
        "train",
        "/etc/kubedream/job.yaml",
        "--nproc-per-node=4",
    ]


def test_cpu_only_job_requests_no_gpu() -> None:
    spec = parse_spec(minimal_spec(resources={"gpusPerNode": 0}))
    job = _by_kind(render_children(Owner("j", "ns"), spec))["Job"]
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"] == {}


def test_placement_and_policy_fields() -> None:
    job = _by_kind(_render("sd15-s3.yaml"))["Job"]
    spec = job["spec"]
    assert spec["activeDeadlineSeconds"] == 172800
    assert spec["ttlSecondsAfterFinished"] == 604800
    pod = spec["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["priorityClassName"] == "training"
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8


def test_suspend_is_rendered(spec: FineTuneJobSpec) -> None:
    suspended = parse_spec(minimal_spec(runPolicy={"suspend": True}))
    assert _by_kind(render_children(Owner("j", "ns"), suspended))["Job"]["spec"]["suspend"] is True


def test_every_object_is_labelled_and_owned() -> None:
    for obj in _render("multinode.yaml"):
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "kubedream"
        assert labels["kubedream.io/job"] == "sdxl-multinode"
        assert obj["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "kubedream.io/v1alpha1",
                "kind": "FineTuneJob",
                "name": "sdxl-multinode",
                "uid": OWNER_UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]


def test_operator_defaults_apply(spec: FineTuneJobSpec) -> None:
    defaults = OperatorDefaults(
        trainer_image="img:1", service_account="trainer", termination_grace_seconds=900
    )
    pod = _by_kind(render_children(Owner("j", "ns"), spec, defaults))["Job"]["spec"]["template"][
        "spec"
    ]
    assert pod["containers"][0]["image"] == "img:1"
    assert pod["serviceAccountName"] == "trainer"
    assert pod["terminationGracePeriodSeconds"] == 900


def test_mutable_fields_and_frozen_changes() -> None:
    before = parse_spec(minimal_spec(resources={"nodes": 2}, runPolicy={"backoffLimit": 2}))
    assert job_mutable_fields(before) == {
        "suspend": False,
        "backoffLimit": 4,
        "activeDeadlineSeconds": None,
        "ttlSecondsAfterFinished": None,
    }
    after = parse_spec(
        minimal_spec(resources={"nodes": 2, "memory": "8Gi"}, runPolicy={"suspend": True})
    )
    assert frozen_changes(before, after) == ["spec.resources.memory"]
    assert frozen_changes(before, before) == []


def test_kubedream_render_prints_the_objects(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", str(EXAMPLES / "multinode.yaml"), "--image", "x:1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# ownerReferences carry the placeholder uid")
    objects = list(yaml.safe_load_all(out))
    assert [o["kind"] for o in objects] == ["ConfigMap", "Service", "Job"]
    assert (
        objects[2]["metadata"]["ownerReferences"][0]["uid"]
        == "00000000-0000-0000-0000-000000000000"
    )
    assert objects[2]["metadata"]["namespace"] == "default"


def _job_file(path: Path, name: str, spec: dict[str, Any]) -> Path:
    """A FineTuneJob manifest file for `kubedream render`."""
    manifest = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": spec}
    path.write_text(yaml.safe_dump(manifest))
    return path


def test_kubedream_render_uses_the_operators_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `kubedream operator` would apply in the same environment: its default trainer
    image and S3 defaults (a flag still wins)."""
    job = _job_file(tmp_path / "job.yaml", "envy", minimal_spec())
    monkeypatch.setenv("KUBEDREAM_TRAINER_IMAGE", "registry.local/trainer:env")
    monkeypatch.setenv("KUBEDREAM_S3_ENDPOINT", "http://minio.local:9000")
    assert main(["render", str(job)]) == 0
    objects = {o["kind"]: o for o in yaml.safe_load_all(capsys.readouterr().out)}
    (container,) = objects["Job"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.local/trainer:env"
    rendered = yaml.safe_load(objects["ConfigMap"]["data"]["job.yaml"])
    assert rendered["spec"]["storage"]["endpoint"] == "http://minio.local:9000"
    assert main(["render", str(job), "--image", "flag:1"]) == 0
    assert "image: flag:1" in capsys.readouterr().out
    monkeypatch.setenv("KUBEDREAM_S3_ADDRESSING_STYLE", "sideways")
    assert main(["render", str(job)]) == 1
    assert "KUBEDREAM_S3_ADDRESSING_STYLE" in capsys.readouterr().err


def test_kubedream_render_rejects_an_invalid_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = _job_file(tmp_path / "bad.yaml", "bad", minimal_spec(training={}))
    assert main(["render", str(bad)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "spec.training: set epochs or maxSteps (or both)" in captured.err


def test_operator_storage_defaults_fill_only_unset_fields() -> None:
    defaults = OperatorDefaults(
        storage=StorageSpec(
            endpoint="http://minio:9000", addressingStyle="path", credentialsSecret="s3"
        )
    )
    # As the API server stores it: the CRD sets no default for addressingStyle.
    spec = parse_spec(minimal_spec(storage={"credentialsSecret": "mine"}))
    filled = with_storage_defaults(spec, defaults)
    assert filled.storage.endpoint == "http://minio:9000"
    assert filled.storage.addressing_style == "path"
    assert filled.storage.credentials_secret == "mine"  # the job's own choice wins
    explicit = parse_spec(minimal_spec(storage={"addressingStyle": "auto"}))
    assert with_storage_defaults(explicit, defaults).storage.addressing_style == "auto"
    assert with_storage_defaults(spec, OperatorDefaults()) is spec
