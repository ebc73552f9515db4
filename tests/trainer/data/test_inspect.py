"""`kubedream dataset inspect`: the JSON contract, the human table, several roots, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kubedream_trainer.cli import main

from .helpers import write_image, write_text


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_image(root / "cat_1.png", (160, 96))
    write_image(root / "dog.jpg", (96, 160))
    write_text(root / "dog.txt", "a brown dog\n")
    for i in range(10):
        write_image(root / "pres" / f"p{i}.png", (100, 100), (i * 20, 0, 0))
    write_text(root / "pres" / "multiply.txt", "0.5")
    write_text(root / "bad.jpg", b"not an image")
    return root


def _inspect_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    assert (
        main(["dataset", "inspect", *args, "--json", "--resolution", "128", "--epochs", "2"]) == 0
    )
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one JSON object, one line
    report: dict[str, object] = json.loads(out)
    return report


def test_inspect_json_reports_the_tree(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = _inspect_json(capsys, str(tree))
    assert report["images"] == 12
    assert report["folders"] == [
        {"path": ".", "images": 2, "multiplier": 1.0, "per_epoch": 2},
        {"path": "pres", "images": 10, "multiplier": 0.5, "per_epoch": 5},
    ]
    assert report["epochs"] == [7, 7]
    assert report["buckets"] == {"128x128": 12}
    captions = report["captions"]
    assert isinstance(captions, dict)
    assert captions["cat_1.png"] == "cat"
    assert captions["dog.jpg"] == "a brown dog"
    assert captions["pres/p3.png"] == "p3"
    assert len(captions) == 12
    assert report["problems"] == [
        {
            "path": str(tree / "bad.jpg"),
            "problem": "skipped: not a readable image: unrecognised format or corrupt header",
        }
    ]


def test_inspect_json_prefixes_paths_with_several_roots(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _inspect_json(capsys, str(tree), str(tree / "pres"))
    assert report["images"] == 22
    folders = report["folders"]
    assert isinstance(folders, list)
    assert [f["path"] for f in folders] == ["0:.", "0:pres", "1:."]
    assert [f["per_epoch"] for f in folders] == [2, 5, 5]
    captions = report["captions"]
    assert isinstance(captions, dict)
    assert captions["0:pres/p1.png"] == captions["1:p1.png"] == "p1"
    assert report["epochs"] == [12, 12]


def test_inspect_human_output(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dataset", "inspect", str(tree), "--resolution", "128", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "12 usable images at resolution 128 (seed 555, batch size 2)"
    assert any(line.split() == ["pres", "10", "0.5", "5"] for line in lines)
    assert "epoch 0: 7 images in 4 batches" in lines
    assert any(line.startswith("128x128") and line.split()[1] == "12" for line in lines)
    assert "problems: 1" in lines
    assert (
        f"  {tree / 'bad.jpg'}: skipped: not a readable image: unrecognised format or corrupt header"
        in lines
    )


def test_inspect_missing_root_fails_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dataset", "inspect", str(tmp_path / "missing"), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"data root {tmp_path / 'missing'}: no files found" in captured.err


def test_inspect_rejects_bad_uri_and_resolution(
    tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dataset", "inspect", "ftp://host/data"]) == 2
    assert "must be a local path or s3://bucket/prefix" in capsys.readouterr().err
    assert main(["dataset", "inspect", str(tree), "--resolution", "100"]) == 2
    assert "multiple of 64" in capsys.readouterr().err


def test_inspect_json_through_the_installed_command(tree: Path) -> None:
    command = Path(sys.executable).with_name("kubedream")
    result = subprocess.run(
        [
            str(command),
            "dataset",
            "inspect",
            str(tree),
            "--json",
            "--resolution",
            "128",
            "--epochs",
            "3",
            "--seed",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["images"], report["epochs"], len(report["problems"])) == (12, [7, 7, 7], 1)
    missing = subprocess.run(
        [str(command), "dataset", "inspect", str(tree / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert missing.returncode == 2
    assert "no files found" in missing.stderr
