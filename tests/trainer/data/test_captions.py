"""Caption sources and their precedence, read through a real scan of a folder tree."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from kubedream_operator.spec import DataRoot
from kubedream_trainer.data import Dataset, process_caption, scan_roots
from kubedream_trainer.data.captions import caption_from_filename, caption_from_yaml

from .helpers import write_image, write_text

SIDECAR_YAML = (
    "main_prompt: a yaml prompt\ntags:\n  - plain tag\n  - tag: weighted tag\n    weight: 1.5\n"
)


def _scan(root: Path) -> Dataset:
    return scan_roots([DataRoot(uri=str(root))], 128, workers=4)


def _captions(root: Path) -> dict[str, str]:
    return {image.key: image.caption for image in _scan(root).images}


@pytest.mark.parametrize(
    ("stem", "expected"),
    [
        ("person_ (3)", "person"),
        ("a photo of bob", "a photo of bob"),
        ("  spaced out _1", "spaced out"),
        ("_x", ""),
    ],
)
def test_caption_from_filename(stem: str, expected: str) -> None:
    assert caption_from_filename(stem) == expected


def test_yaml_caption_format() -> None:
    import yaml

    assert (
        caption_from_yaml(yaml.safe_load(SIDECAR_YAML)) == "a yaml prompt, plain tag, weighted tag"
    )
    assert caption_from_yaml({"tags": ["only", "tags"]}) == "only, tags"
    assert caption_from_yaml({"main_prompt": ["first", "second"]}) == "first"
    assert caption_from_yaml({"flip_p": 0.5}) is None
    with pytest.raises(ValueError, match="tags"):
        caption_from_yaml({"tags": "not a list"})


def test_each_sidecar_source_alone(tmp_path: Path) -> None:
    write_image(tmp_path / "y_1.png")
    write_text(tmp_path / "y_1.yaml", SIDECAR_YAML)
    write_image(tmp_path / "yml_1.png")
    write_text(tmp_path / "yml_1.yml", "main_prompt: from yml\n")
    write_image(tmp_path / "c_1.jpg")
    write_text(tmp_path / "c_1.caption", "  from caption file \n")
    write_image(tmp_path / "t_1.webp")
    write_text(tmp_path / "t_1.txt", "from\ntxt file\n")
    write_image(tmp_path / "name_only_2.bmp")
    write_image(tmp_path / "a photo of bob.JPG")
    assert _captions(tmp_path) == {
        "y_1.png": "a yaml prompt, plain tag, weighted tag",
        "yml_1.png": "from yml",
        "c_1.jpg": "from caption file",
        "t_1.webp": "from txt file",
        "name_only_2.bmp": "name",
        "a photo of bob.JPG": "a photo of bob",
    }


def test_sidecar_precedence_yaml_then_caption_then_txt(tmp_path: Path) -> None:
    write_image(tmp_path / "all.png")
    write_text(tmp_path / "all.yaml", "main_prompt: yaml wins\n")
    write_text(tmp_path / "all.caption", "caption loses")
    write_text(tmp_path / "all.txt", "txt loses")
    write_image(tmp_path / "two.png")
    write_text(tmp_path / "two.caption", "caption wins")
    write_text(tmp_path / "two.txt", "txt loses")
    write_image(tmp_path / "empty_yaml.png")
    write_text(tmp_path / "empty_yaml.yaml", "flip_p: 0.5\n")  # no caption in it: fall through
    write_text(tmp_path / "empty_yaml.txt", "txt used")
    write_text(tmp_path / "local.yaml", "main_prompt: local loses\n")
    assert _captions(tmp_path) == {
        "all.png": "yaml wins",
        "two.png": "caption wins",
        "empty_yaml.png": "txt used",
    }


def test_local_then_nearest_global_then_filename(tmp_path: Path) -> None:
    write_text(tmp_path / "global.yaml", "main_prompt: root global\ntags: [g]\n")
    write_image(tmp_path / "top_1.png")
    write_image(tmp_path / "a" / "in_a.png")
    write_text(tmp_path / "a" / "local.yaml", "main_prompt: local of a\n")
    write_image(tmp_path / "a" / "b" / "in_b.png")  # local.yaml of a does not cascade
    write_text(tmp_path / "c" / "global.yaml", "main_prompt: global of c\n")
    write_image(tmp_path / "c" / "d" / "in_d.png")
    write_text(tmp_path / "c" / "d" / "in_d.txt", "  ")  # blank sidecar gives no caption
    assert _captions(tmp_path) == {
        "top_1.png": "root global, g",
        "a/in_a.png": "local of a",
        "a/b/in_b.png": "root global, g",
        "c/d/in_d.png": "global of c",
    }


def test_global_caption_only_within_the_root(tmp_path: Path) -> None:
    write_text(tmp_path / "global.yaml", "main_prompt: outside the root\n")
    write_image(tmp_path / "root" / "cat_7.png")
    assert _captions(tmp_path / "root") == {"cat_7.png": "cat"}


def test_unreadable_caption_is_reported_and_falls_back(tmp_path: Path) -> None:
    write_image(tmp_path / "dog_1.png")
    write_text(tmp_path / "dog_1.txt", b"\xff\xfe\xfa not utf-8")
    write_image(tmp_path / "cat_1.png")
    write_text(tmp_path / "cat_1.yaml", "main_prompt: [unclosed\n")
    write_text(tmp_path / "cat_1.txt", "cat from txt")
    dataset = _scan(tmp_path)
    assert {i.key: i.caption for i in dataset.images} == {
        "dog_1.png": "dog",
        "cat_1.png": "cat from txt",
    }
    problems = {p.path: p.problem for p in dataset.problems}
    assert problems[str(tmp_path / "dog_1.txt")].startswith(
        "unreadable caption: caption is not UTF-8"
    )
    assert problems[str(tmp_path / "cat_1.yaml")].startswith("unreadable caption: not valid YAML")


def test_process_caption_without_shuffle_is_identity() -> None:
    assert process_caption("b, a,  c", random.Random(0), False, 0) == "b, a,  c"


def test_process_caption_shuffles_tags_after_kept_ones() -> None:
    caption = "subject, t1, t2, t3, t4, t5, t6"
    results = {process_caption(caption, random.Random(seed), True, 1) for seed in range(30)}
    assert len(results) > 5
    for result in results:
        tags = result.split(", ")
        assert tags[0] == "subject"
        assert sorted(tags) == sorted(caption.split(", "))
    assert process_caption("a, b, c", random.Random(1), True, 3) == "a, b, c"
    assert process_caption(caption, random.Random(4), True, 0) == process_caption(
        caption, random.Random(4), True, 0
    )
