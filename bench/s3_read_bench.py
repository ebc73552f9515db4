"""Benchmark: how fast training images stream from S3, through the loader's prefetch pool
versus one image after another.

    .venv/bin/python bench/s3_read_bench.py [--endpoint URL --bucket B] [--images 256]
        [--size 512] [--workers 2,4,8,16] [--latency-ms 0,20] [--json PATH]

Without --endpoint it starts a MinIO of its own from the test bed's binary (built by
`make testbed-bins`) in a temporary folder; with one it uses that server and the AWS_*
credentials of the environment, in a bucket of its own that it deletes afterwards (or
--bucket, left in place). It uploads N generated JPEGs (photo-like noise and gradients,
about 100 KB at 512x512), scans the root once (`scan_roots`: listing plus a ranged GET per
header), and then reads every image:

  sequential fetch   `Storage.read_bytes`, one image after another (bytes only)
  sequential decode  `load_image`, one after another (fetch, decode, crop to the bucket)
  loader wN          the real `BatchLoader` (batches of 8, 4 batches prefetched, N threads)

`--latency-ms` puts a proxy in front of the server that holds every request for that long,
like the round trip to a remote object store (a local MinIO answers in well under 1 ms,
which hides what the pool is for). Prints a table (images/s and MB/s of encoded image
data) and writes JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kubedream_operator.spec import DataRoot, DataSpec, StorageSpec
from kubedream_trainer.data import Dataset, scan_roots
from kubedream_trainer.data.images import load_image
from kubedream_trainer.data.loader import BatchLoader
from kubedream_trainer.storage import Storage, open_storage

BATCH = 8
PREFETCH = 4


def photo_like(size: int, seed: int) -> bytes:
    """A JPEG with gradients and noise: compresses like a photo, not like a flat colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.stack([x * 255, y * 255, (1 - x) * 255], axis=-1)
    noisy = base * rng.uniform(0.5, 1.0) + rng.normal(0, 24, (size, size, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


class DelayProxy:
    """127.0.0.1:<port> -> the server, holding each client->server chunk for `delay` s."""

    def __init__(self, target: tuple[str, int], delay: float) -> None:
        self.target, self.delay = target, delay
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._server.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.target)
        threading.Thread(target=self._pump, args=(upstream, client, 0.0), daemon=True).start()
        self._pump(client, upstream, self.delay)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, delay: float) -> None:
        try:
            while data := source.recv(1 << 16):
                if delay:
                    time.sleep(delay)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
                end.close()


@contextmanager
def server(endpoint: str | None) -> Iterator[tuple[str, dict[str, str]]]:
    """(endpoint, AWS_* variables): the given server, or a MinIO of our own."""
    if endpoint:
        yield endpoint, {}
        return
    from kubedream_operator.devbed.minio import StandaloneMinio

    folder = Path(tempfile.mkdtemp(prefix="kd-s3-bench-"))
    minio = StandaloneMinio(folder)
    try:
        minio.start()
        yield minio.endpoint, minio.env
    finally:
        minio.stop()
        shutil.rmtree(folder, ignore_errors=True)


def timed(run: Callable[[], int], images: int, megabytes: float) -> dict[str, float]:
    start = time.perf_counter()
    done = run()
    seconds = time.perf_counter() - start
    assert done == images, (done, images)
    return {
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 1),
        "mb_per_s": round(megabytes / seconds, 2),
    }


def measure(
    storage: Storage, settings: StorageSpec, dataset: Dataset, spec: DataSpec, workers: list[int]
) -> list[dict[str, Any]]:
    """Every image read once per mode."""
    images = dataset.images
    sizes = {info.key: info.size for info in storage.list()}
    megabytes = sum(sizes[image.key] for image in images) / 1e6
    batches = [list(range(i, min(i + BATCH, len(images)))) for i in range(0, len(images), BATCH)]

    def fetch() -> int:
        done = 0
        for image in images:
            done += bool(storage.read_bytes(image.key))
        return done

    def decode() -> int:
        done = 0
        for image in images:
            done += load_image(storage, image.key, image.bucket).size == image.bucket
        return done

    def loader(count: int) -> Callable[[], int]:
        def run() -> int:
            batches_out = BatchLoader(
                dataset,
                batches,
                data_spec=spec,
                seed=1,
                epoch=0,
                storage_settings=settings,
                workers=count,
                prefetch=PREFETCH,
            )
            return sum(len(batch.indices) for batch in batches_out)

        return run

    rows = [
        {"mode": "sequential fetch", **timed(fetch, len(images), megabytes)},
        {"mode": "sequential decode", **timed(decode, len(images), megabytes)},
    ]
    for count in workers:
        rows.append({"mode": f"loader w{count}", **timed(loader(count), len(images), megabytes)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", help="S3 endpoint URL (default: start a MinIO)")
    parser.add_argument("--bucket", help="bucket to use (default: a new one, deleted after)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=512, help="image width and height")
    parser.add_argument("--workers", default="2,4,8,16", help="loader thread counts to time")
    parser.add_argument("--latency-ms", default="0,20", help="added request latencies to time")
    parser.add_argument("--json", type=Path, default=Path("runs/bench/s3_read_bench.json"))
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]

    with server(args.endpoint) as (endpoint, env):
        os.environ.update(env)
        import boto3

        s3 = boto3.client("s3", endpoint_url=endpoint)
        bucket = args.bucket or f"kd-bench-{uuid.uuid4().hex[:8]}"
        if not args.bucket:
            s3.create_bucket(Bucket=bucket)
        prefix = f"bench-{args.size}"
        start = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(
                pool.map(
                    lambda i: s3.put_object(
                        Bucket=bucket,
                        Key=f"{prefix}/img_{i:05d}.jpg",
                        Body=photo_like(args.size, i),
                    ),
                    range(args.images),
                )
            )
        upload_s = time.perf_counter() - start
        host, port = endpoint.removeprefix("http://").split(":")
        results: list[dict[str, Any]] = []
        try:
            for latency in [float(ms) for ms in args.latency_ms.split(",")]:
                proxy = DelayProxy((host, int(port)), latency / 1000) if latency else None
                url = f"http://127.0.0.1:{proxy.port}" if proxy else endpoint
                settings = StorageSpec(endpoint=url, addressing_style="path")
                uri = f"s3://{bucket}/{prefix}"
                roots = [DataRoot(uri=uri)]
                start = time.perf_counter()
                dataset = scan_roots(roots, args.size, settings)
                scan_s = time.perf_counter() - start
                assert len(dataset.images) == args.images, dataset.problems[:3]
                spec = DataSpec(roots=roots, resolution=args.size)
                rows = measure(open_storage(uri, settings), settings, dataset, spec, workers)
                results.append({"latency_ms": latency, "scan_s": round(scan_s, 3), "rows": rows})
                if proxy:
                    proxy.close()
        finally:
            if not args.bucket:
                for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
                    for obj in page.get("Contents", []):
                        s3.delete_object(Bucket=bucket, Key=obj["Key"])
                s3.delete_bucket(Bucket=bucket)

    print(
        f"{args.images} JPEGs of {args.size}x{args.size} from {'MinIO (own)' if not args.endpoint else endpoint}, "
        f"batches of {BATCH}, {PREFETCH} prefetched; uploaded in {upload_s:.1f} s; "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(f"{'latency':>8}  {'mode':<18}  {'seconds':>8}  {'images/s':>9}  {'MB/s':>7}")
    for result in results:
        for row in result["rows"]:
            print(
                f"{result['latency_ms']:>6.0f}ms  {row['mode']:<18}  {row['seconds']:>8.2f}  "
                f"{row['images_per_s']:>9.1f}  {row['mb_per_s']:>7.2f}"
            )
        print(f"{result['latency_ms']:>6.0f}ms  scan (16 threads): {result['scan_s']:.2f} s")
    output = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "images": args.images,
        "size": args.size,
        "batch": BATCH,
        "prefetch": PREFETCH,
        "endpoint": "own MinIO" if not args.endpoint else endpoint,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(output, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
