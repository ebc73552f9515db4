"""Fixtures for the data-parallel tests: an offline environment, a small data root, and
`kubedream train` launched as a subprocess with any number of processes (gloo on CPU).

Every run records what each rank trained per step (KUBEDREAM_DEBUG_BATCHES), so tests can
check the epoch plan and the loss curve without parsing logs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.conftest import make_root, write_job

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dist_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Offline, single-threaded, one tiny-model cache for the module."""
    cache = tmp_path_factory.mktemp("kubedream-cache")
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "KUBEDREAM_CACHE_DIR": str(cache),
        "OMP_NUM_THREADS": "1",
        "KUBEDREAM_LEASE_TTL": "30",
        "KUBEDREAM_LEASE_WAIT": "0",
        "KUBEDREAM_DIST_TIMEOUT": "60",
        "PYTHONPATH": os.pathsep.join([str(REPO / "trainer"), str(REPO / "operator")]),
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 images of one bucket: 4 step batches of 2 per epoch, no padding."""
    return make_root(tmp_path_factory.mktemp("data") / "root", count=8)


@dataclass
class Run:
    """One finished `kubedream train` and what its ranks recorded."""

    code: int
    output: Path
    records: dict[int, list[dict[str, Any]]]
    """rank -> one record per optimizer step (indices per micro-batch, loss)."""
    log: str

    def unet(self, step: int) -> dict[str, torch.Tensor]:
        path = self.output / f"checkpoints/step-{step}/training_state/unet.safetensors"
        return load_file(str(path))

    def losses(self) -> list[float]:
        return [r["loss"] for r in self.records[0]]


def command(job: Path, processes: int) -> list[str]:
    cmd = [sys.executable, "-m", "kubedream_trainer.cli", "train", str(job), "--device", "cpu"]
    if processes > 1:
        cmd += ["--nproc-per-node", str(processes), "--master-port", str(free_port())]
    return cmd


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_records(folder: Path) -> dict[int, list[dict[str, Any]]]:
    records: dict[int, list[dict[str, Any]]] = {}
    for path in sorted(folder.glob("rank-*.jsonl")):
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        records[int(path.stem.removeprefix("rank-"))] = lines
    return records


def run_train(
    tmp: Path,
    env: dict[str, str],
    data: Path,
    output: Path,
    *,
    processes: int,
    name: str = "ddp",
    timeout: float = 200,
    sections: dict[str, Any] | None = None,
    **training: Any,
) -> Run:
    """`kubedream train` on `processes` CPU processes (batch 1, constant LR unless overridden);
    `sections`: other parts of the spec (samples, output), deep-merged."""
    tmp.mkdir(parents=True, exist_ok=True)
    debug = tmp / "records"
    job = write_job(
        tmp / "job.yaml",
        data,
        output,
        name=name,
        training={"batchSize": 1, "lrScheduler": "constant", "maxSteps": None, **training},
        **(sections or {}),
    )
    result = subprocess.run(
        command(job, processes),
        env={**env, "KUBEDREAM_DEBUG_BATCHES": str(debug)},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp,
        check=False,
    )
    return Run(result.returncode, output, read_records(debug), result.stdout + result.stderr)


STEPS = 8
"""`two_ranks`: 2 epochs of 8 images in step batches of 2."""


def assert_close_weights(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], env: dict[str, str]
) -> None:
    """Same weights up to float rounding: the two runs differ by under 1% of how far training
    moved them from the tiny model's initial weights (Adam turns rounding in near-zero
    gradients into learning-rate-sized steps, so an absolute bound would be arbitrary; a
    different batch or no gradient sync differs by the order of the update itself)."""
    (initial,) = Path(env["KUBEDREAM_CACHE_DIR"]).glob(
        "tiny/*/unet/diffusion_pytorch_model.safetensors"
    )
    init = load_file(str(initial))
    assert a.keys() == b.keys()
    apart = sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a) ** 0.5
    moved = sum(float((a[k] - init[k]).double().pow(2).sum()) for k in a) ** 0.5
    assert moved > 0
    assert apart < 0.01 * moved, f"weights {apart} apart after moving {moved}"


@pytest.fixture(scope="module")
def two_ranks(
    tmp_path_factory: pytest.TempPathFactory, dist_env: dict[str, str], data: Path
) -> Run:
    tmp = tmp_path_factory.mktemp("two")
    return run_train(tmp, dist_env, data, tmp / "out", processes=2, epochs=2)
