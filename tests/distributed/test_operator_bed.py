"""A two-node FineTuneJob on the test bed: the operator renders an Indexed Job of two pods, the
node agent runs them as local processes, and their `kubedream train --nnodes=2` launchers form
one real two-process torchrun group over loopback (the pods' `<job>-0.<job>.<ns>.svc` master
address resolved to 127.0.0.1 by the agent), training to Succeeded.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubedream_operator.contract import MASTER_PORT
from kubedream_operator.devbed.bed import BedInfo
from tests.operator.bed_support import (
    Jobs,
    Operator,
    PodWatch,
    establish_crd,
    progress_step,
    trainer_exit,
)
from tests.operator.helpers import minimal_spec
from tests.plugins.bed import wait_for

pytestmark = [pytest.mark.testbed, pytest.mark.slow]

TRAINING_ROOT = Path(__file__).resolve().parents[2] / "examples" / "data" / "training"


@pytest.fixture
def jobs(bed: BedInfo, namespace: str) -> Jobs:
    establish_crd(bed)
    return Jobs(bed, namespace)


@pytest.fixture
def operator(bed: BedInfo, namespace: str, jobs: Jobs, tmp_path: Path) -> Iterator[Operator]:
    running = Operator(bed, namespace, tmp_path / "operator.log")
    running.start()
    try:
        yield running
    finally:
        running.stop()


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _two_node_spec(output: Path) -> dict[str, Any]:
    return minimal_spec(
        data={"roots": [{"uri": str(TRAINING_ROOT)}], "resolution": 64, "loaderWorkers": 0},
        training={"batchSize": 1, "maxSteps": 3},
        output={"uri": str(output), "progressEverySteps": 1, "saveEverySteps": 1000},
        resources={"nodes": 2, "gpusPerNode": 1, "cpu": "1", "memory": "2Gi"},
        runPolicy={"backoffLimit": 0},
    )


@pytest.mark.timeout(280)
def test_two_pods_train_as_one_group_to_succeeded(
    jobs: Jobs, operator: Operator, tmp_path: Path
) -> None:
    # All bed pods share the loopback: a rendezvous port still held by an earlier test's pod
    # process would fail this group's node 0 (EADDRINUSE), so wait until it is free.
    wait_for(lambda: _port_free(MASTER_PORT), 60, f"port {MASTER_PORT} to be free")
    output = tmp_path / "run"
    jobs.create("ddp", _two_node_spec(output))
    wait_for(lambda: jobs.phase("ddp") in ("Succeeded", "Failed"), 250, "the training to end")
    status = jobs.status("ddp")
    pods = jobs.pods("ddp")
    assert status["phase"] == "Succeeded", (status.get("message"), operator.tail())
    assert len(pods) == 2
    assert (status["step"], status["totalSteps"]) == (3, 3)
    assert status["worldSize"] == 2
    assert status["lastCheckpoint"] == str(output / "checkpoints" / "step-3")
    progress = (output / "progress.json").read_text()
    assert '"worldSize": 2' in progress


@pytest.fixture
def pod_watch(bed: BedInfo, namespace: str) -> Iterator[PodWatch]:
    watch = PodWatch(bed, namespace)
    yield watch
    watch.stop()


def _ended_version(pod_watch: PodWatch, pod: str) -> dict[str, Any] | None:
    return next((v for v in pod_watch.of(pod) if v["status"].get("phase") == "Failed"), None)


@pytest.mark.timeout(400)
def test_evicting_one_pod_restarts_the_group_without_spending_the_backoff_limit(
    bed: BedInfo, jobs: Jobs, operator: Operator, pod_watch: PodWatch, tmp_path: Path
) -> None:
    """Evict pod 0 of a two-node job with backoffLimit 0: its trainer commits a checkpoint and
    exits 143 (a disruption, ignored); pod 1's rank stops at the same step and exits 76 (peer
    stopped, ignored too); the Job replaces both, the new group resumes from that checkpoint
    and the job succeeds with no failure counted."""
    wait_for(lambda: _port_free(MASTER_PORT), 60, f"port {MASTER_PORT} to be free")
    output = tmp_path / "run"
    spec = _two_node_spec(output)
    spec["training"]["maxSteps"] = 60
    jobs.create("evict", spec)
    wait_for(lambda: progress_step(output) >= 2, 200, "two trained steps")
    first = {
        p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p["metadata"][
            "name"
        ]
        for p in jobs.live_pods("evict")
    }
    assert sorted(first) == ["0", "1"]
    jobs.rest.post(
        f"/api/v1/namespaces/{jobs.ns}/pods/{first['0']}/eviction",
        {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": first["0"], "namespace": jobs.ns},
        },
    )
    evicted = wait_for(lambda: _ended_version(pod_watch, first["0"]), 120, "pod 0 to end")
    stopped = wait_for(lambda: _ended_version(pod_watch, first["1"]), 120, "pod 1 to end")
    assert trainer_exit(evicted) == 143, bed.pod_log(jobs.ns, first["0"])
    assert any(
        c["type"] == "DisruptionTarget" and c["status"] == "True"
        for c in evicted["status"]["conditions"]
    )
    assert trainer_exit(stopped) == 76, bed.pod_log(jobs.ns, first["1"])
    assert "rank 1 stopped with another training process" in bed.pod_log(jobs.ns, first["1"])

    wait_for(lambda: jobs.phase("evict") in ("Succeeded", "Failed"), 250, "the training to end")
    status = jobs.status("evict")
    assert status["phase"] == "Succeeded", (status.get("message"), operator.tail())
    job = jobs.job("evict")
    assert job is not None
    assert job["status"].get("failed", 0) == 0  # both ignored by the podFailurePolicy
    assert job["status"]["succeeded"] == 2
    assert status["step"] == 60
    assert status["restarts"] == 0  # neither pod counted against the backoff limit

    # Both replacements resumed from the checkpoint the evicted group committed.
    committed = [
        line.rsplit("/", 1)[1]
        for line in bed.pod_log(jobs.ns, first["0"]).splitlines()
        if "checkpoint committed:" in line
    ]
    stopped_at = int(committed[-1].removeprefix("step-"))
    assert 2 <= stopped_at < 60
    replacement = next(
        p["metadata"]["name"]
        for p in jobs.pods("evict")
        if p["metadata"]["name"] not in first.values()
        and p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "0"
    )
    resumed_log = bed.pod_log(jobs.ns, replacement)
    assert (
        f"resuming from {output}/checkpoints/step-{stopped_at} (step {stopped_at}," in resumed_log
    )
