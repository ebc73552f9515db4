"""The data benchmarks run end to end on tiny inputs: `bench/inspect_bench.py` (scan, draw,
plan) and `bench/s3_read_bench.py` (its own MinIO from the test bed's binary, the real
loader), each printing its table and writing JSON, so the recorded numbers stay reproducible."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _bench(script: str, *args: str, timeout: float = 240) -> str:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_inspect_bench_scans_draws_and_plans(tmp_path: Path) -> None:
    result = tmp_path / "inspect.json"
    out = _bench(
        "inspect_bench.py", "--images", "300", "--workers", "1,2", "--resolution", "64",
        "--json", str(result),
    )  # fmt: skip
    assert "draw_epoch: 300 images" in out
    data = json.loads(result.read_text())
    assert [row["workers"] for row in data["scan"]] == [1, 2]
    assert data["drawn"] == 300
    assert data["batches"] >= 300 // 8


@pytest.mark.testbed
def test_s3_read_bench_streams_from_its_own_minio(tmp_path: Path) -> None:
    result = tmp_path / "s3.json"
    out = _bench(
        "s3_read_bench.py", "--images", "24", "--size", "64", "--workers", "2",
        "--latency-ms", "0,5", "--json", str(result),
    )  # fmt: skip
    assert "loader w2" in out
    data = json.loads(result.read_text())
    assert data["images"] == 24
    modes = {row["mode"] for entry in data["results"] for row in entry["rows"]}
    assert {"sequential fetch", "sequential decode", "loader w2"} <= modes
