"""Images to latents with the frozen VAE, optionally cached (`spec.training.cacheLatents`).

The cache holds the VAE's latent distribution (mean and log-variance) per (image index,
flipped), not a sampled latent, so a cached run still draws a fresh latent from the
distribution every time, from the same generator and in the same order as an uncached run.
Cached images are encoded one at a time, so a cached value does not depend on which batch
first met the image: a resumed run that refills the cache gets bit-identical values.

The cache lives in memory on the CPU; with a backing store (`latent_store.LatentStore`,
under the output, keyed by the image's ETag, bucket, flip and the VAE's identity) entries
are also read from and written to storage, so a resumed run does not encode again.
Called by `step`.
"""

from __future__ import annotations

from typing import Protocol

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

CacheKey = tuple[int, bool]


class LatentBacking(Protocol):
    """Where cached parameters persist beyond the process (see `latent_store`)."""

    def get(self, key: CacheKey) -> torch.Tensor | None: ...

    def put(self, key: CacheKey, parameters: torch.Tensor) -> None: ...

    def flush(self) -> None: ...


class LatentCache:
    """(image index, flipped) -> latent distribution parameters [2C, h, w] on the CPU."""

    def __init__(self, backing: LatentBacking | None = None) -> None:
        self._store: dict[CacheKey, torch.Tensor] = {}
        self.backing = backing
        self.hits = 0
        """Images not encoded (found in memory or in the backing store)."""
        self.misses = 0
        """Images encoded."""
        self.loaded = 0
        """Hits read from the backing store."""

    def attach(self, backing: LatentBacking) -> None:
        """Read from and write to `backing` from now on."""
        self.backing = backing

    def flush(self) -> None:
        """Wait until every entry handed to the backing store is written."""
        if self.backing is not None:
            self.backing.flush()

    def __len__(self) -> int:
        return len(self._store)

    def parameters(
        self,
        vae: AutoencoderKL,
        pixels: torch.Tensor,
        keys: list[CacheKey],
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """Distribution parameters for a batch on `device` (default: the pixels'), encoding only
        images not seen before. Pixels may stay on the host: only a missing image is copied to
        the device, so a warm cache moves no pixels at all."""
        device = pixels.device if device is None else device
        rows = []
        for i, key in enumerate(keys):
            cached = self._store.get(key)
            if cached is None and self.backing is not None:
                cached = self.backing.get(key)
                if cached is not None:
                    self.loaded += 1
                    self._store[key] = cached
            if cached is None:
                self.misses += 1
                image = pixels[i : i + 1].to(device, dtype=vae.dtype)
                cached = vae.encode(image).latent_dist.parameters[0].to("cpu")
                self._store[key] = cached
                if self.backing is not None:
                    self.backing.put(key, cached)
            else:
                self.hits += 1
            rows.append(cached)
        stacked = torch.stack(rows)
        if device.type == "cuda":  # page-locked, so the copy does not stall the host
            stacked = stacked.pin_memory()
        return stacked.to(device, non_blocking=True)


@torch.no_grad()
def encode(
    vae: AutoencoderKL,
    pixels: torch.Tensor,
    generator: torch.Generator,
    cache: LatentCache | None = None,
    keys: list[CacheKey] | None = None,
) -> torch.Tensor:
    """Scaled fp32 latents sampled from the VAE's posterior for `pixels` in [-1, 1], on the
    generator's device (`pixels` may be on the host)."""
    device = generator.device
    if cache is not None and keys is not None:
        distribution = DiagonalGaussianDistribution(cache.parameters(vae, pixels, keys, device))
    else:
        distribution = vae.encode(pixels.to(device, dtype=vae.dtype, non_blocking=True)).latent_dist
    latents = distribution.sample(generator=generator).float()
    return latents * vae.config["scaling_factor"]
