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
from tests.operator.bed_support import Jobs, Operator, establish_crd
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
