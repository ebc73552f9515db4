"""The cached scan (data.manifest): an unchanged listing reuses dataset-manifest.json, any
change to a file, a root or the resolution scans again; on local folders and on MinIO."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kubedream_operator.devbed.bed import BedInfo
from kubedream_operator.spec import DataRoot, StorageSpec
from kubedream_trainer.data import manifest, scan_roots
from kubedream_trainer.data.manifest import MANIFEST_KEY, scan_roots_cached
from kubedream_trainer.storage import open_storage
from tests.trainer.data.helpers import write_image, write_text


def _tree(root: Path) -> Path:
    for i in range(4):
        write_image(root / "cats" / f"c{i}.png", (96 + 16 * i, 96), (i * 50, 10, 10))
        write_text(root / "cats" / f"c{i}.txt", f"cat {i}")
    write_image(root / "dogs" / "d_1.jpg", (128, 64), (1, 2, 3))
    write_text(root / "dogs" / "multiply.txt", "2")
    write_text(root / "broken.png", b"not an image")
    return root


@pytest.fixture
def scans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the real scans behind scan_roots_cached."""
    counted: list[int] = []

    def counting(*args: Any, **kwargs: Any) -> Any:
        counted.append(1)
        return scan_roots(*args, **kwargs)

    monkeypatch.setattr(manifest, "scan_roots", counting)
    return counted


def test_an_unchanged_local_root_is_not_scanned_again(tmp_path: Path, scans: list[int]) -> None:
    roots = [DataRoot(uri=str(_tree(tmp_path / "data")))]
    out = open_storage(str(tmp_path / "out"))
    first, reused = scan_roots_cached(roots, 128, cache=out)
    assert (reused, len(scans)) == (False, 1)
    assert first == scan_roots(roots, 128)
    doc = json.loads((tmp_path / "out" / MANIFEST_KEY).read_text())
    assert doc["fingerprint"].startswith("sha256:")
    assert [entry[0] for entry in doc["roots"][0]["listing"]][:2] == ["broken.png", "cats/c0.png"]
    assert {image["key"]: image["caption"] for image in doc["images"]}["cats/c2.png"] == "cat 2"
    assert doc["problems"][0]["path"].endswith("broken.png")
    second, reused = scan_roots_cached(roots, 128, cache=out)
    assert (reused, len(scans)) == (True, 1)
    assert second == first


@pytest.mark.parametrize(
    "change", ["caption", "image", "multiply", "root multiplier", "resolution"]
)
def test_any_change_scans_again(tmp_path: Path, scans: list[int], change: str) -> None:
    data = _tree(tmp_path / "data")
    roots = [DataRoot(uri=str(data))]
    out = open_storage(str(tmp_path / "out"))
    before, _ = scan_roots_cached(roots, 128, cache=out)
    resolution = 128
    if change == "caption":
        write_text(data / "cats" / "c1.txt", "a different cat, longer")
    elif change == "image":
        write_image(data / "cats" / "c9.png", (100, 100))
    elif change == "multiply":
        write_text(data / "dogs" / "multiply.txt", "3")
    elif change == "root multiplier":
        roots = [DataRoot(uri=str(data), multiplier=0.5)]
    else:
        resolution = 192
    after, reused = scan_roots_cached(roots, resolution, cache=out)
    assert not reused
    assert len(scans) == 2
    assert after == scan_roots(roots, resolution)
    assert after != before
    again, reused = scan_roots_cached(roots, resolution, cache=out)
    assert reused
    assert again == after


def test_a_damaged_manifest_costs_only_a_scan(tmp_path: Path, scans: list[int]) -> None:
    roots = [DataRoot(uri=str(_tree(tmp_path / "data")))]
    out = open_storage(str(tmp_path / "out"))
    first, _ = scan_roots_cached(roots, 128, cache=out)
    path = tmp_path / "out" / MANIFEST_KEY
    doc = json.loads(path.read_text())
    del doc["images"][0]["caption"]
    path.write_text(json.dumps(doc))
    second, reused = scan_roots_cached(roots, 128, cache=out)
    assert not reused
    assert second == first
    path.write_text("{not json")
    assert scan_roots_cached(roots, 128, cache=out) == (first, False)
    assert scan_roots_cached(roots, 128, cache=out) == (first, True)
    assert len(scans) == 3


def test_without_write_nothing_is_saved(tmp_path: Path) -> None:
    roots = [DataRoot(uri=str(_tree(tmp_path / "data")))]
    out = open_storage(str(tmp_path / "out"))
    scan_roots_cached(roots, 128, cache=out, write=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.testbed
@pytest.mark.usefixtures("s3_env")
def test_an_s3_root_with_an_s3_output_reuses_its_scan(
    bed: BedInfo, bucket: str, settings: StorageSpec, tmp_path: Path, scans: list[int]
) -> None:
    local = _tree(tmp_path / "data")
    s3 = bed.s3_client()
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        s3.upload_file(str(path), bucket, f"data/{path.relative_to(local).as_posix()}")
    roots = [DataRoot(uri=f"s3://{bucket}/data")]
    out = open_storage(f"s3://{bucket}/runs/job", settings)
    first, reused = scan_roots_cached(roots, 128, settings, cache=out)
    assert not reused
    assert out.exists(MANIFEST_KEY)
    second, reused = scan_roots_cached(roots, 128, settings, cache=out)
    assert reused
    assert second == first == scan_roots(roots, 128, settings)
    assert len(scans) == 1
    s3.put_object(Bucket=bucket, Key="data/cats/c0.txt", Body=b"renamed cat")
    third, reused = scan_roots_cached(roots, 128, settings, cache=out)
    assert not reused
    assert {i.key: i.caption for i in third.images}["cats/c0.png"] == "renamed cat"
