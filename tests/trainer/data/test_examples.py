"""The committed example data root: what the demo trains on, and that the script makes it."""

from __future__ import annotations

import runpy
from pathlib import Path

from PIL import Image

from kubedream_operator.spec import DataRoot
from kubedream_trainer.data import draw_epoch, scan_roots

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = REPO / "examples" / "data"


def test_example_root_scans_cleanly() -> None:
    dataset = scan_roots([DataRoot(uri=str(EXAMPLES))], 128)
    assert dataset.problems == ()
    assert [(f.path, f.images, f.multiplier, f.per_epoch) for f in dataset.folders] == [
        ("preservation", 10, 0.5, 5),
        ("training", 8, 1.0, 8),
    ]
    captions = {image.key: image.caption for image in dataset.images}
    assert captions["training/stripes.png"] == "blue and white vertical stripes, pattern"
    assert (
        captions["training/a red circle on a blue background_2.jpg"]
        == "a red circle on a blue background"
    )
    assert (
        captions["training/a black and white checkerboard.png"] == "a black and white checkerboard"
    )
    assert len({image.bucket for image in dataset.images}) == 3
    assert [len(draw_epoch(dataset, epoch, seed=555)) for epoch in range(3)] == [13, 13, 13]


def _decoded(path: Path) -> tuple[tuple[int, int], bytes]:
    with Image.open(path) as img:
        return img.size, img.tobytes()


def test_example_files_match_the_generator(tmp_path: Path) -> None:
    script = runpy.run_path(str(REPO / "scripts" / "make_example_data.py"))
    written = script["write"](tmp_path)
    committed = sorted(p.relative_to(EXAMPLES) for p in EXAMPLES.rglob("*") if p.is_file())
    assert sorted(p.relative_to(tmp_path) for p in written) == committed
    total = 0
    for relative in committed:
        ours, theirs = tmp_path / relative, EXAMPLES / relative
        total += theirs.stat().st_size
        if relative.suffix == ".png":  # lossless: pixels must match exactly
            assert _decoded(ours) == _decoded(theirs), relative
        elif relative.suffix == ".jpg":
            assert _decoded(ours)[0] == _decoded(theirs)[0], relative
        else:
            assert ours.read_text() == theirs.read_text(), relative
    assert total < 200 * 1024
