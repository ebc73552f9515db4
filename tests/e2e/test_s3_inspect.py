"""`kubedream dataset inspect` gives the same answer for a tree in S3 as for the same tree on
local disk: the JSON report and the printed table, with one root and with two, once the root
URIs are swapped. The tree has every kind of file the scanner reads: captions of each kind,
settings files, nested folders, a corrupt image, an image whose header lies past the ranged
read, more objects than one listing page holds (the pages are made small), and a hidden
folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from kubedream_operator.devbed.bed import BedInfo

pytestmark = [pytest.mark.testbed, pytest.mark.timeout(180)]

KUBEDREAM = Path(sys.executable).with_name("kubedream")


def _write(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def _image(path: Path, size: tuple[int, int], colour: tuple[int, int, int], **save: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, **save)


def make_tree(root: Path) -> Path:
    for i in range(30):  # more than a page of 25 objects with the captions
        _image(root / "people" / f"person_{i:02d}.jpg", (96 + i * 4, 128), (i * 8, 20, 20))
        if i % 3 == 0:
            _write(root / "people" / f"person_{i:02d}.txt", f"person {i}, smiling")
    _write(root / "people" / "person_01.yaml", "main_prompt: a yaml caption\ntags: [red, blue]\n")
    _write(root / "people" / "person_02.caption", "a caption file")
    _write(root / "people" / "multiply.txt", "0.5")
    _write(root / "global.yaml", "flip_p: 0.25\ncaption: fallback from global\n")
    _image(root / "styles" / "oil" / "canvas.png", (200, 100), (1, 2, 3))
    _write(root / "styles" / "oil" / "local.yaml", "multiply: 3\nbatch_id: oil\n")
    _write(root / "styles" / "oil" / "flip_p.txt", "not a number")
    _image(root / "styles" / "ink_1.webp", (64, 64), (9, 9, 9))  # undersized
    _write(root / "styles" / "broken.png", b"\x89PNG but not really")
    Image.new("RGB", (300, 150), (5, 5, 5)).save(root / "icc_big.jpg", icc_profile=b"\0" * 90_000)
    _image(root / ".hidden" / "skip.jpg", (128, 128), (0, 0, 0))
    return root


def inspect(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(KUBEDREAM), "dataset", "inspect", *args, "--resolution", "128", "--epochs", "3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def trees(bed: BedInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """Two local trees, the same trees in a bucket, and the environment to inspect them with."""
    tmp = tmp_path_factory.mktemp("inspect")
    local = [make_tree(tmp / "a"), make_tree(tmp / "b")]
    _write(local[1] / "extra" / "only_in_b.txt", "b's own caption")
    _image(local[1] / "extra" / "only_in_b.png", (128, 128), (7, 7, 7))
    s3 = bed.s3_client()
    bucket = f"inspect-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    for name, root in zip("ab", local, strict=True):
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            s3.upload_file(str(path), bucket, f"roots/{name}/{path.relative_to(root).as_posix()}")
    env = {
        **os.environ,
        **{k: v for k, v in bed.env.items() if k.startswith("AWS_")},
        "KUBEDREAM_S3_LIST_PAGE_SIZE": "25",
    }
    yield {
        "local": [str(p) for p in local],
        "s3": [f"s3://{bucket}/roots/a", f"s3://{bucket}/roots/b"],
        "env": env,
    }
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=obj["Key"])
    s3.delete_bucket(Bucket=bucket)


def _swap(text: str, ours: list[str], theirs: list[str]) -> str:
    for mine, other in zip(ours, theirs, strict=True):
        text = text.replace(mine, other)
    return text


@pytest.mark.parametrize("count", [1, 2])
def test_json_reports_are_identical(trees: dict[str, object], count: int) -> None:
    local, remote = trees["local"][:count], trees["s3"][:count]  # type: ignore[index]
    env = trees["env"]
    here = inspect(env, *local, "--json")  # type: ignore[arg-type]
    there = inspect(env, *remote, "--json")  # type: ignore[arg-type]
    assert here.returncode == there.returncode == 0, there.stderr
    local_report = json.loads(here.stdout)
    assert local_report["images"] >= 30 * count
    assert local_report["problems"], "the tree has problems to report"
    assert json.loads(_swap(there.stdout, remote, local)) == local_report


@pytest.mark.parametrize("count", [1, 2])
def test_printed_reports_are_identical(trees: dict[str, object], count: int) -> None:
    local, remote = trees["local"][:count], trees["s3"][:count]  # type: ignore[index]
    env = trees["env"]
    here = inspect(env, *local)  # type: ignore[arg-type]
    there = inspect(env, *remote)  # type: ignore[arg-type]
    assert here.returncode == there.returncode == 0, there.stderr
    assert _swap(there.stdout, remote, local) == here.stdout
    assert "broken.png" in here.stdout
    assert ".hidden" not in here.stdout
