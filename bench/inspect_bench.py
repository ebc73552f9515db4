"""Benchmark: how fast `scan_roots` (and so `kubedream dataset inspect`) scans a big root.

    .venv/bin/python bench/inspect_bench.py [--images 100000] [--workers 1,4,16] [--json PATH]

Generates N tiny images in a temporary folder (a few pre-encoded JPEG/PNG files of
different sizes written under many names, 1,000 per folder, half with a `.txt` caption
and every tenth folder with a `multiply.txt`), then times a full scan per worker count,
plus one epoch's `draw_epoch` and `plan_epoch`. Prints a table and writes JSON. The
files were just written, so they are read from the page cache: this measures the
scanner's own cost, not the disk's (S3 latency is what the thread pool hides).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from PIL import Image

from kubedream_operator.spec import DataRoot
from kubedream_trainer.data import plan_epoch, scan_roots
from kubedream_trainer.data.multipliers import draw_epoch

PER_FOLDER = 1000


def encoded_samples() -> list[tuple[str, bytes]]:
    """A few small encoded images of different aspect ratios: (extension, bytes)."""
    samples = []
    for i, (size, fmt) in enumerate(
        [
            ((64, 64), "JPEG"),
            ((96, 64), "JPEG"),
            ((64, 112), "PNG"),
            ((128, 48), "JPEG"),
            ((80, 80), "PNG"),
        ]
    ):
        buf = io.BytesIO()
        Image.new("RGB", size, (40 * i, 90, 200 - 30 * i)).save(buf, fmt)
        samples.append((".jpg" if fmt == "JPEG" else ".png", buf.getvalue()))
    return samples


def generate(root: Path, count: int) -> None:
    samples = encoded_samples()
    for i in range(count):
        folder = root / f"set{i // PER_FOLDER:04d}"
        if i % PER_FOLDER == 0:
            folder.mkdir(parents=True)
            if (i // PER_FOLDER) % 10 == 9:
                (folder / "multiply.txt").write_text("0.25")
        ext, data = samples[i % len(samples)]
        (folder / f"subject {i % 97}_{i:07d}{ext}").write_bytes(data)
        if i % 2:
            (folder / f"subject {i % 97}_{i:07d}.txt").write_text(
                f"a caption for image {i}, tag a, tag b"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--workers", default="1,4,16", help="comma-separated worker counts to time")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--json", type=Path, default=Path("runs/bench/inspect_bench.json"))
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="kd-inspect-bench-"))
    try:
        start = time.perf_counter()
        generate(tmp / "root", args.images)
        generate_s = time.perf_counter() - start
        rows = []
        for workers in [int(w) for w in args.workers.split(",")]:
            start = time.perf_counter()
            dataset = scan_roots(
                [DataRoot(uri=str(tmp / "root"))], args.resolution, workers=workers
            )
            seconds = time.perf_counter() - start
            assert len(dataset.images) == args.images, (len(dataset.images), dataset.problems[:3])
            rows.append(
                {
                    "workers": workers,
                    "seconds": round(seconds, 3),
                    "images_per_s": round(args.images / seconds),
                }
            )
        start = time.perf_counter()
        drawn = len(draw_epoch(dataset, 0, seed=555))
        draw_s = time.perf_counter() - start
        start = time.perf_counter()
        batches = len(plan_epoch(dataset, 0, seed=555, batch_size=8))
        plan_s = time.perf_counter() - start
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"scan of {args.images} images ({args.images // 2} .txt captions), resolution {args.resolution}"
    )
    print(
        f"(generated in {generate_s:.1f} s; {os.cpu_count()} CPUs, Python {platform.python_version()})"
    )
    print(f"{'workers':>8}  {'seconds':>8}  {'images/s':>9}")
    for row in rows:
        print(f"{row['workers']:>8}  {row['seconds']:>8.2f}  {row['images_per_s']:>9}")
    print(
        f"draw_epoch: {drawn} images in {draw_s:.3f} s; plan_epoch (batch 8): {batches} batches in {plan_s:.3f} s"
    )
    result = {
        "images": args.images,
        "resolution": args.resolution,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "scan": rows,
        "draw_epoch_s": round(draw_s, 4),
        "plan_epoch_s": round(plan_s, 4),
        "drawn": drawn,
        "batches": batches,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
