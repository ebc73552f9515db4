"""Cached latents in storage (latent_store): bit-identical round trips, names that change
with whatever the value depends on, and a second cache that encodes nothing."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

from kubedream_trainer.data import Dataset
from kubedream_trainer.latent_store import LatentStore, vae_identity
from kubedream_trainer.latents import LatentCache
from kubedream_trainer.storage import open_storage
from kubedream_trainer.tiny import tiny_configs
from tests.trainer.data.helpers import synthetic_dataset


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(**tiny_configs("sd1")["vae"]).eval()


@pytest.fixture
def dataset() -> Dataset:
    return synthetic_dataset({"cats": (3, 1.0)}, buckets=((64, 64),), resolution=64)


def _pixels(n: int) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1


def test_entries_round_trip_bit_identical(
    tmp_path: Path, vae: AutoencoderKL, dataset: Dataset
) -> None:
    output = open_storage(str(tmp_path / "out"))
    pixels = _pixels(3)
    keys = [(0, False), (1, True), (2, False)]
    first = LatentCache(LatentStore.open(output, dataset, vae))
    with torch.no_grad():
        encoded = first.parameters(vae, pixels, keys)
    assert (first.misses, first.loaded) == (3, 0)
    assert isinstance(first.backing, LatentStore)
    first.backing.flush()
    assert first.backing.written == 3
    files = sorted((tmp_path / "out/cache/latents").rglob("*.safetensors"))
    assert len(files) == 3

    second = LatentCache(LatentStore.open(output, dataset, vae))
    with torch.no_grad():
        again = second.parameters(vae, torch.zeros_like(pixels), keys)  # pixels ignored on hits
    assert (second.misses, second.hits, second.loaded) == (0, 3, 3)
    assert torch.equal(again, encoded)


def test_names_change_with_the_image_bucket_and_flip(tmp_path: Path, dataset: Dataset) -> None:
    store = LatentStore(open_storage(str(tmp_path)), dataset)
    base = store.name((0, False))
    assert store.name((0, True)) != base
    assert store.name((1, False)) != base
    for changed in (
        replace(dataset.images[0], etag="edited"),
        replace(dataset.images[0], bucket=(128, 64)),
        replace(dataset.images[0], root_uri="s3://elsewhere/data"),
    ):
        other = replace(dataset, images=(changed, *dataset.images[1:]))
        assert LatentStore(open_storage(str(tmp_path)), other).name((0, False)) != base
    same = replace(dataset.images[0], caption="a new caption", multiplier=3.0)
    other = replace(dataset, images=(same, *dataset.images[1:]))
    assert LatentStore(open_storage(str(tmp_path)), other).name((0, False)) == base


def test_the_vae_identity_follows_its_weights(vae: AutoencoderKL) -> None:
    config = dict(vae.config)
    before = vae_identity(vae, config)
    assert vae_identity(vae, config) == before
    changed = AutoencoderKL(**tiny_configs("sd1")["vae"])
    changed.load_state_dict(vae.state_dict())
    assert vae_identity(changed, config) == before
    with torch.no_grad():
        next(changed.parameters()).add_(1e-3)
    assert vae_identity(changed, config) != before


def test_an_unreadable_entry_is_encoded_again(
    tmp_path: Path, vae: AutoencoderKL, dataset: Dataset
) -> None:
    output = open_storage(str(tmp_path / "out"))
    store = LatentStore.open(output, dataset, vae)
    with torch.no_grad():
        LatentCache(store).parameters(vae, _pixels(1), [(0, False)])
    store.flush()
    (entry,) = (tmp_path / "out/cache/latents").rglob("*.safetensors")
    entry.write_bytes(b"garbage")
    cache = LatentCache(LatentStore.open(output, dataset, vae))
    with torch.no_grad():
        cache.parameters(vae, _pixels(1), [(0, False)])
    assert (cache.misses, cache.loaded) == (1, 0)
