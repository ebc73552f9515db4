"""Images to latents with the frozen VAE, optionally cached (`spec.training.cacheLatents`).

The cache holds the VAE's latent distribution (mean and log-variance) per (image index,
flipped), not a sampled latent, so a cached run still draws a fresh latent from the
distribution every time, from the same generator and in the same order as an uncached run.
Cached images are encoded one at a time, so a cached value does not depend on which batch
first met the image: a resumed run that refills the cache gets bit-identical values.

The cache lives in memory on the CPU for now; keying it by the image's storage ETag and
keeping it on local disk comes with the S3 data work. Called by `step`.
"""

from __future__ import annotations

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

CacheKey = tuple[int, bool]


class LatentCache:
    """(image index, flipped) -> latent distribution parameters [2C, h, w] on the CPU."""

    def __init__(self) -> None:
        self._store: dict[CacheKey, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def parameters(
        self, vae: AutoencoderKL, pixels: torch.Tensor, keys: list[CacheKey]
    ) -> torch.Tensor:
        """Distribution parameters for a batch, encoding only images not seen before."""
        rows = []
        for i, key in enumerate(keys):
            cached = self._store.get(key)
            if cached is None:
                self.misses += 1
                cached = vae.encode(pixels[i : i + 1]).latent_dist.parameters[0].to("cpu")
                self._store[key] = cached
            else:
                self.hits += 1
            rows.append(cached)
        return torch.stack(rows).to(pixels.device)


@torch.no_grad()
def encode(
    vae: AutoencoderKL,
    pixels: torch.Tensor,
    generator: torch.Generator,
    cache: LatentCache | None = None,
    keys: list[CacheKey] | None = None,
) -> torch.Tensor:
    """Scaled fp32 latents sampled from the VAE's posterior for `pixels` in [-1, 1]."""
    if cache is not None and keys is not None:
        distribution = DiagonalGaussianDistribution(cache.parameters(vae, pixels, keys))
    else:
        distribution = vae.encode(pixels).latent_dist
    latents = distribution.sample(generator=generator).float()
    return latents * vae.config["scaling_factor"]
