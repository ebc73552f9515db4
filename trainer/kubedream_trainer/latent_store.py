"""Cached latents that outlive the process: `<output>/cache/latents/<vae>/`, one small
safetensors object per (image, flip), so a resumed or restarted `cacheLatents` run does
not encode its images again.

An entry's name is a hash of everything its value depends on: the image (data root URI,
key and storage ETag, so an edited image gets a new entry), its bucket (the crop), whether
it is flipped, and the folder `<vae>` is the VAE's identity (a hash of its config and
weights) plus the code that turns files into pixels (data/images.py, data/loader.py). The
value is what `latents.LatentCache` keeps in memory (the distribution's mean and
log-variance for one image, encoded alone), so an entry read back is bit-identical to a
fresh encoding on the same hardware.

The entries that exist are listed once when the store opens; entries are written in the
background by a few threads with a bounded queue, so training does not wait on S3, and a
write that fails only costs an encoding next time (with one warning). Opened by `loop`
when `spec.training.cacheLatents` is on; read and written by `latents.LatentCache`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from .data import Dataset
from .latents import CacheKey
from .storage import Storage, StorageError, join_uri

log = logging.getLogger(__name__)

LATENTS = "cache/latents"
"""Folder under the output."""
FORMAT = 1
"""Bump when an entry's layout or meaning changes."""
PENDING_WRITES = 64
"""Entries waiting to be written at most; `put` blocks beyond that."""
_PIXEL_CODE = ("data/images.py", "data/loader.py")


def vae_identity(vae: torch.nn.Module, config: dict[str, object]) -> str:
    """A hash of the VAE's config and weights and of the pixel pipeline's code."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(f"format={FORMAT}".encode())
    here = Path(__file__).parent
    for name in _PIXEL_CODE:
        digest.update((here / name).read_bytes())
    for name, tensor in sorted(vae.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:20]


class LatentStore:
    """Latent distribution parameters under `<output>/cache/latents/<vae>/`."""

    def __init__(self, storage: Storage, dataset: Dataset, writers: int = 2) -> None:
        self.storage = storage
        self.dataset = dataset
        self._existing = {info.key for info in storage.list()}
        self._writers = writers
        self._pool = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="kd-latents")
        self._slots = threading.BoundedSemaphore(PENDING_WRITES)
        self._lock = threading.Lock()
        self._warned = False
        self.written = 0
        """Entries written by this process."""

    @classmethod
    def open(cls, output: Storage, dataset: Dataset, vae: torch.nn.Module) -> LatentStore:
        """The store for this VAE under `output`."""
        config = dict(getattr(vae, "config", {}))
        return cls(output.child(f"{LATENTS}/{vae_identity(vae, config)}"), dataset)

    def __len__(self) -> int:
        return len(self._existing)

    def name(self, key: CacheKey) -> str:
        index, flipped = key
        image = self.dataset.images[index]
        blob = json.dumps([image.root_uri, image.key, image.etag, image.bucket, flipped])
        digest = hashlib.sha256(blob.encode()).hexdigest()[:32]
        return f"{digest[:2]}/{digest}.safetensors"

    def get(self, key: CacheKey) -> torch.Tensor | None:
        """The stored parameters, or None when there are none (or they cannot be read)."""
        name = self.name(key)
        if name not in self._existing:
            return None
        try:
            return load_tensors(self.storage.read_bytes(name))["parameters"]
        except (FileNotFoundError, KeyError, SafetensorError, StorageError) as exc:
            log.warning("ignoring cached latents %s: %s", join_uri(self.storage.uri, name), exc)
            self._existing.discard(name)
            return None

    def put(self, key: CacheKey, parameters: torch.Tensor) -> None:
        """Write the parameters in the background (blocks while too many writes are pending)."""
        name = self.name(key)
        if name in self._existing:
            return
        self._existing.add(name)
        data = save_tensors({"parameters": parameters.detach().to("cpu").contiguous()})
        self._slots.acquire()
        self._pool.submit(self._write, name, data)

    def _write(self, name: str, data: bytes) -> None:
        try:
            self.storage.write_bytes(name, data)
            with self._lock:
                self.written += 1
        except (OSError, StorageError) as exc:
            self._existing.discard(name)
            with self._lock:
                warn, self._warned = not self._warned, True
            if warn:
                log.warning("could not save cached latents (they are recomputed): %s", exc)
        finally:
            self._slots.release()

    def flush(self) -> None:
        """Wait for every pending write."""
        self._pool.shutdown(wait=True)
        self._pool = ThreadPoolExecutor(self._writers, thread_name_prefix="kd-latents")
