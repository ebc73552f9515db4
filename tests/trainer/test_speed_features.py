"""Speed features change nothing but speed: latent caching, torch.compile, the channels-last
UNet layout and fused AdamW train (within numerical tolerance, or bit-identically where the
arithmetic is the same) what the plain path trains."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from kubedream_operator.spec import TrainingSpec
from kubedream_trainer.optim import build_optimizer, param_groups

from .conftest import train, write_job

pytestmark = pytest.mark.usefixtures("trainer_env")

LR = 1e-4
"""unetLearningRate of conftest's jobs."""


def _run(
    tmp_path: Path,
    data_root: Path,
    name: str,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str] | None = None,
    data: dict[str, Any] | None = None,
    **training: Any,
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Train 3 steps; the per-step losses and the final raw UNet weights."""
    metrics = tmp_path / f"{name}.jsonl"
    with monkeypatch.context() as patch:
        patch.setenv("KUBEDREAM_METRICS_FILE", str(metrics))
        for key, value in (env or {}).items():
            patch.setenv(key, value)
        job = write_job(
            tmp_path / f"{name}.yaml",
            data_root,
            tmp_path / name,
            data=data or {},
            training={"maxSteps": 3, **training},
            output={"formats": ["diffusers"]},
        )
        assert train(job) == 0
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    weights = load_file(tmp_path / name / "checkpoints/step-3/training_state/unet.safetensors")
    return losses, weights


def _assert_close(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float, exact: bool = False
) -> None:
    """Every tensor equal (`exact`) or within `atol` (the worst difference is reported)."""
    assert a.keys() == b.keys()
    if exact:
        for key in a:
            assert torch.equal(a[key], b[key]), key
        return
    worst, where = max(((a[k] - b[k]).abs().max().item(), k) for k in a)
    assert worst <= atol, f"{where}: differs by {worst:.3g} > {atol:.3g}"


@pytest.mark.slow
def test_cached_latents_train_what_uncached_ones_do(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Cached images are encoded one at a time, uncached ones as a batch: the same posterior up
    # to float rounding, sampled from the same generator in the same order.
    flips = {"flipP": 0.5}
    plain = _run(tmp_path, data_root, "plain", monkeypatch, data=flips)
    cached = _run(tmp_path, data_root, "cached", monkeypatch, data=flips, cacheLatents=True)
    assert cached[0] == pytest.approx(plain[0], rel=1e-5)
    # AdamW normalises each update, so where a gradient is ~0 rounding can flip its sign: the
    # weights may differ by up to the learning rate per step, never more.
    _assert_close(plain[1], cached[1], atol=3 * LR)


@pytest.mark.slow
def test_compiled_unet_trains_bit_identically_with_the_eager_backend(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # KUBEDREAM_COMPILE_BACKEND=eager (the test environment's choice): dynamo captures the
    # graph and runs the same kernels, so any difference is a capture bug, not rounding.
    env = {"KUBEDREAM_COMPILE_BACKEND": "eager"}
    plain = _run(tmp_path, data_root, "plain", monkeypatch, env)
    compiled = _run(tmp_path, data_root, "compiled", monkeypatch, env, compile=True)
    assert compiled[0] == plain[0]
    _assert_close(plain[1], compiled[1], atol=0.0, exact=True)


@pytest.mark.slow
def test_channels_last_unet_trains_what_the_default_layout_does(
    tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    off = _run(tmp_path, data_root, "off", monkeypatch, {"KUBEDREAM_CHANNELS_LAST": "off"})
    on = _run(tmp_path, data_root, "on", monkeypatch, {"KUBEDREAM_CHANNELS_LAST": "on"})
    assert on[0] == pytest.approx(off[0], rel=1e-5)
    _assert_close(off[1], on[1], atol=3 * LR)
    # The checkpoint is written in the ordinary contiguous layout.
    diffusers = load_file(
        tmp_path / "on/checkpoints/step-3/unet/diffusion_pytorch_model.safetensors"
    )
    assert diffusers["conv_in.weight"].is_contiguous()


def test_channels_last_gives_the_same_prediction_and_gradients() -> None:
    from diffusers import UNet2DConditionModel

    from kubedream_trainer.tiny import tiny_model_dir

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, 32, generator=generator)
    timesteps = torch.tensor([10, 900])
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        unet = UNet2DConditionModel.from_pretrained(tiny_model_dir("sd1"), subfolder="unet")
        unet.to(memory_format=layout)
        prediction = unet(latents, timesteps, context).sample
        prediction.square().mean().backward()
        grads = {name: p.grad.clone() for name, p in unet.named_parameters() if p.grad is not None}
        results.append((prediction.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], rtol=1e-3, atol=1e-6, msg=name)


def test_cached_parameters_match_batch_encoding() -> None:
    from diffusers import AutoencoderKL

    from kubedream_trainer.latents import LatentCache
    from kubedream_trainer.tiny import tiny_model_dir

    vae = AutoencoderKL.from_pretrained(tiny_model_dir("sd1"), subfolder="vae")
    pixels = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        batch = vae.encode(pixels).latent_dist.parameters
        cached = LatentCache().parameters(vae, pixels, [(0, False), (1, False), (2, True)])
    torch.testing.assert_close(cached, batch, rtol=1e-4, atol=1e-5)


def test_adamw_is_fused_on_cuda_only_and_fused_matches_unfused() -> None:
    spec = TrainingSpec(unet_learning_rate=1e-2, max_steps=3)

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 1))

    results = []
    for device, expected in ((torch.device("cpu"), False), (torch.device("cuda"), True)):
        net = model()
        # build_optimizer decides from the device; the parameters stay on the CPU here, where
        # torch has a fused AdamW kernel too, so both paths can run without a GPU.
        optimizer = build_optimizer(spec, param_groups(spec, net.parameters(), None), device)
        assert bool(optimizer.defaults["fused"]) is expected
        data = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            net(data).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        results.append(net.state_dict())
    _assert_close(results[0], results[1], atol=1e-6)


def test_threaded_loader_assembles_ahead_and_passes_load_errors_on(tmp_path: Path) -> None:
    from PIL import Image

    from kubedream_operator.spec import DataRoot, DataSpec
    from kubedream_trainer.data import scan_roots
    from kubedream_trainer.data.loader import BatchLoader, ImageLoadError

    for i, size in enumerate([(96, 64), (96, 64), (64, 64), (64, 64)]):
        Image.effect_noise(size, 60).convert("RGB").save(tmp_path / f"{i}.jpg", quality=95)
    dataset = scan_roots([DataRoot(uri=str(tmp_path))], 64)
    spec = DataSpec(roots=[DataRoot(uri=str(tmp_path))], resolution=64)
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(dataset.images):
        by_bucket.setdefault(image.bucket, []).append(index)
    plan = list(by_bucket.values())

    def load(workers: int) -> list[Any]:
        loader = BatchLoader(dataset, plan, data_spec=spec, seed=3, epoch=0, workers=workers)
        assert loader.pin_memory is torch.cuda.is_available()
        return list(loader)

    threaded, serial = load(2), load(0)
    for a, b in zip(threaded, serial, strict=True):
        assert torch.equal(a.pixel_values, b.pixel_values)
        assert a.pixel_values.is_contiguous()
        assert (a.indices, a.original_sizes, a.crop_coords) == (
            b.indices,
            b.original_sizes,
            b.crop_coords,
        )
        assert a.wait_s >= 0
    for path in tmp_path.glob("*.jpg"):
        path.write_bytes(b"not an image")
    with pytest.raises(ImageLoadError):
        load(2)
