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


@pytest.mark.slow
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


def _bench_module() -> object:
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_bench", REPO / "bench/train_bench.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bare_loop_yardsticks_from_the_h200_reference() -> None:
    bench: object = _bench_module()
    rate = bench.bare_rate  # type: ignore[attr-defined]
    reference = {
        "rows": [
            {"model": "sd15-unet-512", "batch": 32, "compile": False, "images_per_s": 89.8},
            {"model": "sd15-unet-512", "batch": 32, "compile": True, "images_per_s": 131.5},
            {"model": "sdxl-unet-1024", "batch": 4, "compile": False, "images_per_s": 11.5},
            {"model": "sd-vae-encode", "res": 512, "batch": 32, "images_per_s": 179.5},
        ]
    }
    assert rate(reference, "sd15", 32, False, True) == 89.8
    assert rate(reference, "sd15", 32, True, True) == 131.5
    # Uncached: the UNet step and the VAE encode are paid one after the other.
    assert rate(reference, "sd15", 32, False, False) == pytest.approx(59.86, abs=0.01)
    assert rate(reference, "sdxl", 4, False, True) == 11.5
    assert rate(reference, "sd15", 8, False, True) is None
    assert rate(None, "sd15", 32, False, True) is None


def test_steady_state_skips_warmup_and_the_cache_filling_epoch() -> None:
    bench: object = _bench_module()
    lines = [{"step": i} for i in range(1, 21)]
    window = bench.steady_state  # type: ignore[attr-defined]
    assert [line["step"] for line in window(lines, 5, 8, False)] == list(range(6, 21))
    assert [line["step"] for line in window(lines, 5, 8, True)] == list(range(9, 21))
