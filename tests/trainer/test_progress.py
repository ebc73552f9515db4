"""progress.json, the JSON log lines off-terminal and the bar on a terminal."""

from __future__ import annotations

import io
import json
from pathlib import Path

from kubedream_trainer.progress import Phase, Progress
from kubedream_trainer.storage.local import LocalStorage


def _progress(
    tmp_path: Path, tty: bool, every: int = 2
) -> tuple[Progress, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    progress = Progress(LocalStorage(str(tmp_path)), "job", every, tty=tty, stdout=out, stderr=err)
    progress.update(totalSteps=4, totalEpochs=2)
    return progress, out, err


def test_json_lines_every_n_steps_and_progress_json_fields(tmp_path: Path) -> None:
    progress, out, err = _progress(tmp_path, tty=False)
    progress.phase(Phase.TRAINING, "training")
    for step, loss in enumerate([1.0, 0.5, 0.5, 0.5], start=1):
        progress.step(step, 1 + (step - 1) // 2, loss, images=2, learning_rate=1e-4)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["step"] for line in lines] == [2, 4]
    assert all(line["event"] == "progress" for line in lines)
    record = json.loads((tmp_path / "progress.json").read_text())
    assert set(record) == {
        "phase",
        "step",
        "totalSteps",
        "epoch",
        "totalEpochs",
        "loss",
        "learningRate",
        "imagesPerSecond",
        "lastCheckpoint",
        "checkpoints",
        "lastSamples",
        "worldSize",
        "message",
        "job",
        "startedAt",
        "updatedAt",
    }
    assert (record["phase"], record["step"], record["epoch"], record["totalEpochs"]) == (
        "Training",
        4,
        2,
        2,
    )
    # Bias-corrected exponential average (beta 0.9) of 1.0, 0.5, 0.5, 0.5.
    average = 0.0
    for loss in (1.0, 0.5, 0.5, 0.5):
        average = 0.9 * average + 0.1 * loss
    assert record["loss"] == average / (1 - 0.9**4)
    assert record["imagesPerSecond"] > 0
    assert err.getvalue() == ""


def test_phase_changes_write_at_once_and_say_why(tmp_path: Path) -> None:
    progress, _, err = _progress(tmp_path, tty=False)
    progress.set_checkpoints(["out/checkpoints/step-2", "out/checkpoints/step-4"])
    progress.phase(Phase.FAILED, "spec.model.base: model folder x does not exist")
    record = json.loads((tmp_path / "progress.json").read_text())
    assert record["phase"] == "Failed"
    assert record["message"] == "spec.model.base: model folder x does not exist"
    assert record["lastCheckpoint"] == "out/checkpoints/step-4"
    assert "kubedream: spec.model.base: model folder x does not exist" in err.getvalue()


def test_a_bar_on_a_terminal_and_no_json_lines(tmp_path: Path) -> None:
    progress, out, err = _progress(tmp_path, tty=True)
    progress.phase(Phase.TRAINING, "training")
    for step in range(1, 5):
        progress.step(step, 1, 0.5, images=2, learning_rate=1e-4)
    progress.phase(Phase.SUCCEEDED, "done")
    assert out.getvalue() == ""
    assert "4/4" in err.getvalue()
    assert "loss=0.5000" in err.getvalue()


def test_ranks_other_than_zero_write_nothing(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    progress = Progress(None, "job", 1, tty=False, stdout=out, stderr=err)
    progress.phase(Phase.TRAINING, "training")
    progress.step(1, 1, 0.5, images=2, learning_rate=1e-4)
    progress.say("hello")
    assert (out.getvalue(), err.getvalue()) == ("", "")
    assert list(tmp_path.iterdir()) == []
