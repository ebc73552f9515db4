"""The batch loader: tensors of the right shape and range, exact resume, flips, caption
dropout, and corrupt images substituted at load time."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from kubedream_operator.spec import DataRoot, DataSpec
from kubedream_trainer.data import Dataset, plan_epoch, scan_roots
from kubedream_trainer.data.loader import Batch, BatchLoader, ImageLoadError, load_image
from kubedream_trainer.storage.local import LocalStorage

from .helpers import write_image, write_split_image, write_text

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    write_split_image(tmp_path / "sq" / "split.png", (128, 128), RED, BLUE)
    write_text(tmp_path / "sq" / "split.txt", "alpha, beta, gamma, delta, epsilon")
    write_image(tmp_path / "sq" / "white.png", (200, 200), (255, 255, 255))
    write_image(tmp_path / "sq" / "black.png", (128, 128), (0, 0, 0))
    write_image(tmp_path / "sq" / "green.jpg", (150, 150), GREEN)
    write_split_image(tmp_path / "wide" / "w1.png", (384, 128), RED, BLUE)
    write_image(tmp_path / "wide" / "w2.png", (192, 64), GREEN)
    write_image(tmp_path / "wide" / "w3.png", (190, 66), BLUE)
    return tmp_path


def _spec(root: Path, **data: object) -> DataSpec:
    return DataSpec(roots=[DataRoot(uri=str(root))], resolution=128, **data)  # type: ignore[arg-type]


def _run(
    dataset: Dataset, batches: list[list[int]], spec: DataSpec, **kwargs: object
) -> list[Batch]:
    return list(BatchLoader(dataset, batches, data_spec=spec, seed=11, epoch=2, **kwargs))  # type: ignore[arg-type]


def _key(dataset: Dataset, index: int) -> str:
    return dataset.images[index].key


def test_batches_have_bucket_shapes_and_pixel_range(root: Path) -> None:
    dataset = scan_roots([DataRoot(uri=str(root))], 128)
    batches = plan_epoch(dataset, 2, seed=11, batch_size=2)
    out = _run(dataset, batches, _spec(root, cond_dropout=0.0))
    assert len(out) == len(batches) == 4
    for batch, planned in zip(out, batches, strict=True):
        width, height = dataset.images[planned[0]].bucket
        assert batch.pixel_values.dtype == torch.float32
        assert batch.pixel_values.shape == (2, 3, height, width)
        assert batch.pixel_values.min() >= -1.0
        assert batch.pixel_values.max() <= 1.0
        assert batch.indices == planned
        assert batch.captions == [dataset.images[i].caption for i in planned]
    pixels = {_key(dataset, i): b.pixel_values[j] for b in out for j, i in enumerate(b.indices)}
    assert torch.all(pixels["sq/white.png"] == 1.0)
    assert torch.all(pixels["sq/black.png"] == -1.0)


def test_resume_at_start_batch_reproduces_the_uninterrupted_run(root: Path) -> None:
    dataset = scan_roots([DataRoot(uri=str(root))], 128)
    batches = plan_epoch(dataset, 2, seed=11, batch_size=1)
    spec = _spec(root, flip_p=0.5, cond_dropout=0.3, shuffle_tags=True)
    full = _run(dataset, batches, spec, workers=3, prefetch=2)
    resumed = _run(dataset, batches, spec, workers=2, start_batch=3)
    serial = _run(dataset, batches, spec, workers=0)
    assert len(resumed) == len(batches) - 3
    for a, b in zip(full[3:], resumed, strict=True):
        assert torch.equal(a.pixel_values, b.pixel_values)
        assert (a.captions, a.indices, a.flipped) == (b.captions, b.indices, b.flipped)
    for a, b in zip(full, serial, strict=True):
        assert torch.equal(a.pixel_values, b.pixel_values)
        assert a.captions == b.captions
    other_epoch = list(BatchLoader(dataset, batches, data_spec=spec, seed=11, epoch=3))
    assert [b.flipped for b in other_epoch] != [b.flipped for b in full] or [
        b.captions for b in other_epoch
    ] != [b.captions for b in full]


def test_flip_mirrors_pixels_and_folder_flip_p_overrides_spec(root: Path) -> None:
    write_text(root / "wide" / "flip_p.txt", "0")
    dataset = scan_roots([DataRoot(uri=str(root))], 128)
    batches = [[i] for i in range(len(dataset.images))]
    flipped = _run(dataset, batches, _spec(root, flip_p=1.0))
    plain = _run(dataset, batches, _spec(root, flip_p=0.0))
    for f, p in zip(flipped, plain, strict=True):
        folder = dataset.images[f.indices[0]].folder
        assert f.flipped == [folder == "sq"]
        assert not p.flipped[0]
        expected = p.pixel_values.flip(-1) if folder == "sq" else p.pixel_values
        assert torch.equal(f.pixel_values, expected)
    split = next(b for b in plain if _key(dataset, b.indices[0]) == "sq/split.png")
    assert split.pixel_values[0, 0, 0, 0] == 1.0
    assert split.pixel_values[0, 2, 0, 0] == -1.0


def test_half_flip_probability_flips_some(root: Path) -> None:
    dataset = scan_roots([DataRoot(uri=str(root))], 128)
    batches = [[i] for i in range(len(dataset.images))] * 4
    flips = [b.flipped[0] for b in _run(dataset, batches, _spec(root, flip_p=0.5))]
    assert 0 < sum(flips) < len(flips)


def test_caption_dropout_and_tag_shuffle(root: Path) -> None:
    write_text(root / "wide" / "cond_dropout.txt", "0")
    dataset = scan_roots([DataRoot(uri=str(root))], 128)
    batches = [[i] for i in range(len(dataset.images))]
    for batch in _run(dataset, batches, _spec(root, cond_dropout=1.0)):
        image = dataset.images[batch.indices[0]]
        assert batch.captions == ([image.caption] if image.folder == "wide" else [""])
    split_index = next(i for i, image in enumerate(dataset.images) if image.key == "sq/split.png")
    spec = _spec(root, cond_dropout=0.0, shuffle_tags=True, keep_tags=1)
    captions = {_run(dataset, [[split_index]], spec, workers=0)[0].captions[0]}
    for epoch in range(8):
        captions |= set(
            next(
                iter(BatchLoader(dataset, [[split_index]], data_spec=spec, seed=1, epoch=epoch))
            ).captions
        )
    assert len(captions) > 1
    for caption in captions:
        tags = caption.split(", ")
        assert tags[0] == "alpha"
        assert sorted(tags) == sorted("alpha, beta, gamma, delta, epsilon".split(", "))


def test_center_crop_not_squash(tmp_path: Path) -> None:
    img = Image.new("RGB", (384, 128), RED)
    img.paste(GREEN, (128, 0, 256, 128))
    img.paste(BLUE, (256, 0, 384, 128))
    img.save(tmp_path / "bands.png")
    out = load_image(LocalStorage(str(tmp_path)), "bands.png", (128, 128))
    assert out.size == (128, 128)
    assert out.mode == "RGB"
    assert out.getpixel((5, 64)) == GREEN
    assert out.getpixel((122, 64)) == GREEN
    tall = load_image(LocalStorage(str(tmp_path)), "bands.png", (64, 192))
    assert tall.size == (64, 192)


def test_transparency_is_flattened_on_white(tmp_path: Path) -> None:
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    out = load_image(LocalStorage(str(tmp_path)), "clear.png", (64, 64))
    assert out.getpixel((10, 10)) == (255, 255, 255)


def test_exif_orientation_is_applied_at_load(tmp_path: Path) -> None:
    img = Image.new("RGB", (128, 64), RED)
    img.paste(BLUE, (64, 0, 128, 64))  # raw: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90° clockwise: red on top
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    out = load_image(LocalStorage(str(tmp_path)), "rot.jpg", (64, 128))
    top, bottom = out.getpixel((32, 10)), out.getpixel((32, 118))
    assert top[0] > 200
    assert top[2] < 60
    assert bottom[2] > 200
    assert bottom[0] < 60


def test_load_image_error_names_the_file(tmp_path: Path) -> None:
    write_text(tmp_path / "broken.jpg", b"\xff\xd8\xff garbage")
    with pytest.raises(ImageLoadError, match=r"broken\.jpg: cannot decode image"):
        load_image(LocalStorage(str(tmp_path)), "broken.jpg", (64, 64))
    with pytest.raises(ImageLoadError, match=r"missing\.png: file not found"):
        load_image(LocalStorage(str(tmp_path)), "missing.png", (64, 64))


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_image_corrupt_after_scan_is_substituted(
    root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    Image.effect_noise((128, 128), 80).convert("RGB").save(root / "sq" / "noisy.jpg", quality=95)
    _truncate(root / "sq" / "noisy.jpg", 0.5)  # header intact: the scan accepts it
    dataset = scan_roots([DataRoot(uri=str(root))], 128)
    bad = next(i for i, image in enumerate(dataset.images) if image.key == "sq/noisy.jpg")
    loader = BatchLoader(
        dataset, [[bad, bad], [bad]], data_spec=_spec(root), seed=1, epoch=0, workers=2
    )
    with caplog.at_level(logging.WARNING, logger="kubedream_trainer.data.loader"):
        out = list(loader)
    for batch in out:
        assert bad not in batch.indices
        assert all(dataset.images[i].bucket == (128, 128) for i in batch.indices)
    assert [(p.path, p.problem.split(":")[0]) for p in loader.problems] == [
        (str(root / "sq" / "noisy.jpg"), "skipped at load time")
    ]
    assert "noisy.jpg" in caplog.text
    again = list(
        BatchLoader(dataset, [[bad, bad], [bad]], data_spec=_spec(root), seed=1, epoch=0, workers=0)
    )
    assert [b.indices for b in again] == [b.indices for b in out]


def test_substitutes_never_come_from_switched_off_folders(tmp_path: Path) -> None:
    (tmp_path / "on").mkdir()
    Image.effect_noise((64, 64), 80).convert("RGB").save(tmp_path / "on" / "bad.jpg", quality=95)
    write_image(tmp_path / "on" / "good.png")
    write_image(tmp_path / "off" / "good.png")
    write_text(tmp_path / "off" / "multiply.txt", "0")
    dataset = scan_roots([DataRoot(uri=str(tmp_path))], 64)
    _truncate(tmp_path / "on" / "bad.jpg", 0.5)
    bad = next(i for i, image in enumerate(dataset.images) if image.key == "on/bad.jpg")
    for seed in range(6):
        batch = next(
            iter(
                BatchLoader(
                    dataset, [[bad]], data_spec=_spec(tmp_path), seed=seed, epoch=0, workers=0
                )
            )
        )
        assert [_key(dataset, i) for i in batch.indices] == ["on/good.png"]


def test_no_readable_substitute_raises(tmp_path: Path) -> None:
    for name in ("a.jpg", "b.jpg"):
        Image.effect_noise((64, 64), 80).convert("RGB").save(tmp_path / name, quality=95)
    dataset = scan_roots([DataRoot(uri=str(tmp_path))], 64)
    for name in ("a.jpg", "b.jpg"):
        _truncate(tmp_path / name, 0.5)
    with pytest.raises(ImageLoadError, match="no readable image of its bucket"):
        list(BatchLoader(dataset, [[0]], data_spec=_spec(tmp_path), seed=1, epoch=0, workers=0))


def test_stopping_early_and_bad_arguments(root: Path) -> None:
    dataset = scan_roots([DataRoot(uri=str(root))], 128)
    batches = [[i] for i in range(len(dataset.images))]
    loader = BatchLoader(
        dataset, batches, data_spec=_spec(root), seed=0, epoch=0, workers=2, prefetch=2
    )
    assert len(loader) == len(batches)
    iterator = iter(loader)
    next(iterator)
    iterator.close()  # the pool shuts down; nothing hangs
    with pytest.raises(ValueError, match="start_batch"):
        BatchLoader(
            dataset, batches, data_spec=_spec(root), seed=0, epoch=0, start_batch=len(batches) + 1
        )
    square = next(i for i, image in enumerate(dataset.images) if image.bucket == (128, 128))
    wide = next(i for i, image in enumerate(dataset.images) if image.bucket != (128, 128))
    with pytest.raises(ValueError, match="one bucket"):
        BatchLoader(dataset, [[square, wide]], data_spec=_spec(root), seed=0, epoch=0)
