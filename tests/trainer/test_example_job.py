"""The README's demo job (examples/tiny-job.yaml): valid, its data plans the expected epochs,
and one epoch of it trains end to end with samples."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from PIL import Image

from kubedream_operator.spec import load_job
from kubedream_trainer.epochs import build_schedule, load_dataset

from .conftest import REPO, committed_steps, read_json, train

EXAMPLE = REPO / "examples" / "tiny-job.yaml"


def test_the_demo_job_is_valid_and_plans_five_epochs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the roots are relative to the repository, like `make demo`
    job = load_job(EXAMPLE)
    assert job.spec.model.base == "tiny"
    assert job.spec.output.uri == "./runs/tiny"
    assert len(job.spec.samples.prompts) == 2
    schedule = build_schedule(load_dataset(job.spec), job.spec, world_size=1)
    assert (schedule.total_epochs, schedule.total_steps) == (5, 35)


@pytest.mark.slow
@pytest.mark.usefixtures("trainer_env")
def test_one_epoch_of_the_demo_trains_and_renders_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["spec"]["training"]["epochs"] = 1
    manifest["spec"]["samples"]["steps"] = 2
    manifest["spec"]["output"]["uri"] = str(tmp_path / "out")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(manifest))
    assert train(job) == 0
    assert committed_steps(tmp_path / "out") == [7]
    progress = read_json(tmp_path / "out/progress.json")
    assert (progress["phase"], progress["step"], progress["epoch"]) == ("Succeeded", 7, 1)
    with Image.open(tmp_path / "out/samples/step-7/contact-sheet.png") as sheet:
        assert sheet.size == (256, 128)
