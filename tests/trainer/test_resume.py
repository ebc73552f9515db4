"""Resume: bit-identical to an uninterrupted run, after a stop at maxSteps or a SIGTERM;
half-written and damaged checkpoints are never resumed from; rotation keeps the newest."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from kubedream_trainer.errors import ExitCode

from .conftest import committed_steps, read_json, train, write_job

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("trainer_env")]

# 8 images, batch 2, 2 micro-batches per step: 2 steps per epoch, so step 3 stops mid-epoch.
RICH = {
    "data": {"flipP": 0.5, "condDropout": 0.25, "shuffleTags": True},
    "training": {
        "batchSize": 2,
        "gradientAccumulation": 2,
        "textEncoderLearningRate": 5e-5,
        "lrWarmupSteps": 2,
        "ema": {"decay": 0.9},
        "minSnrGamma": 5.0,
        "offsetNoise": 0.1,
        "cacheLatents": True,
    },
}


def _rich(max_steps: int) -> dict[str, Any]:
    return {"data": RICH["data"], "training": {**RICH["training"], "maxSteps": max_steps}}


def _load_nested(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_identical(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict), where
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple), where
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


def _assert_same_checkpoint(first: Path, second: Path) -> None:
    """Every tensor identical (safetensors headers may order metadata differently), the
    optimizer and trainer state equal tensor by tensor, every other file byte-identical."""
    files = [entry["path"] for entry in read_json(first / "checkpoint.json")["files"]]
    assert files == [entry["path"] for entry in read_json(second / "checkpoint.json")["files"]]
    for name in files:
        if name.endswith(".pt"):
            _assert_identical(_load_nested(first / name), _load_nested(second / name), name)
        elif name.endswith(".safetensors"):
            _assert_identical(_safetensors(first / name), _safetensors(second / name), name)
        else:
            digest = [
                hashlib.sha256((folder / name).read_bytes()).hexdigest()
                for folder in (first, second)
            ]
            assert digest[0] == digest[1], name


def test_stop_at_3_then_resume_to_6_is_bit_identical_to_6_straight(
    tmp_path: Path, data_root: Path
) -> None:
    straight = write_job(tmp_path / "straight.yaml", data_root, tmp_path / "a", **_rich(6))
    assert train(straight) == 0

    first = write_job(tmp_path / "first.yaml", data_root, tmp_path / "b", **_rich(3))
    assert train(first) == 0
    assert read_json(tmp_path / "b/checkpoints/step-3/checkpoint.json")["position"] == {
        "step": 3,
        "epochIndex": 1,
        "batchInEpoch": 2,
        "imagesSeen": 12,
        "imagesInEpoch": 4,
        "epochCuts": [[4, 1]],
    }
    resumed = write_job(tmp_path / "resumed.yaml", data_root, tmp_path / "b", **_rich(6))
    assert train(resumed) == 0

    assert committed_steps(tmp_path / "a") == [6]
    assert committed_steps(tmp_path / "b") == [3, 6]
    _assert_same_checkpoint(tmp_path / "a/checkpoints/step-6", tmp_path / "b/checkpoints/step-6")


@contextmanager
def trainer_at_step_2(
    job: Path, output: Path, env: dict[str, str]
) -> Iterator[subprocess.Popen[str]]:
    """`kubedream train JOB` as a subprocess (stdout and stderr together, as text), yielded
    once its progress.json says step 2; killed on the way out if still running."""
    process = subprocess.Popen(
        [sys.executable, "-m", "kubedream_trainer.cli", "train", str(job), "--device", "cpu"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            progress = output / "progress.json"
            if progress.exists() and json.loads(progress.read_text() or "{}").get("step", 0) >= 2:
                break
            time.sleep(0.1)
        assert process.poll() is None, process.communicate()[0]
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sigterm_commits_a_checkpoint_exits_143_and_a_second_trainer_is_kept_out(
    tmp_path: Path, data_root: Path, trainer_env: dict[str, str]
) -> None:
    output = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", data_root, output, training={"maxSteps": 2000})
    with trainer_at_step_2(job, output, trainer_env) as process:
        # A second trainer on the same output is turned away without writing anything.
        holder = read_json(output / "lease.json")["owner"]
        assert train(job) == ExitCode.OUTPUT_LOCKED
        assert read_json(output / "lease.json")["owner"] == holder
        assert read_json(output / "progress.json")["phase"] != "Failed"
        process.send_signal(signal.SIGTERM)
        log, _ = process.communicate(timeout=120)
        code = process.returncode
    assert code == 143, log
    steps = committed_steps(output)
    assert len(steps) == 1
    assert steps[0] >= 2
    stopped = steps[0]
    progress = read_json(output / "progress.json")
    assert (progress["phase"], progress["step"]) == ("Interrupted", stopped)
    assert progress["lastCheckpoint"] == str(output / f"checkpoints/step-{stopped}")
    assert not (output / "lease.json").exists()

    again = write_job(
        tmp_path / "again.yaml", data_root, output, training={"maxSteps": stopped + 1}
    )
    assert train(again) == 0
    assert committed_steps(output) == [stopped, stopped + 1]
    assert (
        read_json(output / f"checkpoints/step-{stopped + 1}/checkpoint.json")["position"]["step"]
        == stopped + 1
    )


def test_a_trainer_whose_lease_is_taken_over_stops_at_once_without_writing(
    tmp_path: Path, data_root: Path, trainer_env: dict[str, str]
) -> None:
    """Another trainer takes the output's lease mid-run (this one was partitioned from the
    store long enough to look dead): the heartbeat notices, the loop stops at the next step
    with exit 75, commits nothing and leaves the usurper's lease and progress alone."""
    output = tmp_path / "out"
    job = write_job(
        tmp_path / "job.yaml",
        data_root,
        output,
        training={"maxSteps": 2000},
        output={"saveEverySteps": 1000},
    )
    with trainer_at_step_2(job, output, {**trainer_env, "KUBEDREAM_LEASE_TTL": "0.9"}) as process:
        usurper = {"owner": "usurper", "host": "elsewhere", "expiresAtUnix": time.time() + 600}
        (output / "lease.json").write_text(json.dumps(usurper))
        taken_at = time.monotonic()
        log, _ = process.communicate(timeout=60)
        assert time.monotonic() - taken_at < 30
    assert process.returncode == ExitCode.OUTPUT_LOCKED, log
    assert "another trainer took over the lease" in log
    assert committed_steps(output) == []
    assert read_json(output / "lease.json")["owner"] == "usurper"
    assert read_json(output / "progress.json")["step"] < 2000


def test_half_written_checkpoints_are_ignored_and_cleaned(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out"
    assert train(write_job(tmp_path / "two.yaml", data_root, output, training={"maxSteps": 2})) == 0
    # A crash mid-upload: files but no checkpoint.json, newer than the committed step 2.
    for step in (3, 7):
        partial = output / f"checkpoints/step-{step}/training_state"
        partial.mkdir(parents=True)
        (partial / "unet.safetensors").write_bytes(b"half")
    capsys.readouterr()

    assert (
        train(write_job(tmp_path / "four.yaml", data_root, output, training={"maxSteps": 4})) == 0
    )
    assert f"resuming from {output / 'checkpoints/step-2'}" in capsys.readouterr().err
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert committed_steps(output) == [2, 4]


@pytest.fixture
def damaged_final(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[Path, Path, Path]:
    """A finished 4-step job (checkpoints at 2 and 4) whose step-4 optimizer state was then
    truncated: (job, output, the damaged file)."""
    output = tmp_path / "out"
    job = write_job(
        tmp_path / "job.yaml",
        data_root,
        output,
        training={"maxSteps": 4},
        output={"saveEverySteps": 2},
    )
    assert train(job) == 0
    damaged = output / "checkpoints/step-4/training_state/optimizer.pt"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    capsys.readouterr()
    return job, output, damaged


def test_a_damaged_committed_checkpoint_is_skipped_for_an_older_one(
    tmp_path: Path,
    data_root: Path,
    capsys: pytest.CaptureFixture[str],
    damaged_final: tuple[Path, Path, Path],
) -> None:
    _, output, damaged = damaged_final
    assert train(write_job(tmp_path / "six.yaml", data_root, output, training={"maxSteps": 6})) == 0
    assert f"resuming from {output / 'checkpoints/step-2'}" in capsys.readouterr().err
    assert committed_steps(output) == [2, 4, 6]
    assert damaged.stat().st_size > 0  # left in place for inspection, never overwritten


def test_a_damaged_final_checkpoint_is_not_reported_as_the_result(
    capsys: pytest.CaptureFixture[str], damaged_final: tuple[Path, Path, Path]
) -> None:
    """The final step's checkpoint is damaged: starting the job again resumes from the one
    before, trains to the final step, and fails (exit 4) naming the damaged folder, rather
    than reporting success with it."""
    job, output, damaged = damaged_final
    assert train(job) == ExitCode.STORAGE
    said = capsys.readouterr().err
    assert f"resuming from {output / 'checkpoints/step-2'}" in said
    assert f"{output / 'checkpoints/step-4'} is committed but damaged" in said
    assert read_json(output / "progress.json")["phase"] == "Failed"
    assert damaged.stat().st_size > 0


def test_rotation_keeps_the_newest_committed(tmp_path: Path, data_root: Path) -> None:
    output = tmp_path / "out"
    job = write_job(
        tmp_path / "job.yaml",
        data_root,
        output,
        training={"maxSteps": 5},
        output={"saveEverySteps": 1, "keepLast": 2, "formats": ["safetensors"]},
    )
    assert train(job) == 0
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-4", "step-5"]
    assert read_json(output / "progress.json")["checkpoints"] == [
        str(output / "checkpoints/step-4"),
        str(output / "checkpoints/step-5"),
    ]
    folder = output / "checkpoints/step-5"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
        "checkpoint.json",
        "model.safetensors",
        "training_state/optimizer.pt",
        "training_state/trainer.pt",
        "training_state/unet.safetensors",
    ]
