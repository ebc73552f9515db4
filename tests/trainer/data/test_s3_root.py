"""An s3:// data root on the test bed's real MinIO scans, loads and inspects exactly like the
same tree in a local folder: the data layer uses only the Storage interface."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from kubedream_operator.devbed.bed import BedInfo
from kubedream_operator.spec import DataRoot, DataSpec, StorageSpec
from kubedream_trainer.data import Dataset, plan_epoch, scan_roots
from kubedream_trainer.data.loader import BatchLoader

from .helpers import write_image, write_split_image, write_text

pytestmark = [pytest.mark.testbed, pytest.mark.timeout(120)]


def _make_tree(root: Path) -> None:
    write_split_image(root / "a_1.png", (160, 96), (255, 0, 0), (0, 0, 255))
    write_image(root / "b.jpg", (96, 160), (10, 200, 10))
    write_text(root / "b.txt", "b from a sidecar")
    write_text(root / "global.yaml", "flip_p: 0.5\n")
    for i in range(6):
        write_image(root / "pres" / f"p{i}.png", (100, 100), (i * 40, 0, 0))
    write_text(root / "pres" / "multiply.txt", "0.5")
    write_text(root / "bad.png", b"not a png")
    # A big ICC profile pushes the JPEG frame header past the ranged read: full-read fallback.
    Image.new("RGB", (120, 60), (9, 9, 9)).save(root / "icc_1.jpg", icc_profile=b"\0" * 100_000)


@pytest.fixture
def roots(
    bed: BedInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, str, StorageSpec]]:
    """(local root, s3:// root, storage settings) holding the same files."""
    local = tmp_path / "tree"
    _make_tree(local)
    s3: Any = bed.s3_client()
    bucket = f"data-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        s3.put_object(
            Bucket=bucket,
            Key=f"roots/main/{path.relative_to(local).as_posix()}",
            Body=path.read_bytes(),
        )
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", bed.s3_access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", bed.s3_secret_key)
    settings = StorageSpec(endpoint=bed.s3_endpoint, region=bed.s3_region, addressing_style="path")
    yield str(local), f"s3://{bucket}/roots/main", settings
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=obj["Key"])
    s3.delete_bucket(Bucket=bucket)


def _comparable(dataset: Dataset, uri: str) -> tuple[object, ...]:
    images = tuple(replace(image, root_uri="ROOT", etag="") for image in dataset.images)
    problems = tuple((p.path.replace(uri, "ROOT"), p.problem) for p in dataset.problems)
    return images, problems, tuple(replace(f, root_uri="ROOT") for f in dataset.folders)


def test_s3_root_scans_like_the_local_folder(roots: tuple[str, str, StorageSpec]) -> None:
    local_uri, s3_uri, settings = roots
    local = scan_roots([DataRoot(uri=local_uri)], 128)
    remote = scan_roots([DataRoot(uri=s3_uri)], 128, storage_settings=settings, workers=8)
    assert _comparable(remote, s3_uri) == _comparable(local, local_uri)
    assert len(remote.images) == 9
    assert {image.key: image.caption for image in remote.images}["b.jpg"] == "b from a sidecar"
    assert [(p.path, p.problem.split(":")[0]) for p in remote.problems] == [
        (f"{s3_uri}/bad.png", "skipped")
    ]
    assert all(image.etag for image in remote.images)


def test_s3_root_loads_the_same_pixels(roots: tuple[str, str, StorageSpec]) -> None:
    local_uri, s3_uri, settings = roots
    local = scan_roots([DataRoot(uri=local_uri)], 128)
    remote = scan_roots([DataRoot(uri=s3_uri)], 128, storage_settings=settings)
    batches = plan_epoch(local, 0, seed=3, batch_size=2)
    assert plan_epoch(remote, 0, seed=3, batch_size=2) == batches
    spec = DataSpec(roots=[DataRoot(uri=s3_uri)], resolution=128)
    common: dict[str, Any] = {"data_spec": spec, "seed": 3, "epoch": 0, "workers": 3}
    for a, b in zip(
        BatchLoader(local, batches, **common),
        BatchLoader(remote, batches, storage_settings=settings, **common),
        strict=True,
    ):
        assert torch.equal(a.pixel_values, b.pixel_values)
        assert (a.captions, a.flipped) == (b.captions, b.flipped)


def test_inspect_an_s3_root_from_the_command_line(
    roots: tuple[str, str, StorageSpec], bed: BedInfo
) -> None:
    _, s3_uri, _ = roots
    env = {**os.environ, "AWS_ENDPOINT_URL": bed.s3_endpoint, "AWS_DEFAULT_REGION": bed.s3_region}
    command = Path(sys.executable).with_name("kubedream")
    result = subprocess.run(
        [
            str(command),
            "dataset",
            "inspect",
            s3_uri,
            "--json",
            "--resolution",
            "128",
            "--epochs",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["images"] == 9
    assert [(f["path"], f["per_epoch"]) for f in report["folders"]] == [(".", 3), ("pres", 3)]
    assert report["epochs"] == [6, 6]
    missing = subprocess.run(
        [str(command), "dataset", "inspect", f"{s3_uri}-nothing-here"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 2
    assert "no files found" in missing.stderr
