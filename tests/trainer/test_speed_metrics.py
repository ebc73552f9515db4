"""Per-step metrics (`KUBEDREAM_METRICS_FILE`): one line per step with the step's time and
data wait, and losses that agree exactly with what progress.json reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from .conftest import read_json, train, write_job

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("trainer_env")]


def test_metrics_file_has_one_line_per_step_consistent_with_progress(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = tmp_path / "metrics" / "steps.jsonl"
    monkeypatch.setenv("KUBEDREAM_METRICS_FILE", str(metrics))
    job = write_job(
        tmp_path / "job.yaml",
        data_root,
        tmp_path / "out",
        training={"maxSteps": 5, "gradientAccumulation": 2, "maxGradNorm": 1.0},
        output={"progressEverySteps": 2},
    )
    assert train(job) == 0
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3, 4, 5]
    for line in lines:
        assert line["images"] == 4
        assert math.isfinite(line["loss"])
        assert 0 < line["stepSeconds"] <= line["wallSeconds"]
        assert 0 <= line["dataWaitSeconds"] <= line["wallSeconds"]
        assert "peakMemoryGiB" not in line  # CPU
    # progress.json's loss is the bias-corrected EMA of exactly these per-step losses.
    average = 0.0
    for line in lines:
        average = 0.9 * average + 0.1 * line["loss"]
    expected = average / (1 - 0.9 ** len(lines))
    assert read_json(tmp_path / "out/progress.json")["loss"] == expected
