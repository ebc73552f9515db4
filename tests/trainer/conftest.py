"""Fixtures for the trainer tests: an offline environment with a session-local tiny model
cache, small generated data roots, FineTuneJob files, and in-process training runs.

Nothing is downloaded (HF_HUB_OFFLINE=1). torch runs single-threaded: the tiny models are
faster that way, and CI machines are shared. The data layer's own tests (tests/trainer/data)
use none of these fixtures.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def trainer_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Offline, single-threaded, with tiny models built into a session folder. Yields the
    environment subprocesses should get."""
    import torch

    cache = tmp_path_factory.mktemp("kubedream-cache")
    values = {
        "HF_HUB_OFFLINE": "1",
        "KUBEDREAM_CACHE_DIR": str(cache),
        "OMP_NUM_THREADS": "1",
        "KUBEDREAM_LEASE_TTL": "30",
        "KUBEDREAM_LEASE_WAIT": "0",
    }
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in values.items():
            patch.setenv(key, value)
        torch.set_num_threads(1)
        yield {**os.environ, **values}
    torch.set_num_threads(threads)


def make_root(
    folder: Path, count: int = 8, size: tuple[int, int] = (64, 64), seed: int = 0
) -> Path:
    """`count` flat-colour images with a gradient, each with a caption sidecar."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        image = Image.new("RGB", size, colour)
        for x in range(size[0]):
            image.putpixel((x, x % size[1]), (255 - colour[0], x * 4 % 256, 0))
        image.save(folder / f"image{i}.png")
        (folder / f"image{i}.txt").write_text(f"a photo of thing {i}, colour {colour[0]}")
    return folder


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    return make_root(tmp_path / "data")


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def write_job(
    path: Path, root: Path, out: Path, /, *, name: str = "tiny-test", **spec: Any
) -> Path:
    """A FineTuneJob YAML: tiny model, data `root`, output `out`, 64px, batch 2, 4 steps,
    deep-merged with the `spec` overrides (camelCase, as in YAML)."""
    base = {
        "model": {"base": "tiny"},
        "data": {
            "roots": [{"uri": str(root)}],
            "resolution": 64,
            "loaderWorkers": 0,
            "condDropout": 0.1,
        },
        "training": {"maxSteps": 4, "batchSize": 2, "unetLearningRate": 1e-4, "seed": 7},
        "output": {"uri": str(out), "progressEverySteps": 1},
    }
    manifest = {
        "apiVersion": "kubedream.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": deep_merge(base, spec),
    }
    path.write_text(yaml.safe_dump(manifest))
    return path


def train(job: Path, device: str = "cpu") -> int:
    """`kubedream train JOB --device cpu`, in this process. accelerate keeps its state in a
    process-wide singleton that one real run never changes; reset it between runs here."""
    from accelerate.state import AcceleratorState

    from kubedream_trainer.train_cli import run

    AcceleratorState._reset_state(reset_partial_state=True)
    return run(argparse.Namespace(job=str(job), device=device))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def committed_steps(output: Path) -> list[int]:
    """Steps with a checkpoint.json, ascending."""
    return sorted(
        int(p.parent.name.removeprefix("step-"))
        for p in output.glob("checkpoints/step-*/checkpoint.json")
    )
