"""Scanning: image discovery, header-only sizes, bad files reported (never a crash), roots."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from kubedream_operator.spec import DataRoot
from kubedream_trainer.data import DataRootError, scan_roots
from kubedream_trainer.data.images import (
    HEADER_BYTES,
    ImageLoadError,
    is_image_key,
    read_image_size,
)
from kubedream_trainer.storage.local import LocalStorage

from .helpers import write_image, write_text


class CountingStorage(LocalStorage):
    """LocalStorage that records how it was read."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.full_reads: list[str] = []
        self.range_reads: list[tuple[str, int, int]] = []

    def read_bytes(self, key: str) -> bytes:
        self.full_reads.append(key)
        return super().read_bytes(key)

    def read_range(self, key: str, start: int, length: int) -> bytes:
        self.range_reads.append((key, start, length))
        return super().read_range(key, start, length)


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("a.JPG", True),
        ("b/c.webp", True),
        ("x.jpeg.txt", False),
        ("d.jpg/e", False),
        ("gif.gif", False),
    ],
)
def test_is_image_key(key: str, expected: bool) -> None:
    assert is_image_key(key) is expected


def test_size_comes_from_a_bounded_prefix(tmp_path: Path) -> None:
    write_image(tmp_path / "big.png", size=(1500, 700), color=(1, 2, 3))
    storage = CountingStorage(str(tmp_path))
    assert read_image_size(storage, "big.png") == (1500, 700)
    assert storage.range_reads == [("big.png", 0, HEADER_BYTES)]
    assert storage.full_reads == []


def test_header_beyond_the_prefix_falls_back_to_a_full_read(tmp_path: Path) -> None:
    # A 200 KB ICC profile sits in APP2 segments before the JPEG frame header.
    write_image(tmp_path / "icc.jpg", size=(120, 60), icc_profile=b"\0" * 200_000)
    assert (tmp_path / "icc.jpg").stat().st_size > HEADER_BYTES
    storage = CountingStorage(str(tmp_path))
    assert read_image_size(storage, "icc.jpg") == (120, 60)
    assert storage.full_reads == ["icc.jpg"]


def test_exif_rotation_swaps_the_reported_size(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    write_image(tmp_path / "phone.jpg", size=(120, 60), exif=exif)
    assert read_image_size(LocalStorage(str(tmp_path)), "phone.jpg") == (60, 120)


def test_unreadable_image_raises_naming_the_file(tmp_path: Path) -> None:
    write_text(tmp_path / "bad.png", b"\x89PNG not really")
    with pytest.raises(ImageLoadError, match=r"bad\.png: not a readable image"):
        read_image_size(LocalStorage(str(tmp_path)), "bad.png")


def test_bad_images_are_skipped_and_reported(tmp_path: Path) -> None:
    write_image(tmp_path / "good_1.png")
    write_text(tmp_path / "garbage.jpg", b"this is not a jpeg")
    write_text(tmp_path / "empty.webp", b"")
    write_text(tmp_path / "sub" / "zero.bmp", b"BM")
    dataset = scan_roots([DataRoot(uri=str(tmp_path))], 64)
    assert [image.key for image in dataset.images] == ["good_1.png"]
    assert [(p.path, p.problem) for p in dataset.problems] == [
        (
            str(tmp_path / "empty.webp"),
            "skipped: not a readable image: unrecognised format or corrupt header",
        ),
        (
            str(tmp_path / "garbage.jpg"),
            "skipped: not a readable image: unrecognised format or corrupt header",
        ),
        (
            str(tmp_path / "sub" / "zero.bmp"),
            "skipped: not a readable image: unrecognised format or corrupt header",
        ),
    ]


def test_undersized_images_are_reported_but_used(tmp_path: Path) -> None:
    write_image(tmp_path / "tiny.png", size=(100, 100))
    write_image(tmp_path / "fine.png", size=(400, 400))
    dataset = scan_roots([DataRoot(uri=str(tmp_path))], 512)
    assert sorted(image.key for image in dataset.images) == ["fine.png", "tiny.png"]
    assert [(p.path, p.problem) for p in dataset.problems] == [
        (
            str(tmp_path / "tiny.png"),
            "undersized: 100x100 is under half the area of its 512x512 bucket (upscaled)",
        )
    ]


def test_records_carry_size_bucket_folder_and_etag(tmp_path: Path) -> None:
    write_image(tmp_path / "wide" / "w.jpg", size=(300, 100))
    write_image(tmp_path / "tall.png", size=(70, 140))
    dataset = scan_roots([DataRoot(uri=str(tmp_path))], 128)
    wide, tall = sorted(dataset.images, key=lambda image: image.key, reverse=True)
    assert (wide.key, wide.folder, wide.width, wide.height, wide.bucket) == (
        "wide/w.jpg",
        "wide",
        300,
        100,
        (192, 64),
    )
    assert (tall.key, tall.folder, tall.bucket) == ("tall.png", "", (64, 192))
    assert wide.etag
    assert wide.etag != tall.etag
    assert dataset.resolution == 128


def test_images_are_in_key_order_whatever_the_worker_count(tmp_path: Path) -> None:
    for name in ["b/2.png", "a.png", "b/1.png", "c/d/e.png", "b.png"]:
        write_image(tmp_path / name)
    one = scan_roots([DataRoot(uri=str(tmp_path))], 64, workers=1)
    many = scan_roots([DataRoot(uri=str(tmp_path))], 64, workers=8)
    assert one == many
    assert [image.key for image in one.images] == [
        "a.png",
        "b.png",
        "b/1.png",
        "b/2.png",
        "c/d/e.png",
    ]


def test_hidden_files_and_folders_are_skipped(tmp_path: Path) -> None:
    write_image(tmp_path / "seen.png")
    write_text(tmp_path / "._seen.png", b"AppleDouble junk")
    write_image(tmp_path / ".cache" / "hidden.png")
    write_text(tmp_path / ".multiply.txt", "9")
    dataset = scan_roots([DataRoot(uri=str(tmp_path))], 64)
    assert [image.key for image in dataset.images] == ["seen.png"]
    assert dataset.problems == ()


def test_several_roots_keep_their_index_and_multiplier(tmp_path: Path) -> None:
    write_image(tmp_path / "one" / "a.png")
    write_image(tmp_path / "two" / "a.png")
    roots = [
        DataRoot(uri=str(tmp_path / "one")),
        DataRoot(uri=str(tmp_path / "two"), multiplier=0.5),
    ]
    dataset = scan_roots(roots, 64)
    assert [(i.root_index, i.root_uri, i.key, i.multiplier) for i in dataset.images] == [
        (0, str(tmp_path / "one"), "a.png", 1.0),
        (1, str(tmp_path / "two"), "a.png", 0.5),
    ]
    assert [(f.root_index, f.path, f.per_epoch) for f in dataset.folders] == [
        (0, "", 1),
        (1, "", 1),
    ]


def test_missing_root_raises(tmp_path: Path) -> None:
    with pytest.raises(DataRootError, match="no files found"):
        scan_roots([DataRoot(uri=str(tmp_path / "nope"))], 64)


def test_root_without_images_is_a_problem(tmp_path: Path) -> None:
    write_text(tmp_path / "notes.md", "hello")
    dataset = scan_roots([DataRoot(uri=str(tmp_path))], 64)
    assert dataset.images == ()
    assert [(p.path, p.problem) for p in dataset.problems] == [
        (str(tmp_path), "no images found under this root")
    ]


def test_bad_resolution_raises(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    with pytest.raises(ValueError, match="multiple of 64"):
        scan_roots([DataRoot(uri=str(tmp_path))], 100)


def test_data_package_imports_and_scans_without_torch(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png")
    code = (
        "import sys\n"
        "from kubedream_operator.spec import DataRoot\n"
        "from kubedream_trainer.data import scan_roots, plan_epoch\n"
        "import kubedream_trainer.data.inspect\n"
        f"ds = scan_roots([DataRoot(uri={str(tmp_path)!r})], 64)\n"
        "assert plan_epoch(ds, 0, 0, 1) == [[0]]\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'numpy' not in sys.modules, 'numpy was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
