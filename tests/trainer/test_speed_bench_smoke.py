"""bench/train_bench.py --smoke: the benchmark runs end to end on a CPU with tiny models
(real `kubedream train` subprocesses, per-step metrics, table and JSON), so the GPU run is
known to work before a GPU is at hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("trainer_env")]


def test_train_bench_smoke_writes_a_table_and_json(
    tmp_path: Path, trainer_env: dict[str, str]
) -> None:
    result = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench/train_bench.py"),
            "--smoke",
            "--no-minio",
            "--work",
            str(tmp_path / "work"),
            "--json",
            str(result),
        ],
        env=trainer_env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "sd15-cached" in done.stdout
    assert "sdxl-cached" in done.stdout
    report = json.loads(result.read_text())
    assert report["smoke"] is True
    assert report["dataSource"].startswith("local disk")
    assert [row["run"] for row in report["rows"]] == ["sd15-cached", "sdxl-cached"]
    for row in report["rows"]:
        assert row["steadySteps"] >= 1
        assert row["imagesPerSecond"] > 0
        assert row["stepSecondsMedian"] > 0
        assert row["dataWaitSecondsMean"] >= 0
        assert row["peakMemoryGiB"] is None  # CPU
