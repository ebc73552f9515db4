"""A few-step CPU run of the tiny model: the exact checkpoints, metrics and samples it writes,
and that what it writes loads back (diffusers folder, single file) and generates."""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from .conftest import committed_steps, read_json, train, write_job

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("trainer_env")]

DIFFUSERS_FILES = {
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
}
STATE_FILES = {
    "training_state/unet.safetensors",
    "training_state/ema_unet.safetensors",
    "training_state/optimizer.pt",
    "training_state/trainer.pt",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, trainer_env: dict[str, str]) -> dict[str, Any]:
    """4 steps, EMA, checkpoints at 2 and 4, samples at the end."""
    from .conftest import make_root

    tmp = tmp_path_factory.mktemp("train")
    output = tmp / "out"
    job = write_job(
        tmp / "job.yaml",
        make_root(tmp / "data"),
        output,
        training={
            "ema": {"decay": 0.9},
            "minSnrGamma": 5.0,
            "offsetNoise": 0.05,
            "gradientCheckpointing": True,
        },
        output={"saveEverySteps": 2, "keepLast": 5},
        samples={"prompts": ["a photo of thing 1", "a red square"], "steps": 2},
    )
    return {"code": train(job), "output": output, "job": job}


def test_exits_zero_with_committed_checkpoints(run: dict[str, Any]) -> None:
    assert run["code"] == 0
    assert committed_steps(run["output"]) == [2, 4]


def test_checkpoint_folder_holds_exactly_the_formats_and_state(run: dict[str, Any]) -> None:
    folder = run["output"] / "checkpoints/step-4"
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert on_disk == DIFFUSERS_FILES | STATE_FILES | {"model.safetensors", "checkpoint.json"}


def test_manifest_lists_every_file_with_size_and_sha256(run: dict[str, Any]) -> None:
    folder = run["output"] / "checkpoints/step-4"
    manifest = read_json(folder / "checkpoint.json")
    assert manifest["format"] == "kubedream.io/checkpoint/v1"
    assert manifest["step"] == 4
    assert manifest["final"] is True
    assert manifest["formats"] == ["diffusers", "safetensors"]
    assert (manifest["family"], manifest["predictionType"], manifest["ema"]) == (
        "sd1",
        "epsilon",
        True,
    )
    # 8 images in batches of 2: step 4 ends epoch 1; the next would be epoch index 1, batch 0.
    assert manifest["position"] == {
        "step": 4,
        "epochIndex": 1,
        "batchInEpoch": 0,
        "imagesSeen": 8,
        "imagesInEpoch": 0,
        "epochCuts": [],
    }
    assert manifest["epoch"] == 1
    assert manifest["specHash"].startswith("sha256:")
    datetime.fromisoformat(manifest["createdAt"].replace("Z", "+00:00"))
    listed = {entry["path"]: entry for entry in manifest["files"]}
    assert set(listed) == DIFFUSERS_FILES | STATE_FILES | {"model.safetensors"}
    for path, entry in listed.items():
        data = (folder / path).read_bytes()
        assert entry["size"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()


def test_progress_json_reports_success(run: dict[str, Any]) -> None:
    output = run["output"]
    progress = read_json(output / "progress.json")
    assert progress["phase"] == "Succeeded"
    assert (progress["step"], progress["totalSteps"]) == (4, 4)
    assert (progress["epoch"], progress["totalEpochs"]) == (1, 1)
    assert progress["worldSize"] == 1
    assert progress["lastCheckpoint"] == str(output / "checkpoints/step-4")
    assert progress["checkpoints"] == [
        str(output / "checkpoints/step-2"),
        str(output / "checkpoints/step-4"),
    ]
    assert progress["lastSamples"] == str(output / "samples/step-4")
    assert 0 < progress["loss"] < 10
    assert progress["imagesPerSecond"] > 0
    assert progress["learningRate"] == pytest.approx(1e-4)
    assert progress["job"] == "tiny-test"
    datetime.fromisoformat(progress["updatedAt"].replace("Z", "+00:00"))
    assert not (output / "lease.json").exists()


def test_samples_written_per_prompt_with_contact_sheet(run: dict[str, Any]) -> None:
    folder = run["output"] / "samples/step-4"
    assert sorted(p.name for p in folder.iterdir()) == [
        "0.png",
        "1.png",
        "contact-sheet.png",
        "prompts.json",
    ]
    with Image.open(folder / "0.png") as image:
        assert image.size == (64, 64)
    with Image.open(folder / "contact-sheet.png") as sheet:
        assert sheet.size == (128, 64)
    assert read_json(folder / "prompts.json") == {"0": "a photo of thing 1", "1": "a red square"}


def test_exported_unet_is_the_ema_and_state_keeps_raw_weights(run: dict[str, Any]) -> None:
    folder = run["output"] / "checkpoints/step-4"
    exported = load_file(folder / "unet/diffusion_pytorch_model.safetensors")
    ema = load_file(folder / "training_state/ema_unet.safetensors")
    raw = load_file(folder / "training_state/unet.safetensors")
    assert all(torch.equal(exported[k], ema[k]) for k in ema)
    assert any(not torch.equal(raw[k], ema[k]) for k in ema)


def test_diffusers_folder_loads_and_generates(run: dict[str, Any]) -> None:
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(run["output"] / "checkpoints/step-4")
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(
        "a red square",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)
    assert any(low < high for low, high in image.getextrema())


def test_single_file_loads_offline_with_the_trained_weights(
    run: dict[str, Any], trainer_env: dict[str, str]
) -> None:
    from diffusers import StableDiffusionPipeline

    from kubedream_trainer.tiny import tiny_model_dir

    folder = run["output"] / "checkpoints/step-4"
    exported = load_file(folder / "unet/diffusion_pytorch_model.safetensors")
    for config in (
        folder,
        tiny_model_dir("sd1"),
    ):  # the base config proves the weights come from the file
        pipeline = StableDiffusionPipeline.from_single_file(
            str(folder / "model.safetensors"), config=str(config), local_files_only=True
        )
        loaded = pipeline.unet.state_dict()
        assert all(torch.equal(loaded[k], exported[k]) for k in exported)
    keys = set(load_file(folder / "model.safetensors"))
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.decoder.up.0.block.0.conv1.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys


def test_finished_job_started_again_exits_zero_without_training(
    run: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import kubedream_trainer.loop as loop

    def must_not_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished job must not load the model again")

    monkeypatch.setattr(loop, "load_components", must_not_load)
    before = read_json(run["output"] / "checkpoints/step-4/checkpoint.json")
    assert train(run["job"]) == 0
    assert committed_steps(run["output"]) == [2, 4]
    assert read_json(run["output"] / "checkpoints/step-4/checkpoint.json") == before
    progress = read_json(run["output"] / "progress.json")
    assert (progress["phase"], progress["step"]) == ("Succeeded", 4)
    assert "already finished" in progress["message"]


def test_what_the_run_said_is_kept_in_the_output(run: dict[str, Any]) -> None:
    logs = list((run["output"] / "logs").iterdir())  # one per run (other tests start it again)
    assert logs
    assert all(log.suffix == ".log" and "-rank0-" in log.name for log in logs)
    said = [log.read_text() for log in logs]
    assert any("checkpoint committed" in text and "finished 4 steps" in text for text in said)
