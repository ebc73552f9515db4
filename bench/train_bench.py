"""Benchmark: end-to-end training throughput of the real trainer against the bare-loop ceiling.

    python bench/train_bench.py                       # GPU: SD1.5 at 512 and SDXL at 1024
    python bench/train_bench.py --models sd15         # one model (fits the device's 10 min/call)
    python bench/train_bench.py --smoke               # CPU, tiny models, under a minute

What it does, from a fresh clone (needs `pip install -e '.[train]'` with a CUDA torch; no
network, nothing downloaded):

1. Object storage: when the test bed's MinIO binary is there (`make testbed-bins`, or
   `KUBEDREAM_MINIO_BINARY`), it starts a MinIO of its own and trains from
   `s3://bench/data`; otherwise it reads the data root from local disk and says so (the GPU
   machine has neither Go nor network, so it usually cannot build MinIO).
2. Data: N images (`--images`) at mixed aspect ratios (1:1, 4:3, 3:4, 3:2, 2:3, 16:9) as
   JPEGs larger than the training resolution, with caption files.
3. Models: a diffusers folder with random weights and the published architectures, built in
   code from their config values (SD1.5: UNet 860M, VAE, CLIP ViT-L/14 text; SDXL: UNet
   2.6B, VAE, CLIP ViT-L + OpenCLIP ViT-bigG text): throughput does not depend on the
   weights. `--smoke` builds the tiny configs of `kubedream_trainer.tiny` the same way.
4. Training: `python -m kubedream_trainer.cli train JOB` (the real trainer, in a
   subprocess) with the text encoders frozen, bf16 autocast, fused AdamW, once with
   `cacheLatents` and once without (`--cache`), for `--steps` steps. The trainer writes one
   line per step to `KUBEDREAM_METRICS_FILE` (`kubedream_trainer.metrics`).
5. Steady state: steps after the warm-up (and, with latent caching, after the first epoch,
   which fills the cache). Reported: images/s, median step time, data-loader wait per step,
   peak GPU memory, GPU idle fraction (1 - busy, from `nvidia-smi` utilisation samples in
   the window when available, else 1 - step time / wall time from the trainer's own timing).
6. Bare loop: runs `shared/bench/unet_bare_loop.py` (a subprocess; `--bare-loop PATH`) for
   the same GPU, else reads a reference JSON (`--bare-json`), and prints the ratio:
   cached runs against the UNet step alone, uncached ones against UNet step + VAE encode
   (1 / (1/unet + 1/vae) images/s).

Prints one table and writes JSON (`--json`, default `train_bench.json` in `$OUT` or `.`).
Targets (issue #8) are printed next to the numbers; nothing is asserted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "operator"), str(REPO / "trainer")]

import yaml  # noqa: E402
from PIL import Image  # noqa: E402

ASPECTS = [(1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9)]
"""Width:height of the generated images."""

# Published architectures (stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0 configs).
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}
SD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "sample_size": 512,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.18215,
}
CLIP_L: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
CLIP_G: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
SCHEDULER: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

TARGETS = {
    ("sd15", True): "target >= 140 img/s end to end (from S3, latent caching)",
    ("sd15", False): "target >= 0.95 x (bare loop + VAE)",
    ("sdxl", True): "target >= 16 img/s",
    ("sdxl", False): "target >= 16 img/s",
}


def model_configs(family: str, smoke: bool) -> dict[str, dict[str, Any]]:
    """Component configs: the tiny ones for --smoke, else the published architectures."""
    from kubedream_trainer.tiny import tiny_configs

    if smoke:
        return tiny_configs("sdxl" if family == "sdxl" else "sd1")
    if family == "sdxl":
        return {
            "unet": SDXL_UNET,
            "vae": {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025},
            "text_encoder": CLIP_L,
            "text_encoder_2": CLIP_G,
            "scheduler": {**SCHEDULER, "timestep_spacing": "leading"},
        }
    return {"unet": SD15_UNET, "vae": SD_VAE, "text_encoder": CLIP_L, "scheduler": SCHEDULER}


def write_model(folder: Path, family: str, smoke: bool, device: str) -> Path:
    """A diffusers folder with random weights (built on `device`, saved fp32)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    from kubedream_trainer.tiny import tokenizer_files

    if (folder / "model_index.json").is_file():
        return folder
    configs = model_configs(family, smoke)
    vocab, merges = tokenizer_files()  # a small BPE vocabulary: ids stay inside CLIP's
    tokens = folder.parent / f"{folder.name}-tokenizer"
    tokens.mkdir(parents=True, exist_ok=True)
    (tokens / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (tokens / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer.from_pretrained(tokens, model_max_length=77)

    def text(name: str) -> dict[str, Any]:
        config = dict(configs[name])
        config.update(
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        )
        return config

    scheduler_config = {k: v for k, v in configs["scheduler"].items() if not k.startswith("_")}
    with torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**text("text_encoder")))
        pipeline: Any
        if family == "sdxl":
            pipeline = StableDiffusionXLPipeline(
                vae=vae,
                text_encoder=text_encoder,
                text_encoder_2=CLIPTextModelWithProjection(
                    CLIPTextConfig(**text("text_encoder_2"))
                ),
                tokenizer=tokenizer,
                tokenizer_2=CLIPTokenizer.from_pretrained(
                    tokens, model_max_length=77, pad_token="!"
                ),
                unet=unet,
                scheduler=EulerDiscreteScheduler(
                    **{k: v for k, v in scheduler_config.items() if k != "clip_sample"}
                ),
                add_watermarker=False,
            )
        else:
            pipeline = StableDiffusionPipeline(
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                unet=unet,
                scheduler=DDIMScheduler(**scheduler_config),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    pipeline.to("cpu").save_pretrained(staging, safe_serialization=True)
    staging.rename(folder)
    shutil.rmtree(tokens)
    return folder


def write_data(root: Path, count: int, long_side: int, seed: int = 0) -> Path:
    """`count` JPEGs at mixed aspect ratios (16 distinct pictures per ratio, reused under new
    names), each with a caption file."""
    if root.is_dir() and len(list(root.glob("*.jpg"))) == count:
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rng = random.Random(seed)
    encoded: dict[tuple[int, int], list[bytes]] = {}
    for aspect in ASPECTS:
        width = long_side if aspect[0] >= aspect[1] else long_side * aspect[0] // aspect[1]
        height = long_side if aspect[1] >= aspect[0] else long_side * aspect[1] // aspect[0]
        pictures = []
        for _ in range(16):
            small = Image.effect_noise((max(8, width // 16), max(8, height // 16)), 64).convert(
                "RGB"
            )
            tint = Image.new("RGB", small.size, tuple(rng.randrange(256) for _ in range(3)))
            image = Image.blend(small, tint, 0.5).resize((width, height), Image.Resampling.BICUBIC)
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=90)
            pictures.append(buffer.getvalue())
        encoded[aspect] = pictures
    for i in range(count):
        aspect = ASPECTS[i % len(ASPECTS)]
        (root / f"img{i:06d}.jpg").write_bytes(encoded[aspect][(i // len(ASPECTS)) % 16])
        (root / f"img{i:06d}.txt").write_text(f"a photo of subject {i % 97}, style {i % 13}")
    return root


class Minio:
    """The test bed's MinIO for the data root, when its binary exists; else local disk."""

    def __init__(self, work: Path, wanted: bool) -> None:
        self.server: Any = None
        self.note = "local disk (--no-minio)"
        if not wanted:
            return
        binary = os.environ.get("KUBEDREAM_MINIO_BINARY")
        if not binary:
            try:
                from kubedream_operator.devbed.build import BuildError, binary_paths

                found = binary_paths().minio
                binary = str(found) if found.is_file() else None
            except (ImportError, OSError, BuildError, subprocess.SubprocessError) as exc:
                self.note = f"local disk (no MinIO: {exc})"
                return
        if not binary or not Path(binary).is_file():
            self.note = "local disk (the test bed's MinIO binary is not built here)"
            return
        from kubedream_operator.devbed.minio import StandaloneMinio

        self.server = StandaloneMinio(work / "minio", Path(binary))
        self.server.start()
        self.note = f"MinIO at {self.server.endpoint} ({binary})"

    def publish(self, root: Path, prefix: str) -> str:
        """The data root's URI: uploaded to s3://bench/<prefix> when MinIO runs."""
        if self.server is None:
            return str(root)
        client = self.server.client()
        try:
            client.create_bucket(Bucket="bench")
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        for path in sorted(root.iterdir()):
            client.upload_file(str(path), "bench", f"{prefix}/{path.name}")
        return f"s3://bench/{prefix}"

    def storage_spec(self) -> dict[str, Any] | None:
        if self.server is None:
            return None
        return {
            "endpoint": self.server.endpoint,
            "region": self.server.region,
            "addressingStyle": "path",
        }

    def env(self) -> dict[str, str]:
        return dict(self.server.env) if self.server is not None else {}

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


class GpuSampler:
    """`nvidia-smi` utilisation samples (every 100 ms) with wall-clock times."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", "100"],
                stdout=subprocess.PIPE,
            )  # fmt: skip
            self.samples: list[tuple[float, float]] = []
            import threading

            self.thread = threading.Thread(target=self._read, daemon=True)
            self.thread.start()

    def _read(self) -> None:
        stdout = self.proc.stdout if self.proc is not None else None
        for raw in stdout or []:
            try:
                self.samples.append((time.time(), float(raw.decode().split(",")[0])))
            except ValueError:
                continue

    def busy_between(self, start: float, end: float) -> float | None:
        if self.proc is None:
            return None
        window = [busy for t, busy in self.samples if start <= t <= end]
        return statistics.fmean(window) / 100 if window else None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def run_trainer(
    work: Path,
    name: str,
    *,
    model: Path,
    data_uri: str,
    storage: dict[str, Any] | None,
    resolution: int,
    batch_size: int,
    steps: int,
    cache_latents: bool,
    compile_unet: bool,
    optimizer: str,
    gradient_checkpointing: bool,
    device: str,
    workers: int,
    env: dict[str, str],
) -> tuple[list[dict[str, Any]], float]:
    """One `kubedream train` subprocess; returns its metrics lines and wall time."""
    out = work / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    spec: dict[str, Any] = {
        "model": {"base": str(model)},
        "data": {
            "roots": [{"uri": data_uri}],
            "resolution": resolution,
            "loaderWorkers": workers,
            "condDropout": 0.1,
            "flipP": 0.5,
        },
        "training": {
            "maxSteps": steps + 1000,
            "batchSize": batch_size,
            "unetLearningRate": 1e-5,
            "mixedPrecision": "auto",
            "cacheLatents": cache_latents,
            "compile": compile_unet,
            "optimizer": optimizer,
            "gradientCheckpointing": gradient_checkpointing,
            "seed": 1,
        },
        "output": {
            "uri": str(out / "output"),
            "formats": ["diffusers"],
            "keepLast": 1,
            "progressEverySteps": 10,
        },
    }
    if storage is not None:
        spec["storage"] = storage
    job = out / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kubedream.io/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": f"bench-{name}"},
                "spec": spec,
            }
        )
    )
    metrics = out / "metrics.jsonl"
    child_env = {
        **os.environ,
        **env,
        "KUBEDREAM_METRICS_FILE": str(metrics),
        "KUBEDREAM_CACHE_DIR": str(work / "cache"),
        "KUBEDREAM_STAGING_DIR": str(out / "staging"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(
            [str(REPO / "operator"), str(REPO / "trainer"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    started = time.monotonic()
    with (out / "trainer.log").open("w") as log:
        # maxSteps is past `steps`: the trainer is stopped (SIGKILL to the process group it
        # leads) once `steps` metrics lines exist, so no checkpoint is ever written -- a final
        # SDXL checkpoint (weights, optimizer, export) would be ~45 GB, staged then copied.
        proc = subprocess.Popen(
            [sys.executable, "-m", "kubedream_trainer.cli", "train", str(job), "--device", device],
            env=child_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            while proc.poll() is None and _count_lines(metrics) < steps:
                time.sleep(0.2)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    elapsed = time.monotonic() - started
    lines = (
        [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    )
    if len(lines) < steps:
        tail = (out / "trainer.log").read_text()[-3000:]
        raise SystemExit(f"kubedream train exited {proc.returncode} for {name}:\n{tail}")
    shutil.rmtree(out / "output", ignore_errors=True)
    return lines[:steps], elapsed


def _count_lines(path: Path) -> int:
    try:
        with path.open("rb") as fh:
            return sum(1 for line in fh if line.endswith(b"\n"))
    except FileNotFoundError:
        return 0


def steady_state(
    lines: list[dict[str, Any]], warmup: int, epoch_steps: int, cached: bool
) -> list[dict[str, Any]]:
    """Steps after the warm-up; with latent caching also after the cache-filling first epoch."""
    first = max(warmup, epoch_steps if cached else 0)
    return [line for line in lines if line["step"] > first]


def summarise(
    lines: list[dict[str, Any]], window: list[dict[str, Any]], gpu: GpuSampler | None
) -> dict[str, Any]:
    if not window:
        return {"steadySteps": 0}
    images = sum(line["images"] for line in window)
    wall = sum(line["wallSeconds"] for line in window)
    stepped = sum(line["stepSeconds"] for line in window)
    busy = None
    if gpu is not None and "time" in window[0]:
        busy = gpu.busy_between(window[0]["time"] - window[0]["wallSeconds"], window[-1]["time"])
    return {
        "steadySteps": len(window),
        "imagesPerSecond": round(images / wall, 2),
        "stepSecondsMedian": round(statistics.median(line["stepSeconds"] for line in window), 4),
        "wallSecondsMedian": round(statistics.median(line["wallSeconds"] for line in window), 4),
        "dataWaitSecondsMean": round(
            statistics.fmean(line["dataWaitSeconds"] for line in window), 4
        ),
        "peakMemoryGiB": max((line.get("peakMemoryGiB", 0.0) for line in lines), default=None)
        or None,
        "gpuIdleFraction": round(1 - busy, 3) if busy is not None else None,
        "hostIdleEstimate": round(max(0.0, 1 - stepped / wall), 3),
        "gpuIdleSource": "nvidia-smi utilization.gpu" if busy is not None else "trainer timing",
    }


def bare_loop(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any] | None, str]:
    """The bare-loop rows: measured now (CUDA), else a reference JSON, else none."""
    import torch

    if args.smoke:
        return None, "skipped in --smoke (CPU, tiny models: no bare loop to compare with)"
    script = args.bare_loop or next(
        (
            p
            for p in (
                REPO.parent / "shared/bench/unet_bare_loop.py",
                REPO / "shared/bench/unet_bare_loop.py",
            )
            if p.is_file()
        ),
        None,
    )
    if not args.smoke and torch.cuda.is_available() and script is not None and not args.no_bare:
        outdir = work / "bare"
        outdir.mkdir(parents=True, exist_ok=True)
        code = subprocess.call(
            [sys.executable, str(script)], env={**os.environ, "OUT": str(outdir)}
        )
        result = outdir / "gpu_baseline.json"
        if code == 0 and result.is_file():
            return json.loads(result.read_text()), f"measured now with {script}"
    reference = args.bare_json or next(
        (
            p
            for p in (
                REPO.parent / "shared/bench/unet_bare_loop_h200.json",
                REPO / "shared/bench/unet_bare_loop_h200.json",
            )
            if p.is_file()
        ),
        None,
    )
    if reference is not None:
        return json.loads(
            Path(reference).read_text()
        ), f"reference file {reference} (not this machine)"
    return None, "no bare loop (no CUDA or script, and no reference JSON)"


def bare_rate(
    bare: dict[str, Any] | None,
    family: str,
    batch: int,
    compiled: bool,
    cached: bool,
    checkpointing: bool = False,
) -> float | None:
    """Bare-loop images/s for the same model, batch and compile; + VAE encode when uncached."""
    if bare is None:
        return None
    name = "sdxl-unet-1024" if family == "sdxl" else "sd15-unet-512"
    rows = bare["rows"]
    unet = next(
        (
            r["images_per_s"]
            for r in rows
            if r.get("model") == name
            and r.get("batch") == batch
            and r.get("compile") == compiled
            and bool(r.get("grad_ckpt")) == checkpointing
        ),
        None,
    )
    if unet is None or cached:
        return unet
    res = 1024 if family == "sdxl" else 512
    vae = next(
        (
            r["images_per_s"]
            for r in rows
            if r.get("model") == "sd-vae-encode" and r.get("res") == res
        ),
        None,
    )
    return 1 / (1 / unet + 1 / vae) if vae else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny models, < 1 minute")
    parser.add_argument("--models", default="sd15,sdxl", help="comma list of sd15, sdxl")
    parser.add_argument("--images", type=int, help="data root size (SD1.5 512, SDXL 256; smoke 8)")
    parser.add_argument("--steps", type=int, help="steps per run (SD1.5 3 epochs, SDXL 2, + 10)")
    parser.add_argument("--batch-sd15", type=int, default=32)
    parser.add_argument("--batch-sdxl", type=int, default=4)
    parser.add_argument("--cache", help="latent caching runs: on, off or on,off (smoke: on)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    parser.add_argument("--optimizer", default="adamw", help="adamw, adamw8bit or adafactor")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--workers", type=int, default=8, help="data.loaderWorkers")
    parser.add_argument("--warmup", type=int, help="steps left out at the start (5; smoke 2)")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="result file")
    parser.add_argument("--no-minio", action="store_true", help="read the data from local disk")
    parser.add_argument("--no-bare", action="store_true", help="do not run the bare loop")
    parser.add_argument("--bare-loop", type=Path, help="path of unet_bare_loop.py")
    parser.add_argument("--bare-json", type=Path, help="bare-loop JSON to compare against")
    args = parser.parse_args()

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    families = [m.strip() for m in args.models.split(",") if m.strip()]
    cache = args.cache or ("on" if args.smoke else "on,off")
    caches = [c.strip() == "on" for c in cache.split(",") if c.strip()]
    work = args.work or Path(tempfile.mkdtemp(prefix="kd-train-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    out_json = args.json or Path(os.environ.get("OUT", ".")) / "train_bench.json"
    env = {"OMP_NUM_THREADS": "2"} if args.smoke else {}

    minio = Minio(work, wanted=not args.no_minio)
    gpu = GpuSampler(work / "nvidia-smi.log") if device.startswith("cuda") else None
    print(f"data source: {minio.note}", flush=True)
    rows: list[dict[str, Any]] = []
    try:
        for family in families:
            resolution = 64 if args.smoke else (1024 if family == "sdxl" else 512)
            batch = 2 if args.smoke else (args.batch_sdxl if family == "sdxl" else args.batch_sd15)
            started = time.monotonic()
            model = write_model(
                work / "models" / f"{family}{'-tiny' if args.smoke else ''}",
                family,
                args.smoke,
                device,
            )
            print(f"{family}: model folder ready in {time.monotonic() - started:.0f}s", flush=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # the trainer subprocess needs the memory
            images = args.images or (8 if args.smoke else (256 if family == "sdxl" else 512))
            root = write_data(work / "data" / str(resolution), images, resolution * 3 // 2)
            data_uri = minio.publish(root, f"data-{resolution}")
            epoch_steps = -(-images // batch)  # upper bound: buckets may leave partial batches
            epochs = 1 if args.smoke else (2 if family == "sdxl" else 3)
            steps = args.steps or epoch_steps * epochs + (3 if args.smoke else 10)
            for cached in caches:
                name = f"{family}-{'cached' if cached else 'uncached'}"
                lines, elapsed = run_trainer(
                    work,
                    name,
                    model=model,
                    data_uri=data_uri,
                    storage=minio.storage_spec(),
                    resolution=resolution,
                    batch_size=batch,
                    steps=steps,
                    cache_latents=cached,
                    compile_unet=args.compile,
                    optimizer=args.optimizer,
                    gradient_checkpointing=args.gradient_checkpointing,
                    device=device,
                    workers=args.workers,
                    env={**env, **minio.env()},
                )
                warmup = args.warmup if args.warmup is not None else (2 if args.smoke else 5)
                window = steady_state(lines, warmup, epoch_steps, cached)
                row = {
                    "run": name,
                    "images": images,
                    "family": family,
                    "resolution": resolution,
                    "batch": batch,
                    "cacheLatents": cached,
                    "compile": args.compile,
                    "optimizer": args.optimizer,
                    "gradientCheckpointing": args.gradient_checkpointing,
                    "steps": len(lines),
                    "runSeconds": round(elapsed, 1),
                    **summarise(lines, window, gpu),
                    "target": TARGETS[(family, cached)],
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        if gpu is not None:
            gpu.stop()
        minio.stop()

    bare, bare_note = bare_loop(args, work)
    for row in rows:
        rate = bare_rate(
            bare,
            row["family"],
            row["batch"],
            row["compile"],
            row["cacheLatents"],
            row["gradientCheckpointing"],
        )
        row["bareImagesPerSecond"] = round(rate, 2) if rate else None
        measured = row.get("imagesPerSecond")
        row["ratioToBare"] = round(measured / rate, 3) if rate and measured else None

    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "torch": torch.__version__,
        },
        "smoke": args.smoke,
        "dataSource": minio.note,
        "bareLoop": bare_note,
        "rows": rows,
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=1) + "\n")

    header = (
        f"{'run':<16} {'batch':>5} {'img/s':>8} {'step s':>7} {'wait s':>7} {'peak GiB':>8} "
        f"{'GPU idle':>8} {'bare':>7} {'ratio':>6}  target"
    )
    print(f"\n{result['date']}  {result['machine']['device']}  data: {minio.note}")
    print(f"bare loop: {bare_note}")
    print(header)
    print("-" * len(header))

    def fmt(value: Any, spec: str) -> str:
        width = int(spec.split(".")[0])
        return format(value, spec) if isinstance(value, int | float) else "-".rjust(width)

    for row in rows:
        idle = row.get("gpuIdleFraction")
        idle = idle if idle is not None else row.get("hostIdleEstimate")
        print(
            f"{row['run']:<16} {row['batch']:>5} {fmt(row.get('imagesPerSecond'), '8.2f')} "
            f"{fmt(row.get('stepSecondsMedian'), '7.3f')} {fmt(row.get('dataWaitSecondsMean'), '7.3f')} "
            f"{fmt(row.get('peakMemoryGiB'), '8.1f')} {fmt(idle, '8.3f')} "
            f"{fmt(row.get('bareImagesPerSecond'), '7.1f')} {fmt(row.get('ratioToBare'), '6.2f')}  "
            f"{row['target']}"
        )
    print(f"\nwritten: {out_json}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
