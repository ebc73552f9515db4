"""The operator end to end on the real test bed, with the real trainer: the example
manifests/examples/tiny-local.yaml pointed at the bed's MinIO (a credentials Secret, data
root and output on s3://) runs to Succeeded with its checkpoints in MinIO and its printer
columns filled as `kubectl get ftj` would print them; a trainer pod evicted mid-run is
replaced without spending the backoff limit and the replacement resumes from the last
checkpoint; a trainer that keeps crashing ends Failed after the backoff limit; and an invalid
data root fails the Job after one pod (podFailurePolicy FailJob on exit 2).

Each run is tiny (the tiny model, four 64x64 images, a few steps on the CPU), and one
`kubedream operator` subprocess serves each test's namespace.
"""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from kubedream_operator.devbed.bed import BedInfo
from kubedream_operator.devbed.rest import KubeRest
from tests.plugins.bed import wait_for

from .bed_support import Jobs, Operator, PodWatch, trainer_exit
from .helpers import EXAMPLES

pytestmark = [pytest.mark.testbed, pytest.mark.slow]

EXAMPLE = EXAMPLES / "tiny-local.yaml"
TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io"
CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/finetunejobs.kubedream.io"
IMAGES = 4


def _example() -> dict[str, Any]:
    manifest: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    return manifest


def _png(index: int) -> bytes:
    image = Image.new("RGB", (64, 64), (40 * index, 255 - 40 * index, 90))
    for x in range(64):
        image.putpixel((x, (x * (index + 1)) % 64), (255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class Minio:
    """One bucket in the bed's MinIO holding a small data root, and the Secret a job names."""

    def __init__(self, bed: BedInfo, bucket: str, secret: str) -> None:
        self.bed, self.bucket, self.secret = bed, bucket, secret
        self.s3 = bed.s3_client()

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def key(self, uri: str) -> str:
        prefix = f"s3://{self.bucket}/"
        assert uri.startswith(prefix), uri
        return uri[len(prefix) :]

    def exists(self, key: str) -> bool:
        found = self.s3.list_objects_v2(Bucket=self.bucket, Prefix=key, MaxKeys=1)
        return bool(found.get("KeyCount"))

    def read_json(self, key: str) -> Any:
        return json.loads(self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read())

    def spec(self, output: str, /, **sections: dict[str, Any]) -> dict[str, Any]:
        """The tiny-local example's spec with data and output in this bucket, the bed's MinIO
        as endpoint and this Secret, on the CPU; each of `sections` merged into its section."""
        spec = copy.deepcopy(_example()["spec"])
        spec["data"]["roots"] = [{"uri": self.uri("data")}]
        spec["output"]["uri"] = self.uri(output)
        spec["storage"].update(
            endpoint=self.bed.s3_endpoint, region=self.bed.s3_region, credentialsSecret=self.secret
        )
        spec["resources"].update(gpusPerNode=0, cpu="1")
        for section, values in sections.items():
            spec[section] = {**spec.get(section, {}), **values}
        return spec


@pytest.fixture
def minio(bed: BedInfo, jobs: Jobs) -> Minio:
    """A bucket named after the test's namespace with IMAGES captioned images under data/, and
    the example's credentials Secret (the bed's MinIO keys) in the namespace."""
    secret = _example()["spec"]["storage"]["credentialsSecret"]
    world = Minio(bed, jobs.ns, secret)
    world.s3.create_bucket(Bucket=world.bucket)
    for i in range(IMAGES):
        world.s3.put_object(Bucket=world.bucket, Key=f"data/shape{i}.png", Body=_png(i))
        world.s3.put_object(
            Bucket=world.bucket, Key=f"data/shape{i}.txt", Body=f"a line on colour {i}".encode()
        )
    jobs.secret(
        secret,
        {"AWS_ACCESS_KEY_ID": bed.s3_access_key, "AWS_SECRET_ACCESS_KEY": bed.s3_secret_key},
    )
    return world


def _ended(jobs: Jobs, name: str, timeout: float) -> dict[str, Any]:
    wait_for(lambda: jobs.phase(name) in ("Succeeded", "Failed"), timeout, f"{name} to end")
    return jobs.status(name)


def _as_table(rest: KubeRest, path: str) -> dict[str, Any]:
    """GET `path` as a meta.k8s.io/v1 Table: the columns and cells `kubectl get` prints."""
    api = rest.api
    method, url, headers, _, _ = api.param_serialize(
        "GET", path, header_params={"Accept": TABLE}, auth_settings=["BearerToken"]
    )
    response = api.call_api(method, url, header_params=headers, _request_timeout=30)
    data = response.read()
    assert response.status == 200, data
    table: dict[str, Any] = json.loads(data)
    return table


def _json_path(obj: Any, path: str) -> Any:
    """A printer column's simple JSONPath (`.status.phase`) evaluated against `obj`."""
    for part in path.strip(".").split("."):
        assert part.isidentifier(), f"not a simple JSONPath: {path}"
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def _condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    found: dict[str, Any] = {c["type"]: c for c in status.get("conditions") or ()}[kind]
    return found


@pytest.fixture
def pod_watch(bed: BedInfo, namespace: str) -> Iterator[PodWatch]:
    watch = PodWatch(bed, namespace)
    yield watch
    watch.stop()


# -- the full path on S3 ---------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_the_tiny_local_example_on_s3_succeeds_and_fills_the_printer_columns(
    bed: BedInfo, jobs: Jobs, operator: Operator, minio: Minio
) -> None:
    name = _example()["metadata"]["name"]
    # 4 images, batch 2: 2 steps an epoch; epochs 2 ends before maxSteps 20.
    jobs.create(name, minio.spec("runs/tiny-local", output={"saveEverySteps": 2}))
    status = _ended(jobs, name, 200)
    assert status["phase"] == "Succeeded", status.get("message")
    assert _condition(status, "Succeeded")["status"] == "True"
    checkpoints = [minio.uri(f"runs/tiny-local/checkpoints/step-{n}") for n in (2, 4)]
    assert status["checkpoints"] == checkpoints  # keepLast 2
    assert status["lastCheckpoint"] == checkpoints[-1]
    for uri in checkpoints:
        meta = minio.read_json(f"{minio.key(uri)}/checkpoint.json")
        assert isinstance(meta, dict)
        assert minio.exists(f"{minio.key(uri)}/unet/")
    assert minio.read_json("runs/tiny-local/progress.json")["phase"] == "Succeeded"
    assert (status["step"], status["totalSteps"]) == (4, 4)
    assert (status["epoch"], status["totalEpochs"]) == (2, 2)
    assert status["progress"] == "epoch 2/2"
    assert isinstance(status["loss"], float)
    assert status["imagesPerSecond"] > 0

    # What `kubectl get ftj` prints: the live CRD's printer columns, evaluated by the API server.
    crd = jobs.rest.get(CRD_PATH)
    version = next(v for v in crd["spec"]["versions"] if v["served"] and v["storage"])
    printer = version["additionalPrinterColumns"]
    table = _as_table(jobs.rest, f"{jobs.base}/{name}")
    names = [c["name"] for c in table["columnDefinitions"]]
    assert names == ["Name", *(c["name"] for c in printer)]
    (row,) = table["rows"]
    cells = dict(zip(names, row["cells"], strict=True))
    assert cells["Name"] == name
    assert cells["Phase"] == "Succeeded"
    assert cells["Progress"] == "epoch 2/2"
    assert cells["Loss"] == status["loss"]
    assert cells["Images/s"] == status["imagesPerSecond"]
    obj = jobs.get(name)
    for column in printer:
        if column["type"] != "date":  # a date is printed as an age ("41s")
            assert cells[column["name"]] == _json_path(obj, column["jsonPath"]), column


# -- a disruption ------------------------------------------------------------------------------


@pytest.mark.timeout(280)
def test_an_evicted_trainer_is_replaced_without_spending_the_backoff_limit_and_resumes(
    bed: BedInfo, jobs: Jobs, operator: Operator, minio: Minio, pod_watch: PodWatch
) -> None:
    name = "evicted"
    spec = minio.spec(
        "runs/evicted",
        training={"epochs": 6, "maxSteps": 12},
        output={"saveEverySteps": 2, "keepLast": None},
        runPolicy={"backoffLimit": 0},  # a disruption that counted would fail the Job
    )
    jobs.create(name, spec)
    first = wait_for(
        lambda: (jobs.status(name).get("checkpoints") or [None])[0], 150, "a committed checkpoint"
    )
    (pod,) = jobs.live_pods(name)
    pod_name = pod["metadata"]["name"]
    jobs.rest.post(
        f"/api/v1/namespaces/{jobs.ns}/pods/{pod_name}/eviction",
        {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": pod_name, "namespace": jobs.ns},
        },
    )
    # The eviction API (not the node agent) marks the pod; the node agent SIGTERMs the trainer,
    # which commits a checkpoint and exits 143.
    final = wait_for(
        lambda: next(
            (v for v in pod_watch.of(pod_name) if v["status"].get("phase") == "Failed"), None
        ),
        120,
        "the evicted pod to end",
    )
    assert trainer_exit(final) == 143
    disrupted = _condition(final["status"], "DisruptionTarget")
    assert (disrupted["status"], disrupted["reason"]) == ("True", "EvictionByEvictionAPI")

    status = _ended(jobs, name, 200)
    assert status["phase"] == "Succeeded", status.get("message")
    job = jobs.job(name)
    assert job is not None
    assert job["spec"]["backoffLimit"] == 0
    assert job["status"].get("failed", 0) == 0  # Ignored by the podFailurePolicy
    assert job["status"]["succeeded"] == 1
    assert status["restarts"] == 0
    assert status["step"] == 12

    # The replacement resumed from the checkpoint committed on SIGTERM, not from step 0.
    evicted_log = bed.pod_log(jobs.ns, pod_name)
    committed = [
        line.rsplit("/", 1)[1]
        for line in evicted_log.splitlines()
        if "checkpoint committed:" in line
    ]
    stopped_at = int(committed[-1].removeprefix("step-"))
    assert 2 <= stopped_at < 12, evicted_log
    (replacement,) = [p for p in jobs.pods(name) if p["metadata"]["name"] != pod_name]
    resumed_log = bed.pod_log(jobs.ns, replacement["metadata"]["name"])
    resume_from = minio.uri(f"runs/evicted/checkpoints/step-{stopped_at}")
    assert f"resuming from {resume_from} (step {stopped_at}," in resumed_log, resumed_log
    assert "checkpoint committed" not in resumed_log.split("resuming from")[0]
    # Every checkpoint is kept: those before the eviction and those after the resume.
    steps = [int(uri.rsplit("-", 1)[1]) for uri in status["checkpoints"]]
    assert status["checkpoints"][0] == first
    assert stopped_at in steps
    assert steps == sorted(set(steps))
    assert steps[-1] == 12


# -- failures ----------------------------------------------------------------------------------


@pytest.mark.timeout(200)
def test_a_trainer_that_keeps_crashing_fails_after_the_backoff_limit(
    tmp_path: Path, jobs: Jobs, operator: Operator, minio: Minio
) -> None:
    output = tmp_path / "run"
    (output / "progress.json").mkdir(parents=True)  # writing progress.json crashes: exit 1
    name = "crashing"
    spec = minio.spec("unused", runPolicy={"backoffLimit": 1})
    spec["output"]["uri"] = str(output)
    jobs.create(name, spec)
    status = _ended(jobs, name, 180)
    assert status["phase"] == "Failed"
    failed = _condition(status, "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "BackoffLimitExceeded")
    assert "backoff limit" in failed["message"]
    assert "trainer exited with code 1 (a crash, or a failed worker)" in failed["message"]
    assert "Is a directory" in failed["message"]  # the trainer's last log line
    pods = jobs.pods(name)
    assert len(pods) == 2  # the first try and one retry
    assert [p["status"]["phase"] for p in pods] == ["Failed", "Failed"]
    assert [trainer_exit(p) for p in pods] == [1, 1]
    job = jobs.job(name)
    assert job is not None
    assert job["status"]["failed"] == 2
    assert status["restarts"] == 2
    reasons = [e["reason"] for e in jobs.events(name)]
    assert "BackoffLimitExceeded" in reasons


@pytest.mark.timeout(150)
def test_an_invalid_data_root_fails_the_job_after_one_pod(
    jobs: Jobs, operator: Operator, minio: Minio
) -> None:
    name = "nodata"
    spec = minio.spec("runs/nodata", runPolicy={"backoffLimit": 3})
    spec["data"]["roots"] = [{"uri": minio.uri("no-such-prefix")}]
    jobs.create(name, spec)
    status = _ended(jobs, name, 120)
    assert status["phase"] == "Failed"
    failed = _condition(status, "Failed")
    assert failed["reason"] == "PodFailurePolicy"
    assert "spec.data.roots[0].uri" in failed["message"]  # the trainer's words, via progress.json
    assert "no-such-prefix" in failed["message"]
    assert "trainer exited with code 2 (invalid job)" in failed["message"]
    (pod,) = jobs.pods(name)  # FailJob: no retry despite backoffLimit 3
    assert trainer_exit(pod) == 2
