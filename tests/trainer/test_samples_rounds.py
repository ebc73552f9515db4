"""Samples every N steps: a 4-step run with `everySteps: 2` renders a round at steps 2 and 4,
each with one PNG per prompt, a contact sheet and the prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from .conftest import read_json, train, write_job

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("trainer_env")]

PROMPTS = ["a photo of a cat", "a photo of a dog"]


def test_samples_render_every_n_steps(tmp_path: Path, data_root: Path) -> None:
    output = tmp_path / "out"
    job = write_job(
        tmp_path / "job.yaml",
        data_root,
        output,
        samples={"prompts": PROMPTS, "steps": 2, "everySteps": 2},
    )
    assert train(job) == 0
    rounds = sorted(p.name for p in (output / "samples").iterdir())
    assert rounds == ["step-2", "step-4"]
    for name in rounds:
        folder = output / "samples" / name
        pngs = sorted(p.name for p in folder.glob("*.png"))
        assert pngs == ["0.png", "1.png", "contact-sheet.png"], name
        for i in range(len(PROMPTS)):
            with Image.open(folder / f"{i}.png") as image:
                assert image.size == (64, 64)
        with Image.open(folder / "contact-sheet.png") as sheet:
            assert sheet.size == (64 * len(PROMPTS), 64)
        assert read_json(folder / "prompts.json") == {str(i): p for i, p in enumerate(PROMPTS)}
