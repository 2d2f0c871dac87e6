"""Batching clips, and drawing their token masks per batch in the DataLoader (as vjepa2's ``MaskCollator``).

Masks are made where the data is: in the loader's worker processes, beside decoding, instead of one sample at a time
in the training process. The masking geometry is bound once (a :class:`marlin.mae.masking.Masker`); each sample's
mask still comes from its own generator seeded by ``(seed, "mask", step, position)`` -- its place in the run's
sample stream (:mod:`marlin.data.sampling`) -- so a run gives the same masks on any number of processes, workers or
micro-steps, and a resumed run draws exactly the masks the uninterrupted one would.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..mae.masking import Masker
from ..utils.seeding import derive_seed

__all__ = ["MaskCollator", "collate_clips", "mask_seed"]


def collate_clips(items: list[dict[str, Any]]) -> dict[str, Tensor | None]:
    """Stack items into ``{"video": [B, 3, T, H, W], "parse": [B, T, H, W] or None, "index": [B] or None}``."""
    video = torch.stack([it["video"] for it in items])
    parses = [it.get("parse") for it in items]
    parse = torch.stack(parses) if all(p is not None for p in parses) else None
    index = torch.tensor([it["index"] for it in items]) if all("index" in it for it in items) else None
    return {"video": video, "parse": parse, "index": index}


def mask_seed(seed: int, step: int, position: int) -> int:
    """The seed of the mask of the sample at stream `position` of optimiser step `step`."""
    return derive_seed(seed, "mask", step, position)


class MaskCollator:
    """``collate_fn`` for pretraining: :func:`collate_clips` plus ``"visible"`` ``[B, N]`` bool masks.

    Items carry ``"key": (step, position)`` (see :class:`marlin.data.sampling.KeyedItems`); parse maps are used by
    the face-guided strategies and dropped from the batch otherwise (nothing else needs them).
    """

    def __init__(self, masker: Masker, seed: int) -> None:
        self.masker, self.seed = masker, seed

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Tensor | None]:
        batch = collate_clips(items)
        if self.masker.needs_parse and batch["parse"] is None:
            raise ValueError(f"mask strategy {self.masker.strategy!r} needs parse maps, but the batch has none")
        seeds = [mask_seed(self.seed, *it["key"]) for it in items]
        batch["visible"] = self.masker.seeded(seeds, batch["parse"] if self.masker.needs_parse else None)  # [B, N]
        batch["key"] = torch.tensor([it["key"] for it in items])  # [B, 2] (step, position)
        return batch
