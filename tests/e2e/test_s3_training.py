"""Training with everything in S3 (the bed's MinIO): the data root, the base model (the tiny
pipeline uploaded as a diffusers folder) and the output (checkpoints, samples, progress,
dataset manifest, cached latents). A run stopped at step 3 and resumed from its S3
checkpoint ends bit-identical to a straight run, without scanning, downloading the model or
encoding latents again; wrong credentials, a missing bucket and missing data or model
prefixes fail at start naming the field, endpoint, bucket and key."""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open

from kubedream_operator.devbed.bed import BedInfo
from kubedream_trainer import latent_store
from kubedream_trainer.errors import ExitCode
from kubedream_trainer.tiny import tiny_model_dir

pytestmark = [pytest.mark.testbed, pytest.mark.slow, pytest.mark.timeout(300)]

CORE_FILES = {
    "model_index.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "model.safetensors",
    "training_state/unet.safetensors",
    "training_state/optimizer.pt",
    "training_state/trainer.pt",
}


def make_images(folder: Path, count: int = 8, size: tuple[int, int] = (64, 64)) -> Path:
    """`count` coloured images with a diagonal, each with a caption sidecar."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for i in range(count):
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        image = Image.new("RGB", size, colour)
        for x in range(size[0]):
            image.putpixel((x, x % size[1]), (255 - colour[0], x * 4 % 256, 0))
        image.save(folder / f"image{i}.png")
        (folder / f"image{i}.txt").write_text(f"a photo of thing {i}, colour {colour[0]}")
    return folder


def upload_tree(s3: Any, local: Path, bucket: str, prefix: str) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")


def keys(s3: Any, bucket: str, prefix: str) -> list[str]:
    """Keys under `prefix`/, relative to it."""
    found = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
        found += [obj["Key"][len(prefix) + 1 :] for obj in page.get("Contents", [])]
    return found


def read_json(s3: Any, bucket: str, key: str) -> Any:
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def committed(s3: Any, bucket: str, output: str) -> list[int]:
    return sorted(
        int(key.split("/")[1].removeprefix("step-"))
        for key in keys(s3, bucket, output)
        if key.startswith("checkpoints/") and key.endswith("/checkpoint.json")
    )


class World:
    """A bucket holding the data root and the tiny model, and how to run jobs against it."""

    def __init__(self, bed: BedInfo, bucket: str, tmp: Path) -> None:
        self.bed = bed
        self.s3 = bed.s3_client()
        self.bucket = bucket
        self.tmp = tmp
        self.model_cache = tmp / "trainer-cache"

    def spec(self, out: str, **override: Any) -> dict[str, Any]:
        """A job on the tiny S3 model and S3 data writing to s3://bucket/`out`, with each
        top-level section of `override` merged into the defaults."""
        spec: dict[str, Any] = {
            "model": {"base": f"s3://{self.bucket}/models/tiny-sd1"},
            "data": {
                "roots": [{"uri": f"s3://{self.bucket}/data"}],
                "resolution": 64,
                "loaderWorkers": 2,
                "condDropout": 0.1,
                "flipP": 0.0,  # one latent per image: which ones a resume reads is certain
            },
            "training": {
                "maxSteps": 4,
                "batchSize": 2,
                "unetLearningRate": 1e-4,
                "seed": 7,
                "cacheLatents": True,
                "ema": {"decay": 0.9},
            },
            "output": {"uri": f"s3://{self.bucket}/{out}", "progressEverySteps": 1},
            "storage": {
                "endpoint": self.bed.s3_endpoint,
                "region": self.bed.s3_region,
                "addressingStyle": "path",
            },
        }
        for section, values in override.items():
            spec[section] = {**spec.get(section, {}), **values}
        return spec

    def train(self, name: str, spec: dict[str, Any]) -> int:
        """`kubedream train` in this process; returns the exit code."""
        from kubedream_trainer.train_cli import run

        job = self.tmp / f"{name}-{uuid.uuid4().hex[:6]}.yaml"
        manifest = {
            "apiVersion": "kubedream.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": name},
            "spec": copy.deepcopy(spec),
        }
        job.write_text(yaml.safe_dump(manifest))
        return run(argparse.Namespace(job=str(job), device="cpu"))

    def download(self, prefix: str, into: Path) -> Path:
        for key in keys(self.s3, self.bucket, prefix):
            target = into / key
            target.parent.mkdir(parents=True, exist_ok=True)
            self.s3.download_file(self.bucket, f"{prefix}/{key}", str(target))
        return into


@pytest.fixture(scope="module")
def world(bed: BedInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("s3-training")
    bucket = f"e2e-{uuid.uuid4().hex[:10]}"
    s3 = bed.s3_client()
    s3.create_bucket(Bucket=bucket)
    upload_tree(s3, make_images(tmp / "data"), bucket, "data")
    upload_tree(s3, tiny_model_dir("sd1", cache_dir=tmp / "build"), bucket, "models/tiny-sd1")
    env = {
        **{k: v for k, v in bed.env.items() if k.startswith("AWS_")},
        "HF_HUB_OFFLINE": "1",
        "KUBEDREAM_CACHE_DIR": str(tmp / "trainer-cache"),
        "KUBEDREAM_LEASE_TTL": "30",
        "KUBEDREAM_LEASE_WAIT": "0",
        "KUBEDREAM_STAGING_DIR": str(tmp / "staging"),
    }
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        patch.delenv("AWS_ENDPOINT_URL", raising=False)  # spec.storage must be enough
        torch.set_num_threads(1)
        yield World(bed, bucket, tmp)
    torch.set_num_threads(threads)


STEPS_3 = {"maxSteps": 3}
STEPS_8 = {"maxSteps": 8}
SAVES = {"saveEverySteps": 2, "keepLast": 5}


@pytest.fixture(scope="module")
def runs(world: World) -> dict[str, Any]:
    """Straight to step 8 (two epochs of 8 images in batches of 2); and to step 3, then
    resumed to 8 (counting what the resume did)."""
    codes = {"straight": world.train("straight", world.spec("runs/straight", training=STEPS_8))}
    codes["first"] = world.train(
        "resumed", world.spec("runs/resumed", training=STEPS_3, output=SAVES)
    )
    models = sorted((world.model_cache / "models").iterdir())
    model_mtime = [m.stat().st_mtime_ns for m in models]
    latents_before = keys(world.s3, world.bucket, "runs/resumed/cache/latents")

    loaded: list[int] = []
    real_get = latent_store.LatentStore.get

    def counting_get(self: latent_store.LatentStore, key: Any) -> Any:
        value = real_get(self, key)
        loaded.append(value is not None)
        return value

    stderr = io.StringIO()
    with (
        pytest.MonkeyPatch.context() as patch,
        _captured_logs() as logs,
        contextlib.redirect_stderr(stderr),
    ):
        patch.setattr(latent_store.LatentStore, "get", counting_get)
        codes["resumed"] = world.train(
            "resumed", world.spec("runs/resumed", training=STEPS_8, output=SAVES)
        )
    return {
        "codes": codes,
        "models": models,
        "model_mtime": model_mtime,
        "latents_before": latents_before,
        "latents_after": keys(world.s3, world.bucket, "runs/resumed/cache/latents"),
        "loaded": loaded,
        "logs": logs,
        "stderr": stderr.getvalue(),
    }


class _captured_logs:
    """Collect INFO records of the trainer's loggers."""

    def __enter__(self) -> list[str]:
        self.records: list[str] = []
        self.handler = logging.Handler()
        self.handler.emit = lambda record: self.records.append(record.getMessage())  # type: ignore[method-assign]
        self.logger = logging.getLogger("kubedream_trainer")
        self.level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self.handler)
        return self.records

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)


def test_every_run_succeeds(runs: dict[str, Any]) -> None:
    assert runs["codes"] == {"straight": 0, "first": 0, "resumed": 0}


def test_checkpoints_samples_and_progress_are_in_s3(world: World, runs: dict[str, Any]) -> None:
    s3, bucket = world.s3, world.bucket
    assert committed(s3, bucket, "runs/straight") == [8]
    assert committed(s3, bucket, "runs/resumed") == [2, 3, 4, 6, 8]
    listed = {
        key: obj
        for key, obj in (
            (o["Key"].removeprefix("runs/resumed/checkpoints/step-8/"), o)
            for page in s3.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix="runs/resumed/checkpoints/step-8/"
            )
            for o in page["Contents"]
        )
    }
    manifest = read_json(s3, bucket, "runs/resumed/checkpoints/step-8/checkpoint.json")
    assert {f["path"] for f in manifest["files"]} >= CORE_FILES
    assert set(listed) == {f["path"] for f in manifest["files"]} | {"checkpoint.json"}
    for entry in manifest["files"]:
        assert listed[entry["path"]]["Size"] == entry["size"], entry["path"]
    progress = read_json(s3, bucket, "runs/resumed/progress.json")
    assert (progress["phase"], progress["step"]) == ("Succeeded", 8)
    assert progress["lastCheckpoint"] == f"s3://{bucket}/runs/resumed/checkpoints/step-8"
    assert progress["checkpoints"] == [
        f"s3://{bucket}/runs/resumed/checkpoints/step-{n}" for n in (2, 3, 4, 6, 8)
    ]
    logs = sorted(k for k in keys(s3, bucket, "runs/resumed") if k.startswith("logs/"))
    assert len(logs) >= 2, logs  # one per run (the first run, then the resume)
    said = [
        s3.get_object(Bucket=bucket, Key=f"runs/resumed/{k}")["Body"].read().decode() for k in logs
    ]
    assert any("checkpoint committed" in text for text in said)
    root = keys(s3, bucket, "runs/resumed")
    assert "lease.json" not in root
    assert "dataset-manifest.json" in root


def test_samples_are_written_to_s3(world: World) -> None:
    spec = world.spec(
        "runs/samples",
        training={"maxSteps": 1, "cacheLatents": False},
        samples={"prompts": ["a red square"], "steps": 2},
    )
    assert world.train("samples", spec) == 0
    assert sorted(keys(world.s3, world.bucket, "runs/samples/samples")) == [
        "step-1/0.png",
        "step-1/contact-sheet.png",
        "step-1/prompts.json",
    ]
    progress = read_json(world.s3, world.bucket, "runs/samples/progress.json")
    assert progress["lastSamples"] == f"s3://{world.bucket}/runs/samples/samples/step-1"


def test_the_resumed_run_is_bit_identical_to_the_straight_one(
    world: World, runs: dict[str, Any]
) -> None:
    straight = world.download("runs/straight/checkpoints/step-8", world.tmp / "cmp/straight")
    resumed = world.download("runs/resumed/checkpoints/step-8", world.tmp / "cmp/resumed")
    files = [f["path"] for f in json.loads((straight / "checkpoint.json").read_text())["files"]]
    for name in files:
        a, b = straight / name, resumed / name
        if name.endswith(".safetensors"):
            with safe_open(str(a), "pt") as x, safe_open(str(b), "pt") as y:
                assert sorted(x.keys()) == sorted(y.keys()), name
                for key in x.keys():
                    assert torch.equal(x.get_tensor(key), y.get_tensor(key)), f"{name}:{key}"
        elif name.endswith(".pt"):
            _assert_same(torch.load(a, weights_only=True), torch.load(b, weights_only=True), name)
        else:
            assert a.read_bytes() == b.read_bytes(), name


def _assert_same(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict), where
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple), where
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_the_resume_reused_the_scan_the_model_and_the_latents(
    world: World, runs: dict[str, Any]
) -> None:
    resumed_from = f"resuming from s3://{world.bucket}/runs/resumed/checkpoints/step-3"
    assert resumed_from in runs["stderr"]
    assert any("data roots unchanged since the last scan" in m for m in runs["logs"])
    models = sorted((world.model_cache / "models").iterdir())
    assert models == runs["models"], "one cache entry for one unchanged model"
    assert [m.stat().st_mtime_ns for m in models] == runs["model_mtime"]
    assert (models[0] / "model_index.json").is_file()
    # Steps 1-3 encoded 6 images; the resume encodes the last 2 of epoch 1 (step 4) and
    # reads the first run's 6 back from S3 in epoch 2, instead of encoding them again.
    assert len(runs["latents_before"]) == 6
    assert runs["loaded"] == [False, False] + [True] * 6
    assert set(runs["latents_before"]) < set(runs["latents_after"])
    assert len(runs["latents_after"]) == 8


def test_a_checkpoint_in_s3_is_a_base_model(world: World, runs: dict[str, Any]) -> None:
    """A KubeDream checkpoint folder (diffusers + training_state) as spec.model.base: only the
    diffusers parts are downloaded."""
    base = f"s3://{world.bucket}/runs/straight/checkpoints/step-8"
    spec = world.spec("runs/from-checkpoint", model={"base": base}, training={"maxSteps": 1})
    assert world.train("from-checkpoint", spec) == 0
    entries = sorted((world.model_cache / "models").iterdir())
    assert len(entries) == 2
    new = next(e for e in entries if e not in runs["models"])
    source = json.loads((new / ".kubedream-source.json").read_text())
    assert source["uri"] == base
    fetched = {f[0] for f in source["files"]}
    assert "unet/diffusion_pytorch_model.safetensors" in fetched
    assert not {f for f in fetched if f.startswith("training_state/") or f == "model.safetensors"}


def _failure(world: World, spec: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    started = time.monotonic()
    assert world.train("broken", spec) == ExitCode.INVALID_JOB
    assert time.monotonic() - started < 60
    return " ".join(capsys.readouterr().err.split())


def test_wrong_credentials_fail_at_start_naming_endpoint_and_bucket(
    world: World, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    err = _failure(world, world.spec("runs/denied"), capsys)
    assert f"spec.output.uri: cannot access s3://{world.bucket}/runs/denied" in err
    assert f"(endpoint {world.bed.s3_endpoint})" in err
    assert "access denied" in err
    assert "AWS_SECRET_ACCESS_KEY" in err


def test_a_missing_output_bucket_fails_at_start(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = world.spec("x")
    spec["output"]["uri"] = "s3://no-such-bucket-e2e/runs/job"
    err = _failure(world, spec, capsys)
    assert "spec.output.uri: bucket 'no-such-bucket-e2e' does not exist" in err
    assert world.bed.s3_endpoint in err


def test_missing_data_and_model_prefixes_are_reported_together_before_any_model_work(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = world.spec("runs/missing", model={"base": f"s3://{world.bucket}/models/none"})
    spec["data"]["roots"] = [
        {"uri": f"s3://{world.bucket}/data"},
        {"uri": f"s3://{world.bucket}/no-such-data"},
        {"uri": "s3://no-such-bucket-e2e/data"},
    ]
    cached_models = sorted((world.model_cache / "models").iterdir())
    err = _failure(world, spec, capsys)
    endpoint = world.bed.s3_endpoint
    assert f"spec.data.roots[1].uri: nothing found at s3://{world.bucket}/no-such-data (endpoint {endpoint})" in err  # fmt: skip
    assert "spec.data.roots[2].uri: bucket 'no-such-bucket-e2e' does not exist" in err
    assert f"spec.model.base: nothing found at s3://{world.bucket}/models/none/model_index.json" in err  # fmt: skip
    assert "spec.data.roots[0]" not in err
    progress = read_json(world.s3, world.bucket, "runs/missing/progress.json")
    assert progress["phase"] == "Failed"
    assert "spec.data.roots[1].uri" in progress["message"]
    assert sorted((world.model_cache / "models").iterdir()) == cached_models
    assert os.environ.get("AWS_ENDPOINT_URL") is None
