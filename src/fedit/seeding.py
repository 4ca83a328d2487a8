"""Per-purpose random generators derived from the run seed; the global RNGs are never reseeded."""

from __future__ import annotations

import zlib

import numpy as np


def _key(part: int | str) -> int:
    return zlib.crc32(part.encode()) if isinstance(part, str) else int(part)


def derive_seed(seed: int, *parts: int | str) -> int:
    """A 63-bit seed for (run seed, purpose, round, client, ...); stable across processes."""
    seq = np.random.SeedSequence([_key(seed) & 0xFFFFFFFF, *(_key(p) for p in parts)])
    hi, lo = (int(x) for x in seq.generate_state(2, dtype=np.uint32))
    return ((hi << 32) | lo) & ((1 << 63) - 1)


def generator(seed: int, *parts: int | str) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *parts))
