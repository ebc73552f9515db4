"""Generate the example data root in examples/data/ (committed; rerun to regenerate).

    .venv/bin/python scripts/make_example_data.py [--out examples/data]

Pillow only and deterministic: flat shapes and gradients drawn in code, so the demo and
the tests never download anything. `training/` holds 8 images of several aspect ratios,
captioned by file name (text before the first underscore) or by a `.txt` sidecar;
`preservation/` holds 10 images with `multiply.txt` = 0.5 (5 drawn per epoch).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parent.parent
RGB = tuple[int, int, int]


def gradient(size: tuple[int, int], top: RGB, bottom: RGB) -> Image.Image:
    """A vertical gradient from `top` to `bottom`."""
    width, height = size
    img = Image.new("RGB", size)
    draw = ImageDraw.Draw(img)
    for y in range(height):
        t = y / max(1, height - 1)
        draw.line(
            [(0, y), (width, y)],
            fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom, strict=True)),
        )
    return img


def circle(size: tuple[int, int], fg: RGB, bg: RGB) -> Image.Image:
    img = Image.new("RGB", size, bg)
    w, h = size
    r = min(w, h) // 3
    ImageDraw.Draw(img).ellipse([w // 2 - r, h // 2 - r, w // 2 + r, h // 2 + r], fill=fg)
    return img


def triangle(size: tuple[int, int], fg: RGB, bg: RGB) -> Image.Image:
    img = Image.new("RGB", size, bg)
    w, h = size
    ImageDraw.Draw(img).polygon(
        [(w // 2, h // 6), (w // 6, 5 * h // 6), (5 * w // 6, 5 * h // 6)], fill=fg
    )
    return img


def square(size: tuple[int, int], fg: RGB, bg: RGB) -> Image.Image:
    img = Image.new("RGB", size, bg)
    w, h = size
    s = min(w, h) // 2
    ImageDraw.Draw(img).rectangle(
        [w // 2 - s // 2, h // 2 - s // 2, w // 2 + s // 2, h // 2 + s // 2], fill=fg
    )
    return img


def stripes(size: tuple[int, int], fg: RGB, bg: RGB, period: int = 16) -> Image.Image:
    img = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(img)
    for x in range(0, size[0], period):
        draw.rectangle([x, 0, x + period // 2 - 1, size[1]], fill=fg)
    return img


def checkerboard(size: tuple[int, int], cell: int = 16) -> Image.Image:
    img = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for y in range(0, size[1], cell):
        for x in range(0, size[0], cell):
            if (x // cell + y // cell) % 2 == 0:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(0, 0, 0))
    return img


def training() -> dict[str, Image.Image | str]:
    """File name -> image (or sidecar text)."""
    red, blue, green, yellow = (220, 40, 40), (40, 70, 200), (40, 170, 60), (240, 210, 40)
    return {
        "a red circle on a blue background_1.png": circle((128, 128), red, blue),
        "a red circle on a blue background_2.jpg": circle((160, 96), red, blue),
        "a green triangle_1.png": triangle((96, 160), green, (250, 250, 250)),
        "a green triangle_2.jpg": triangle((128, 128), green, (235, 235, 235)),
        "a yellow square on black_1.png": square((160, 80), yellow, (0, 0, 0)),
        "a black and white checkerboard.png": checkerboard((128, 64)),
        "stripes.png": stripes((64, 128), blue, (255, 255, 255)),
        "stripes.txt": "blue and white vertical stripes, pattern\n",
        "sunset_01.jpg": gradient((160, 120), (250, 150, 40), (20, 30, 80)),
        "sunset_01.txt": "an orange sunset gradient over a dark sea\n",
    }


def preservation() -> dict[str, Image.Image | str]:
    files: dict[str, Image.Image | str] = {"multiply.txt": "0.5\n"}
    shapes = [circle, triangle, square]
    for i in range(10):
        fg = ((i * 70) % 256, (i * 130 + 60) % 256, (i * 40 + 120) % 256)
        bg = (255 - fg[0], 255 - fg[1], 255 - fg[2])
        size = (96, 96) if i % 3 == 0 else ((128, 96) if i % 3 == 1 else (96, 128))
        name = ["a circle", "a triangle", "a square"][i % 3]
        files[f"{name}_{i:02d}.png"] = shapes[i % 3](size, fg, bg)
    return files


def write(out: Path) -> list[Path]:
    written = []
    for folder, files in (("training", training()), ("preservation", preservation())):
        (out / folder).mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            path = out / folder / name
            if isinstance(content, str):
                path.write_text(content, encoding="utf-8")
            elif name.endswith(".jpg"):
                content.save(path, quality=90, optimize=True)
            else:
                content.save(path, optimize=True)
            written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "examples" / "data")
    args = parser.parse_args()
    written = write(args.out)
    total = sum(path.stat().st_size for path in written)
    print(f"wrote {len(written)} files ({total / 1024:.1f} KiB) under {args.out}")


if __name__ == "__main__":
    main()
