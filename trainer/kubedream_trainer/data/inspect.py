"""`kubedream dataset inspect ROOT...`: what the trainer would see, before any GPU is spent.

Scans the roots exactly as training does and prints, per folder, the images and how many
are drawn per epoch, the bucket histogram, the first epochs' sizes, and every problem;
`--json` prints the same as one JSON object. With several roots, every path relative to a
root is prefixed with the root's position (`0:cats/a.jpg`, `1:.`), which cannot collide
even when roots overlap; problem paths are full paths (root URI joined with the key).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

from pydantic import ValidationError

from kubedream_operator.spec import DataRoot

from .multipliers import draw_epoch
from .plan import plan_epoch
from .records import Dataset
from .scan import DataRootError, scan_roots


def _display(root_index: int, path: str, roots: int) -> str:
    shown = path or "."
    return f"{root_index}:{shown}" if roots > 1 else shown


def build_report(
    dataset: Dataset, *, roots: int, epochs: int, seed: int, batch_size: int
) -> dict[str, Any]:
    """The inspection as a JSON-ready dict (the `--json` output)."""
    buckets = Counter(f"{image.bucket[0]}x{image.bucket[1]}" for image in dataset.images)
    return {
        "images": len(dataset.images),
        "folders": [
            {
                "path": _display(folder.root_index, folder.path, roots),
                "images": folder.images,
                "multiplier": folder.multiplier,
                "per_epoch": folder.per_epoch,
            }
            for folder in dataset.folders
        ],
        "epochs": [len(draw_epoch(dataset, epoch, seed)) for epoch in range(epochs)],
        "batches": [len(plan_epoch(dataset, epoch, seed, batch_size)) for epoch in range(epochs)],
        "buckets": dict(sorted(buckets.items(), key=lambda kv: (-kv[1], kv[0]))),
        "captions": {
            _display(image.root_index, image.key, roots): image.caption for image in dataset.images
        },
        "problems": [{"path": p.path, "problem": p.problem} for p in dataset.problems],
    }


def format_report(
    report: dict[str, Any], *, root_uris: list[str], resolution: int, seed: int, batch_size: int
) -> str:
    """The human-readable inspection: folder table, epochs, bucket histogram, problems."""
    lines = []
    if len(root_uris) > 1:
        lines += ["Roots: " + ", ".join(f"{i} = {uri}" for i, uri in enumerate(root_uris)), ""]
    lines.append(
        f"{report['images']} usable images at resolution {resolution} (seed {seed}, batch size {batch_size})"
    )
    lines.append("")
    width = max([len("FOLDER")] + [len(f["path"]) for f in report["folders"]])
    lines.append(f"{'FOLDER':<{width}}  {'IMAGES':>7}  {'MULTIPLIER':>10}  {'PER EPOCH':>9}")
    for folder in report["folders"]:
        lines.append(
            f"{folder['path']:<{width}}  {folder['images']:>7}  {folder['multiplier']:>10.4g}  {folder['per_epoch']:>9}"
        )
    lines.append("")
    for epoch, (drawn, batches) in enumerate(zip(report["epochs"], report["batches"], strict=True)):
        lines.append(f"epoch {epoch}: {drawn} images in {batches} batches")
    lines += ["", "BUCKET       IMAGES"]
    most = max(report["buckets"].values(), default=1)
    for bucket, count in report["buckets"].items():
        lines.append(f"{bucket:<11}  {count:>6}  {'#' * max(1, round(40 * count / most))}")
    lines += ["", f"problems: {len(report['problems'])}"]
    lines += [f"  {p['path']}: {p['problem']}" for p in report["problems"]]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """The CLI entry point; 0 on success (even with problems), 2 when a root cannot be scanned."""
    try:
        roots = [DataRoot(uri=uri) for uri in args.roots]
        if args.epochs < 0 or args.batch_size < 1:
            raise ValueError("--epochs must be >= 0 and --batch-size >= 1")
        dataset = scan_roots(roots, args.resolution)
    except ValidationError as exc:
        messages = "; ".join(error["msg"] for error in exc.errors())
        print(f"kubedream dataset inspect: bad root: {messages}", file=sys.stderr)
        return 2
    except (DataRootError, ValueError) as exc:
        print(f"kubedream dataset inspect: {exc}", file=sys.stderr)
        return 2
    report = build_report(
        dataset, roots=len(roots), epochs=args.epochs, seed=args.seed, batch_size=args.batch_size
    )
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        print(
            format_report(
                report,
                root_uris=args.roots,
                resolution=args.resolution,
                seed=args.seed,
                batch_size=args.batch_size,
            )
        )
    return 0
