"""Seeds and RNG states: runs are reproducible because every random draw is a pure function of named keys.

:func:`derive_seed` turns keys such as ``(seed, "mask", step, position)`` into an independent 63-bit seed, so a
sample's mask, a clip's start or an epoch's permutation do not depend on how work is split over processes, workers
or micro-steps; :func:`capture_rng` / :func:`restore_rng` carry the process-wide generators through a checkpoint.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng", "derive_seed", "restore_rng"]


def derive_seed(*keys: int | str) -> int:
    """A 63-bit seed from a tuple of keys (e.g. seed, step, sample position), independent across keys."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def capture_rng() -> dict[str, Any]:
    """This process's RNG states as tensors / plain containers (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
