"""The operator on the real test bed: the generated CRD in a real kube-apiserver, and
`kubedream operator` as a subprocess reconciling FineTuneJobs into Jobs whose pods the node
agent runs, with the controller-manager's Job controller and garbage collector doing their part.
"""

from __future__ import annotations

import copy
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from kubedream_operator.devbed.bed import BedInfo
from kubedream_operator.render import OperatorDefaults, Owner, render_children
from kubedream_operator.spec import parse_spec
from tests.plugins.bed import wait_for

from .bed_support import Jobs, Operator, progress_step
from .helpers import minimal_spec

pytestmark = pytest.mark.testbed


def _http(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        text: str = response.read().decode()
    return text


def _bed_spec(bed: BedInfo, **overrides: Any) -> dict[str, Any]:
    """A tiny-model job whose data and output are in the bed's MinIO (which need not exist)."""
    spec = minimal_spec(
        data={"roots": [{"uri": "s3://kubedream-bed-data/none"}], "resolution": 64},
        training={"maxSteps": 2},
        output={"uri": "s3://kubedream-bed-runs/none"},
        storage={
            "endpoint": bed.s3_endpoint,
            "region": bed.s3_region,
            "addressingStyle": "path",
            "credentialsSecret": "s3",
        },
        resources={"gpusPerNode": 1, "cpu": "1", "memory": "2Gi"},
    )
    spec.update(overrides)
    return spec


# -- the CRD ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_crd_accepts_the_examples_and_applies_defaults(jobs: Jobs) -> None:
    created = jobs.create(
        "ok", minimal_spec(output={"uri": "s3://runs-bucket/ok", "keepLast": None}), dry_run=True
    )
    spec = created["spec"]
    assert spec["data"]["resolution"] == 512  # defaults from the model
    assert spec["training"]["optimizer"] == "adamw"
    assert spec["output"]["keepLast"] is None  # an explicit null (keep all) survives
    assert "addressingStyle" not in spec.get("storage", {})  # left for the operator's default
    with_tolerations = minimal_spec(
        resources={"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": None}]}
    )
    tolerant = jobs.create("tolerant", with_tolerations, dry_run=True)
    # An Optional enum is not nullable: the null is pruned, which means the same as absent.
    assert tolerant["spec"]["resources"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists"}
    ]


@pytest.mark.timeout(60)
def test_crd_rejects_an_invalid_finetunejob(jobs: Jobs) -> None:
    jobs.create("warmup", minimal_spec(), dry_run=True)
    cases = {
        "no-length": (minimal_spec(training={"batchSize": 2}), "set epochs or maxSteps (or both)"),
        "no-roots": (minimal_spec(data={"roots": []}), "spec.data.roots"),
        "bad-resolution": (
            minimal_spec(data={"roots": [{"uri": "x"}], "resolution": 100}),
            "spec.data.resolution",
        ),
        "bad-multiplier": (
            minimal_spec(data={"roots": [{"uri": "x", "multiplier": 0}]}),
            "multiplier",
        ),
        "bad-enum": (minimal_spec(model={"base": "tiny", "family": "sd3"}), "spec.model.family"),
        "twice": (
            minimal_spec(output={"uri": "x", "formats": ["diffusers", "diffusers"]}),
            "formats",
        ),
        "n" * 53: (minimal_spec(), "metadata.name must be at most 52 characters"),
    }
    for name, (spec, expected) in cases.items():
        with pytest.raises(ApiException) as rejected:
            jobs.create(name, spec, dry_run=True)
        assert rejected.value.status == 422, name
        assert expected in str(rejected.value.body), (name, rejected.value.body)


# -- the operator ----------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_finetunejob_becomes_a_job_with_the_right_pods(
    bed: BedInfo, jobs: Jobs, operator: Operator
) -> None:
    jobs.create("tiny", _bed_spec(bed))
    job = wait_for(lambda: jobs.job("tiny"), 60, "the trainer Job")
    owner = jobs.get("tiny")
    assert owner is not None
    assert job["metadata"]["ownerReferences"][0]["uid"] == owner["metadata"]["uid"]
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["podFailurePolicy"]["rules"][1]["onExitCodes"]["values"] == [2, 3]
    config_map = jobs.config_map("tiny")
    assert config_map is not None
    assert "maxSteps: 2" in config_map["data"]["job.yaml"]

    pod = wait_for(lambda: next(iter(jobs.pods("tiny")), None), 60, "a trainer pod")
    container = pod["spec"]["containers"][0]
    assert container["image"] == "kubedream-trainer:bed"
    assert container["command"] == ["kubedream", "train", "/etc/kubedream/job.yaml"]
    assert container["resources"]["limits"] == {"cpu": "1", "memory": "2Gi", "nvidia.com/gpu": "1"}
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_ENDPOINT_URL"]["value"] == bed.s3_endpoint
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3",
        "key": "AWS_ACCESS_KEY_ID",
    }
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["spec"]["nodeName"] == bed.node_name

    status = wait_for(
        lambda: jobs.status("tiny").get("conditions") and jobs.status("tiny"), 30, "a status"
    )
    assert status["phase"] in ("Pending", "Running", "Failed")
    assert status["worldSize"] == 1
    created = {c["type"]: c for c in status["conditions"]}["Created"]
    assert created["status"] == "True"
    # No Secret "s3": the pod waits, and the status says why.
    wait_for(
        lambda: 'secret "s3" not found' in jobs.status("tiny").get("message", ""), 30, "the reason"
    )

    metrics = _http(f"http://127.0.0.1:{operator.metrics_port}/metrics")
    assert 'kubedream_finetunejobs{phase="Pending"} 1.0' in metrics
    assert 'kubedream_reconcile_duration_seconds_count{handler="create"}' in metrics
    assert _http(f"http://127.0.0.1:{operator.health_port}/healthz")  # kopf's liveness probe


@pytest.mark.timeout(90)
def test_an_invalid_spec_fails_with_invalid_spec_and_no_pods(
    jobs: Jobs, operator: Operator
) -> None:
    # The schema lets it through; the model's validation (URI schemes) does not.
    jobs.create("bad", minimal_spec(model={"base": "gs://bucket/model"}))
    status = wait_for(
        lambda: jobs.status("bad") if jobs.phase("bad") == "Failed" else None, 60, "phase Failed"
    )
    failed = {c["type"]: c for c in status["conditions"]}["Failed"]
    assert failed["reason"] == "InvalidSpec"
    assert "spec.model.base: must be a local path or s3://bucket/prefix" in failed["message"]
    warning = wait_for(
        lambda: [e for e in jobs.events("bad") if e["reason"] == "InvalidSpec"],
        30,
        "the InvalidSpec Event",
    )
    assert warning[0]["type"] == "Warning"
    assert jobs.job("bad") is None
    assert jobs.config_map("bad") is None
    assert jobs.pods("bad") == []


@pytest.mark.timeout(150)
def test_suspend_and_resume_toggle_the_job(bed: BedInfo, jobs: Jobs, operator: Operator) -> None:
    jobs.create(
        "toggle",
        _bed_spec(bed, resources={"nodes": 2, "gpusPerNode": 1}, runPolicy={"suspend": True}),
    )
    job = wait_for(lambda: jobs.job("toggle"), 60, "the trainer Job")
    assert job["spec"]["suspend"] is True
    service = jobs.service("toggle")
    assert service is not None
    assert service["spec"]["clusterIP"] == "None"
    assert job["spec"]["template"]["spec"]["subdomain"] == "toggle"
    wait_for(lambda: jobs.phase("toggle") == "Suspended", 30, "phase Suspended")
    assert jobs.pods("toggle") == []

    jobs.patch_spec("toggle", {"runPolicy": {"suspend": False}})
    wait_for(
        lambda: (jobs.job("toggle") or {}).get("spec", {}).get("suspend") is False,
        30,
        "the Job resumed",
    )
    wait_for(lambda: len(jobs.pods("toggle")) == 2, 60, "two trainer pods")
    wait_for(lambda: jobs.phase("toggle") != "Suspended", 30, "the phase to leave Suspended")

    jobs.patch_spec("toggle", {"runPolicy": {"suspend": True}})
    wait_for(
        lambda: (jobs.job("toggle") or {}).get("spec", {}).get("suspend") is True,
        30,
        "the Job suspended",
    )
    wait_for(lambda: not jobs.live_pods("toggle"), 90, "the pods to stop")
    wait_for(lambda: jobs.phase("toggle") == "Suspended", 30, "phase Suspended again")
    reasons = [e["reason"] for e in jobs.events("toggle")]
    assert "Suspended" in reasons


@pytest.mark.timeout(120)
def test_deleting_a_finetunejob_collects_its_children(
    bed: BedInfo, jobs: Jobs, operator: Operator
) -> None:
    jobs.create("gone", _bed_spec(bed, resources={"nodes": 2}, runPolicy={"suspend": True}))
    wait_for(
        lambda: jobs.job("gone") and jobs.service("gone") and jobs.config_map("gone"),
        60,
        "the children",
    )
    jobs.delete("gone")
    wait_for(
        lambda: not (jobs.job("gone") or jobs.service("gone") or jobs.config_map("gone")),
        90,
        "the garbage collector to delete the Job, Service and ConfigMap",
    )
    assert jobs.get("gone") is None  # no finalizer held it back


def _create_children_as_the_operator_would(jobs: Jobs, created: dict[str, Any]) -> None:
    """What an operator that dies right after creating the children leaves behind."""
    owner = Owner(created["metadata"]["name"], jobs.ns, created["metadata"]["uid"])
    for obj in render_children(
        owner, parse_spec(created["spec"]), OperatorDefaults(trainer_image="x:1")
    ):
        path = {
            "ConfigMap": f"/api/v1/namespaces/{jobs.ns}/configmaps",
            "Job": f"/apis/batch/v1/namespaces/{jobs.ns}/jobs",
        }[obj["kind"]]
        jobs.rest.post(path, copy.deepcopy(obj))


@pytest.mark.timeout(150)
def test_a_restarted_operator_creates_no_duplicate(
    bed: BedInfo, jobs: Jobs, operator: Operator
) -> None:
    # Children created, then the operator dies before writing any status.
    operator.kill()
    created = jobs.create("again", _bed_spec(bed, runPolicy={"suspend": True}))
    _create_children_as_the_operator_would(jobs, created)
    first = jobs.job("again")
    assert first is not None
    assert jobs.status("again") == {}

    operator.start()
    wait_for(lambda: jobs.phase("again") == "Suspended", 60, "the restarted operator's status")
    job = jobs.job("again")
    assert job is not None
    assert job["metadata"]["uid"] == first["metadata"]["uid"]  # adopted, not re-created

    # And when it is killed right after a fresh create, the next one picks up where it was.
    jobs.create("fresh", _bed_spec(bed, runPolicy={"suspend": True}))
    wait_for(lambda: jobs.job("fresh"), 60, "the second Job")
    operator.kill()
    before = jobs.job("fresh")
    assert before is not None
    operator.start()
    wait_for(lambda: jobs.phase("fresh") == "Suspended", 60, "status after the restart")
    after = jobs.job("fresh")
    assert after is not None
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    listed = jobs.rest.get(f"/apis/batch/v1/namespaces/{jobs.ns}/jobs")["items"]
    assert sorted(j["metadata"]["name"] for j in listed) == ["again", "fresh"]


# -- the real trainer (tiny model, local data and output: pods run as local processes) --------

TRAINING_ROOT = Path(__file__).resolve().parents[2] / "examples" / "data" / "training"


SUSPEND_STEPS = 60
"""Enough that a suspend (operator, Job controller, the node agent's SIGTERM: seconds) lands
mid-training."""


def _trainer_spec(output: Path, **training: Any) -> dict[str, Any]:
    return minimal_spec(
        data={"roots": [{"uri": str(TRAINING_ROOT)}], "resolution": 64, "loaderWorkers": 0},
        training={"batchSize": 2, **training},
        output={"uri": str(output), "progressEverySteps": 1, "saveEverySteps": 1000},
        resources={"gpusPerNode": 0},
        runPolicy={"backoffLimit": 0},
    )


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_trainer_runs_to_succeeded_and_status_mirrors_progress(
    jobs: Jobs, operator: Operator, tmp_path: Path
) -> None:
    output = tmp_path / "run"
    jobs.create("real", _trainer_spec(output, maxSteps=4))
    wait_for(lambda: jobs.phase("real") in ("Succeeded", "Failed"), 200, "the training to end")
    status = jobs.status("real")
    assert status["phase"] == "Succeeded", status.get("message")
    assert (status["step"], status["totalSteps"]) == (4, 4)
    assert status["lastCheckpoint"] == str(output / "checkpoints" / "step-4")
    assert Path(status["lastCheckpoint"]).is_dir()
    assert isinstance(status["loss"], float)
    assert status["progress"].startswith("epoch ")
    assert status["completionTime"] >= status["startTime"]
    reasons = [e["reason"] for e in jobs.events("real")]
    assert "Completed" in reasons


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_suspend_mid_training_resumes_from_the_checkpoint(
    jobs: Jobs, operator: Operator, tmp_path: Path
) -> None:
    output = tmp_path / "run"
    # progress.json is read directly: it changes every step, status once a second.
    jobs.create("pause", _trainer_spec(output, maxSteps=SUSPEND_STEPS))
    wait_for(lambda: progress_step(output) >= 2, 150, "a few training steps")
    jobs.patch_spec("pause", {"runPolicy": {"suspend": True}})
    wait_for(
        lambda: jobs.phase("pause") == "Suspended" and not jobs.live_pods("pause"),
        90,
        "the trainer to checkpoint and stop",
    )
    checkpoint = wait_for(
        lambda: jobs.status("pause").get("lastCheckpoint"), 30, "the checkpoint in status"
    )
    stopped_at = int(checkpoint.rsplit("-", 1)[1])
    assert 2 <= stopped_at < SUSPEND_STEPS
    jobs.patch_spec("pause", {"runPolicy": {"suspend": False}})
    wait_for(
        lambda: jobs.phase("pause") in ("Succeeded", "Failed"), 200, "the resumed training to end"
    )
    status = jobs.status("pause")
    assert status["phase"] == "Succeeded", status.get("message")
    assert status["step"] == SUSPEND_STEPS
    assert status["checkpoints"][0] == checkpoint  # the resumed run kept the suspend checkpoint
    assert status["restarts"] == 0  # suspension is not a failure


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_bad_data_fails_with_the_trainers_message(
    jobs: Jobs, operator: Operator, tmp_path: Path
) -> None:
    spec = _trainer_spec(tmp_path / "run", maxSteps=4)
    spec["data"]["roots"] = [{"uri": str(tmp_path / "no-such-folder")}]
    jobs.create("nodata", spec)
    wait_for(lambda: jobs.phase("nodata") == "Failed", 120, "phase Failed")
    failed = {c["type"]: c for c in jobs.status("nodata")["conditions"]}["Failed"]
    assert failed["reason"] == "PodFailurePolicy"  # INVALID_JOB (2) fails the Job at once
    assert "no-such-folder" in failed["message"]  # the trainer's own words, via progress.json
    assert "exited with code 2" in failed["message"]
    assert len(jobs.pods("nodata")) == 1


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_job_past_its_deadline_fails_and_keeps_a_checkpoint(
    jobs: Jobs, operator: Operator, tmp_path: Path
) -> None:
    """runPolicy.activeDeadlineSeconds reaches the Job: the Job controller ends the running
    pod (SIGTERM, so the trainer commits a checkpoint first) and fails the Job; the
    FineTuneJob says why and nothing trained is lost."""
    output = tmp_path / "run"
    spec = _trainer_spec(output, maxSteps=100_000)
    spec["runPolicy"]["activeDeadlineSeconds"] = 25
    jobs.create("late", spec)
    job = wait_for(lambda: jobs.job("late"), 30, "the Job")
    assert job["spec"]["activeDeadlineSeconds"] == 25
    wait_for(lambda: jobs.phase("late") == "Failed", 150, "phase Failed")
    failed = {c["type"]: c for c in jobs.status("late")["conditions"]}["Failed"]
    assert failed["reason"] == "DeadlineExceeded", failed
    assert "deadline" in failed["message"]
    committed = wait_for(
        lambda: sorted((output / "checkpoints").glob("step-*/checkpoint.json")),
        60,
        "the checkpoint committed on SIGTERM",
    )
    step = json.loads(committed[-1].read_text())["step"]
    assert 0 < step < 100_000


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_finished_job_deleted_by_its_ttl_is_not_trained_again(
    jobs: Jobs, operator: Operator, tmp_path: Path
) -> None:
    """runPolicy.ttlSecondsAfterFinished 0: the TTL controller deletes the Job the moment it
    completes, maybe before a status tick saw it; the FineTuneJob still ends Succeeded and
    stays so, with no second Job (no second training)."""
    output = tmp_path / "run"
    spec = _trainer_spec(output, maxSteps=3)
    spec["runPolicy"]["ttlSecondsAfterFinished"] = 0
    jobs.create("brief", spec)
    first = wait_for(lambda: jobs.job("brief"), 30, "the Job")
    uid = first["metadata"]["uid"]
    wait_for(lambda: jobs.phase("brief") == "Succeeded", 180, "phase Succeeded")
    wait_for(lambda: jobs.job("brief") is None, 60, "the TTL controller to delete the Job")
    time.sleep(5)  # several status ticks (1 s) with the Job gone
    assert jobs.phase("brief") == "Succeeded"
    again = jobs.job("brief")
    assert again is None or again["metadata"]["uid"] == uid, "a second Job was created"
    assert json.loads((output / "progress.json").read_text())["step"] == 3


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_operator_killed_before_writing_status_leaves_one_job_that_completes(
    jobs: Jobs, operator: Operator, tmp_path: Path
) -> None:
    """The children exist (the Job controller already runs the trainer's pod) but no status was
    written when the operator died: the restarted one adopts them, and the job completes."""
    operator.kill()
    created = jobs.create("crashed", _trainer_spec(tmp_path / "run", maxSteps=4))
    _create_children_as_the_operator_would(jobs, created)
    first = jobs.job("crashed")
    assert first is not None
    wait_for(lambda: jobs.pods("crashed"), 60, "the Job controller's pod")
    assert jobs.status("crashed") == {}

    operator.start()
    wait_for(lambda: jobs.phase("crashed") in ("Succeeded", "Failed"), 240, "the job to end")
    status = jobs.status("crashed")
    assert status["phase"] == "Succeeded", status.get("message")
    assert (status["step"], status["restarts"]) == (4, 0)
    job = jobs.job("crashed")
    assert job is not None
    assert job["metadata"]["uid"] == first["metadata"]["uid"]  # adopted, not re-created
    listed = jobs.rest.get(f"/apis/batch/v1/namespaces/{jobs.ns}/jobs")["items"]
    assert [j["metadata"]["name"] for j in listed] == ["crashed"]
    assert len(jobs.pods("crashed")) == 1  # one pod ran the training, none was duplicated
