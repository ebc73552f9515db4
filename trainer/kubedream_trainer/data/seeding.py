"""Deterministic random generators derived from (seed, epoch, ...) tuples.

Every random choice of the data layer (fractional multiplier draws, batch order, flips,
caption dropout, tag shuffles, substitutes for corrupt images) comes from a generator
named by what it decides, so a resumed or distributed run recomputes exactly the same
choices. Python's `hash()` is salted per process, so the parts are hashed with SHA-256.
"""

from __future__ import annotations

import hashlib
import random


def derive_seed(*parts: object) -> int:
    """A 64-bit seed that depends on every part (their repr, so 1 and "1" differ)."""
    digest = hashlib.sha256(repr(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def derive_rng(*parts: object) -> random.Random:
    """A `random.Random` seeded by `derive_seed(*parts)`."""
    return random.Random(derive_seed(*parts))
