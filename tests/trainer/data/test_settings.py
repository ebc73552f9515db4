"""Folder settings: multiply.txt and friends, local.yaml, cascading global.yaml, bad values."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubedream_operator.spec import DataRoot
from kubedream_trainer.data import Dataset, ImageRecord, scan_roots
from kubedream_trainer.data.settings import parse_value

from .helpers import write_image, write_text


def _scan(root: Path, multiplier: float = 1.0) -> Dataset:
    return scan_roots([DataRoot(uri=str(root), multiplier=multiplier)], 64, workers=2)


def _by_key(dataset: Dataset) -> dict[str, ImageRecord]:
    return {image.key: image for image in dataset.images}


def test_multiply_txt_applies_to_its_folder_only(tmp_path: Path) -> None:
    write_text(tmp_path / "a" / "multiply.txt", "2.5\n")
    write_image(tmp_path / "a" / "x.png")
    write_image(tmp_path / "a" / "sub" / "y.png")
    write_image(tmp_path / "z.png")
    images = _by_key(_scan(tmp_path))
    assert images["a/x.png"].multiplier == 2.5
    assert images["a/sub/y.png"].multiplier == 1.0  # EveryDream: multiply.txt does not cascade
    assert images["z.png"].multiplier == 1.0


def test_global_yaml_cascades_and_nearer_settings_override(tmp_path: Path) -> None:
    write_text(tmp_path / "global.yaml", "multiply: 3\nflip_p: 0.25\nbatch_id: root\n")
    write_image(tmp_path / "top.png")
    write_image(tmp_path / "a" / "b" / "deep.png")
    write_text(tmp_path / "c" / "multiply.txt", "0.5")
    write_image(tmp_path / "c" / "in_c.png")
    write_text(tmp_path / "d" / "local.yaml", "multiply: 2\ncond_dropout: 0.5\n")
    write_image(tmp_path / "d" / "in_d.png")
    write_text(tmp_path / "e" / "global.yaml", "flip_p: 1.0\n")
    write_image(tmp_path / "e" / "f" / "in_f.png")
    images = _by_key(_scan(tmp_path))
    assert (images["top.png"].multiplier, images["top.png"].flip_p, images["top.png"].batch_id) == (
        3.0,
        0.25,
        "root",
    )
    assert images["a/b/deep.png"].multiplier == 3.0
    assert images["c/in_c.png"].multiplier == 0.5
    assert (images["d/in_d.png"].multiplier, images["d/in_d.png"].cond_dropout) == (2.0, 0.5)
    # e's global.yaml overrides flip_p for its subtree and inherits the rest from the root.
    assert (images["e/f/in_f.png"].flip_p, images["e/f/in_f.png"].multiplier) == (1.0, 3.0)


def test_txt_settings_files_and_their_precedence_over_local_yaml(tmp_path: Path) -> None:
    write_text(tmp_path / "flip_p.txt", "0.75")
    write_text(tmp_path / "cond_dropout.txt", "0.1\n")
    write_text(tmp_path / "batch_id.txt", " portraits \n")
    write_text(tmp_path / "local.yaml", "flip_p: 0.2\nbatch_id: other\nmultiply: 4\n")
    write_image(tmp_path / "p.png")
    image = _by_key(_scan(tmp_path))["p.png"]
    assert (image.flip_p, image.cond_dropout, image.batch_id, image.multiplier) == (
        0.75,
        0.1,
        "portraits",
        4.0,
    )


def test_defaults_leave_per_folder_values_unset(tmp_path: Path) -> None:
    write_image(tmp_path / "p.png")
    image = _by_key(_scan(tmp_path))["p.png"]
    assert (image.flip_p, image.cond_dropout, image.batch_id, image.multiplier) == (
        None,
        None,
        None,
        1.0,
    )


def test_root_multiplier_multiplies_the_folder_value(tmp_path: Path) -> None:
    write_text(tmp_path / "pres" / "multiply.txt", "0.5")
    for i in range(10):
        write_image(tmp_path / "pres" / f"p{i}.png")
    write_image(tmp_path / "t.png")
    dataset = _scan(tmp_path, multiplier=3.0)
    images = _by_key(dataset)
    assert images["pres/p0.png"].multiplier == 1.5
    assert images["t.png"].multiplier == 3.0
    assert [(f.path, f.images, f.multiplier, f.per_epoch) for f in dataset.folders] == [
        ("", 1, 3.0, 3),
        ("pres", 10, 1.5, 15),
    ]


def test_zero_multiply_keeps_images_listed_but_draws_none(tmp_path: Path) -> None:
    write_text(tmp_path / "off" / "multiply.txt", "0")
    write_image(tmp_path / "off" / "x.png")
    dataset = _scan(tmp_path)
    assert [(f.path, f.images, f.per_epoch) for f in dataset.folders] == [("off", 1, 0)]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("multiply.txt", "lots", "multiply: expected a decimal number, got 'lots'"),
        ("multiply.txt", "-2", "multiply: must be >= 0, got '-2'"),
        ("multiply.txt", "nan", "multiply: expected a decimal number, got 'nan'"),
        ("flip_p.txt", "1.5", "flip_p: must be between 0 and 1, got '1.5'"),
        ("cond_dropout.txt", "", "cond_dropout: expected a decimal number, got ''"),
        ("batch_id.txt", "   ", "batch_id: expected a non-empty name, got '   '"),
    ],
)
def test_garbage_settings_file_is_reported_and_ignored(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    write_text(tmp_path / "global.yaml", "multiply: 2\n")
    write_text(tmp_path / "sub" / name, content)
    write_image(tmp_path / "sub" / "img.png")
    dataset = _scan(tmp_path)
    assert [(p.path, p.problem) for p in dataset.problems] == [
        (str(tmp_path / "sub" / name), f"ignored: {message}")
    ]
    image = _by_key(dataset)["sub/img.png"]
    assert image.multiplier == 2.0  # the bad file is ignored: the global value applies


def test_bad_yaml_values_are_reported_and_the_good_ones_kept(tmp_path: Path) -> None:
    write_text(tmp_path / "local.yaml", "multiply: many\nflip_p: 0.5\n")
    write_text(tmp_path / "sub" / "global.yaml", "- not\n- a mapping\n")
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "sub" / "b.png")
    dataset = _scan(tmp_path)
    assert [(p.path, p.problem) for p in dataset.problems] == [
        (str(tmp_path / "local.yaml"), "multiply: expected a decimal number, got 'many'"),
        (
            str(tmp_path / "sub" / "global.yaml"),
            "ignored: expected a mapping of settings, got list",
        ),
    ]
    assert _by_key(dataset)["a.png"].flip_p == 0.5


@pytest.mark.parametrize(
    ("key", "raw", "value"),
    [("multiply", " 0.025\n", 0.025), ("flip_p", 1, 1.0), ("batch_id", 7, "7")],
)
def test_parse_value_accepts(key: str, raw: object, value: object) -> None:
    assert parse_value(key, raw) == value


@pytest.mark.parametrize(
    ("key", "raw"), [("multiply", True), ("multiply", "inf"), ("flip_p", -0.1), ("batch_id", None)]
)
def test_parse_value_rejects(key: str, raw: object) -> None:
    with pytest.raises(ValueError, match=key):
        parse_value(key, raw)
