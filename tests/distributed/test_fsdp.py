"""FSDP (dataParallel: fsdp) on CPU (gloo): two processes sharding the UNet, the text encoder,
their optimizer state and EMA train the same run as DDP and as one process with the same step
batch, write checkpoints and exports in the same layout, render samples, and resume either
way between FSDP and an unsharded run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from .conftest import STEPS, Run, assert_close_weights, run_train

pytestmark = pytest.mark.slow

RICH: dict[str, Any] = {"textEncoderLearningRate": 5e-5, "ema": {"decay": 0.9}}
SAMPLES = {"samples": {"prompts": ["a red square"], "steps": 2, "everySteps": 3}}


def test_fsdp_trains_the_same_run_as_ddp(
    tmp_path: Path, dist_env: dict[str, str], data: Path, two_ranks: Run
) -> None:
    fsdp = run_train(
        tmp_path, dist_env, data, tmp_path / "out", processes=2, epochs=2, dataParallel="fsdp"
    )
    assert fsdp.code == 0, fsdp.log
    assert "FSDP over 2 processes" in fsdp.log
    for mine, theirs in zip(fsdp.records[0], two_ranks.records[0], strict=True):
        assert mine["indices"] == theirs["indices"]
    assert fsdp.losses() == pytest.approx(two_ranks.losses(), rel=1e-4)
    assert_close_weights(fsdp.unet(STEPS), two_ranks.unet(STEPS), dist_env)


@pytest.fixture(scope="module")
def reference(
    tmp_path_factory: pytest.TempPathFactory, dist_env: dict[str, str], data: Path
) -> Run:
    """One process, step batch 2 (accumulation 2), text encoder and EMA, 5 steps."""
    tmp = tmp_path_factory.mktemp("reference")
    run = run_train(
        tmp, dist_env, data, tmp / "out", processes=1, maxSteps=5, gradientAccumulation=2, **RICH
    )
    assert run.code == 0, run.log
    return run


@pytest.mark.parametrize("first", ["fsdp", "one"])
def test_resume_between_fsdp_and_one_process(
    first: str, tmp_path: Path, dist_env: dict[str, str], data: Path, reference: Run
) -> None:
    """Stop at step 3 on one side, finish at 5 on the other: the resumed steps train what the
    uninterrupted run trained, with its losses, and end at its weights (text encoder and EMA
    included); the FSDP side also exports both formats and renders samples."""
    output = tmp_path / "out"
    fsdp: dict[str, Any] = {"processes": 2, "dataParallel": "fsdp", "sections": SAMPLES}
    one: dict[str, Any] = {"processes": 1, "gradientAccumulation": 2}
    sides = (fsdp, one) if first == "fsdp" else (one, fsdp)
    part = run_train(tmp_path / "a", dist_env, data, output, maxSteps=3, **RICH, **sides[0])
    assert part.code == 0, part.log
    rest = run_train(tmp_path / "b", dist_env, data, output, maxSteps=5, **RICH, **sides[1])
    assert rest.code == 0, rest.log
    assert f"resuming from {output}/checkpoints/step-3" in rest.log
    resumed = {r["step"]: r["loss"] for r in rest.records[0]}
    assert sorted(resumed) == [3, 4]
    for record in reference.records[0][3:]:
        assert resumed[record["step"]] == pytest.approx(record["loss"], rel=1e-4)
    final = output / "checkpoints/step-5"
    expected = reference.output / "checkpoints/step-5"
    for name in ("unet", "text_encoder", "ema_unet"):
        got = load_file(str(final / f"training_state/{name}.safetensors"))
        want = load_file(str(expected / f"training_state/{name}.safetensors"))
        assert got.keys() == want.keys()
        assert all(float((got[k] - want[k]).abs().max()) < 1e-4 for k in got), (
            f"{name} differs from the uninterrupted run"
        )
    # The FSDP run exported both formats (EMA weights) and rendered samples at step 3.
    fsdp_step = output / ("checkpoints/step-3" if first == "fsdp" else "checkpoints/step-5")
    assert (fsdp_step / "model.safetensors").is_file()
    assert (fsdp_step / "unet/diffusion_pytorch_model.safetensors").is_file()
    exported = load_file(str(fsdp_step / "unet/diffusion_pytorch_model.safetensors"))
    ema = load_file(str(fsdp_step / "training_state/ema_unet.safetensors"))
    assert all(float((exported[k] - ema[k]).abs().max()) == 0 for k in ema)
    if first == "fsdp":
        assert list((output / "samples").glob("step-3/*.png"))


def test_sdxl_with_its_text_encoders_trained_shards_by_itself(
    tmp_path: Path, dist_env: dict[str, str], data: Path
) -> None:
    """`dataParallel: auto` picks FSDP for SDXL with the text encoders trained (both encoders'
    layers and the UNet's blocks sharded) and the run exports a loadable checkpoint."""
    run = run_train(
        tmp_path,
        dist_env,
        data,
        tmp_path / "out",
        processes=2,
        maxSteps=2,
        textEncoderLearningRate=5e-5,
        sections={"model": {"base": "tiny-sdxl"}},
    )
    assert run.code == 0, run.log
    assert "training sdxl" in run.log
    assert "FSDP over 2 processes" in run.log
    step = run.output / "checkpoints/step-2"
    text = load_file(str(step / "training_state/text_encoder.safetensors"))
    assert {k.split(".", 1)[0] for k in text} == {"text_encoder", "text_encoder_2"}
    assert (step / "text_encoder_2").is_dir()
    assert (step / "model.safetensors").is_file()


def test_wants_fsdp() -> None:
    from kubedream_trainer.sharding import wants_fsdp

    assert wants_fsdp("auto", "sdxl", True, 2)
    assert not wants_fsdp("auto", "sdxl", False, 2)
    assert not wants_fsdp("auto", "sd1", True, 8)
    assert wants_fsdp("fsdp", "sd1", False, 2)
    assert not wants_fsdp("fsdp", "sdxl", True, 1)  # one process never shards
    assert not wants_fsdp("ddp", "sdxl", True, 8)
