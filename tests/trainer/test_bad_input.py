"""Bad input and failures: a clear message naming what to fix, a non-zero exit code, phase
Failed in progress.json, and nothing already saved damaged."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from kubedream_trainer.errors import ExitCode

from .conftest import committed_steps, read_json, train, write_job

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("trainer_env")]


def _failed(output: Path) -> str:
    progress = read_json(output / "progress.json")
    assert progress["phase"] == "Failed"
    assert not (output / "lease.json").exists()
    message: str = progress["message"]
    return message


def test_an_invalid_spec_lists_every_field_and_writes_nothing(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(
        tmp_path / "job.yaml",
        data_root,
        tmp_path / "out",
        data={"roots": [{"uri": str(data_root), "multiplier": -1}]},
        training={"batchSize": 0},
    )
    assert train(job) == ExitCode.INVALID_JOB
    err = capsys.readouterr().err
    assert "spec.data.roots[0].multiplier: must be > 0, got -1" in err
    assert "spec.training.batchSize: must be >= 1, got 0" in err
    assert not (tmp_path / "out").exists()


def test_an_output_that_cannot_be_written_fails_naming_the_field(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    output = blocker / "out"
    assert train(write_job(tmp_path / "job.yaml", data_root, output)) == ExitCode.INVALID_JOB
    err = capsys.readouterr().err
    assert f"spec.output.uri: cannot write to the local folder '{output}'" in err
    assert "Traceback" not in err
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("missing", "spec.model.base: model folder {base} does not exist"),
        ("empty", "spec.model.base: {base}/model_index.json not found"),
    ],
)
def test_a_missing_model_folder_fails_naming_the_field(
    tmp_path: Path, data_root: Path, base: str, expected: str
) -> None:
    if base == "empty":
        (tmp_path / "empty").mkdir()
    if base in ("missing", "empty"):
        base = str(tmp_path / base)
    output = tmp_path / "out"
    assert (
        train(write_job(tmp_path / "job.yaml", data_root, output, model={"base": base}))
        == ExitCode.INVALID_JOB
    )
    assert expected.format(base=base) in _failed(output)
    assert committed_steps(output) == []


@pytest.mark.parametrize("kind", ["empty", "missing", "unusable"])
def test_a_data_root_without_usable_images_fails_naming_the_field(
    tmp_path: Path, kind: str
) -> None:
    root = tmp_path / "data"
    if kind == "empty":
        root.mkdir()
    elif kind == "unusable":
        root.mkdir()
        (root / "broken.png").write_bytes(b"not an image")
        (root / "broken.txt").write_text("a caption for a broken image")
        (root / "empty.jpg").write_bytes(b"")
    output = tmp_path / "out"
    assert train(write_job(tmp_path / "job.yaml", root, output)) == ExitCode.INVALID_JOB
    message = _failed(output)
    assert message.startswith("spec.data.roots: ")
    assert str(root) in message
    if kind == "unusable":
        assert f"{root}/broken.png: skipped: not a readable image" in message


def test_adamw8bit_without_bitsandbytes_says_what_to_install(
    tmp_path: Path, data_root: Path
) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("bitsandbytes is installed here")
    output = tmp_path / "out"
    assert (
        train(
            write_job(tmp_path / "job.yaml", data_root, output, training={"optimizer": "adamw8bit"})
        )
        == ExitCode.INVALID_JOB
    )
    assert "spec.training.optimizer: adamw8bit needs the bitsandbytes package" in _failed(output)


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("loss", "the loss is nan at step 3: training diverged"),
        ("gradients", "the gradient norm is inf at step 3: training diverged"),
    ],
)
def test_divergence_fails_without_touching_checkpoints(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch, where: str, message: str
) -> None:
    output = tmp_path / "out"
    assert train(write_job(tmp_path / "two.yaml", data_root, output, training={"maxSteps": 2})) == 0
    before = {
        p: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in output.glob("checkpoints/**/*")
        if p.is_file()
    }

    if where == "loss":
        import kubedream_trainer.losses as losses

        def nan_loss(*args: object, **kwargs: object) -> torch.Tensor:
            return torch.tensor(float("nan"), requires_grad=True)

        monkeypatch.setattr(losses, "diffusion_loss", nan_loss)
    else:
        from accelerate import Accelerator

        def inf_norm(
            self: object, parameters: object, max_norm: float, norm_type: float = 2
        ) -> torch.Tensor:
            return torch.tensor(float("inf"))

        monkeypatch.setattr(Accelerator, "clip_grad_norm_", inf_norm)
    job = write_job(
        tmp_path / "four.yaml",
        data_root,
        output,
        training={"maxSteps": 4},
        output={"saveEverySteps": 1},
    )
    assert train(job) == ExitCode.DIVERGED
    assert message in _failed(output)
    assert committed_steps(output) == [2]
    after = {
        p: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in output.glob("checkpoints/**/*")
        if p.is_file()
    }
    assert after == before


def test_an_output_held_by_a_live_trainer_is_refused_untouched(
    tmp_path: Path, data_root: Path
) -> None:
    output = tmp_path / "out"
    output.mkdir()
    lease = {
        "owner": "other",
        "job": "x",
        "host": "node-2",
        "pid": 7,
        "expiresAtUnix": time.time() + 3600,
    }
    (output / "lease.json").write_text(json.dumps(lease))
    assert train(write_job(tmp_path / "job.yaml", data_root, output)) == ExitCode.OUTPUT_LOCKED
    assert sorted(p.name for p in output.iterdir()) == ["lease.json"]
    assert json.loads((output / "lease.json").read_text()) == lease


def test_an_abandoned_lease_is_taken_over(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / "lease.json").write_text(
        json.dumps({"owner": "crashed", "expiresAtUnix": time.time() + 3600})
    )
    monkeypatch.setenv("KUBEDREAM_LEASE_TTL", "0.5")
    monkeypatch.setenv("KUBEDREAM_LEASE_WAIT", "10")
    assert train(write_job(tmp_path / "job.yaml", data_root, output, training={"maxSteps": 1})) == 0
    assert committed_steps(output) == [1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_a_gpu_that_is_not_there(
    tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = write_job(tmp_path / "job.yaml", data_root, tmp_path / "out")
    assert train(job, device="cuda") == ExitCode.INVALID_JOB
    assert "--device cuda: no CUDA GPU is available here" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_trainer_whose_lease_was_taken_over_stops_without_committing(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import kubedream_trainer.loop as loop

    output = tmp_path / "out"
    usurper = {
        "owner": "usurper",
        "job": "other",
        "host": "node-9",
        "expiresAtUnix": time.time() + 3600,
    }
    real_step = loop.optimizer_step

    def step_then_lose_the_lease(*args: Any, **kwargs: Any) -> Any:
        result = real_step(*args, **kwargs)
        (output / "lease.json").write_text(json.dumps(usurper))
        return result

    monkeypatch.setattr(loop, "optimizer_step", step_then_lose_the_lease)
    job = write_job(tmp_path / "job.yaml", data_root, output, output={"saveEverySteps": 1})
    assert train(job) == ExitCode.OUTPUT_LOCKED
    assert committed_steps(output) == []
    assert json.loads((output / "lease.json").read_text()) == usurper
    assert read_json(output / "progress.json")["phase"] != "Failed"
