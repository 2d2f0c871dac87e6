"""Held-out reconstruction error during pretraining.

The training loss alone cannot tell learning faces from memorising clips; the hidden-patch error on clips the run
never trains on can. Every `val.every` steps (and at the end) the trainer evaluates a fixed set of held-out clips —
one centred window each, masked with the run's strategy by a generator seeded from the clip's position, so every
evaluation sees the same pixels and masks — and logs, next to the error, what trivial predictors score:

- raw-pixel targets: ``val/mse`` (= the training objective) against ``val/clip_mean_mse`` (every hidden pixel
  predicted as the clip's per-channel mean colour) and ``val/visible_mean_mse`` (the mean of the visible pixels);
- normalised targets: ``val/rec`` against ``val/patch_mean_rec``, the error of predicting each hidden patch's own
  mean (about 1 by construction), a stronger baseline that uses the answer's mean.

Clips are split over ranks and the sums all-reduced, so a torchrun job logs the same numbers as one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..mae.masking import Masker
from ..utils.distributed import is_distributed
from ..utils.seeding import derive_seed
from .config import PretrainConfig

if TYPE_CHECKING:
    import numpy as np

__all__ = ["heldout_image", "validate"]

log = logging.getLogger("marlin")


def _clip_metrics(video: Tensor, visible: Tensor, pred: Tensor, cfg: PretrainConfig) -> dict[str, float]:
    """Per-clip error of `pred` and of the trivial predictors (see the module docstring)."""
    from ..mae.losses import masked_targets
    from ..viz.reconstruct import masked_patch_mse

    m = cfg.model
    if not cfg.loss.norm_target:
        return masked_patch_mse(video, visible, pred, m)
    target = masked_targets(video[None], visible[None], m.tubelet_size, m.patch_size, normalize=True)[0]
    return {
        "rec": torch.mean((pred.float() - target) ** 2).item(),  # [N_hidden, P]
        "patch_mean_rec": torch.mean(target**2).item(),
    }


def _clip_mask(item: dict[str, Any], index: int, cfg: PretrainConfig) -> Tensor:
    """The fixed mask ``[1, N]`` of held-out clip `index`: the run's strategy (tube without parse maps), seeded by
    the clip's position so every evaluation, on any number of ranks, hides the same patches."""
    masker, parse = Masker.for_config(cfg.model, cfg.mask.strategy, cfg.mask.ratio), item.get("parse")
    if masker.needs_parse and parse is None:
        masker = dataclasses.replace(masker, strategy="tube")
    return masker.seeded([derive_seed(cfg.seed, "val", index)], parse[None] if parse is not None else None)


@torch.no_grad()
def heldout_image(
    model: nn.Module, dataset: Dataset, index: int, cfg: PretrainConfig, *, autocast: Any = None
) -> np.ndarray:
    """Ground truth | masked input | reconstruction of held-out clip `index` (its evaluation mask), ``[H, W, 3]``
    uint8: what the model makes of a clip it never trained on."""
    from ..viz.reconstruct import reconstruction_views, render_grid

    item = dataset[index]
    visible = _clip_mask(item, index, cfg)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with autocast if autocast is not None else contextlib.nullcontext():
            pred = model(item["video"][None].to(device), visible.to(device)).float().cpu()  # [1, N_hidden, P]
    finally:
        model.train(was_training)
    views = reconstruction_views(item["video"], visible[0], pred[0], cfg.model, norm_target=cfg.loss.norm_target)
    return render_grid(*views, labels=False)


@torch.no_grad()
def validate(
    model: nn.Module,
    dataset: Dataset,
    indices: Sequence[int],
    cfg: PretrainConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    autocast: Any = None,
    prefix: str = "val/",
) -> dict[str, float]:
    """Mean held-out metrics over `indices` of `dataset` (this rank takes ``indices[rank::world_size]``).

    Returns ``{"<prefix><name>": value, "<prefix>clips": n}``; names as in the module docstring. Face strategies fall
    back to tube masking on data without parse maps.
    """
    device = next(model.parameters()).device
    mine = list(indices)[rank::world_size]
    sums: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(mine), cfg.batch_size):
            chunk = mine[start : start + cfg.batch_size]
            items = [dataset[i] for i in chunk]
            video = torch.stack([it["video"] for it in items])  # [b, 3, T, H, W]
            visible = torch.cat([_clip_mask(it, i, cfg) for it, i in zip(items, chunk, strict=True)])  # [b, N]
            with autocast if autocast is not None else contextlib.nullcontext():
                pred = model(video.to(device), visible.to(device))  # [b, N_hidden, P]
            pred = pred.float().cpu()
            for j in range(video.shape[0]):
                for k, v in _clip_metrics(video[j], visible[j], pred[j], cfg).items():
                    sums[k] = sums.get(k, 0.0) + v
    finally:
        model.train(was_training)
    names = ["patch_mean_rec", "rec"] if cfg.loss.norm_target else ["clip_mean_mse", "mse", "visible_mean_mse"]
    totals = torch.tensor([sums.get(n, 0.0) for n in names] + [float(len(mine))], dtype=torch.float64)
    if is_distributed():
        totals = totals.to(device)
        torch.distributed.all_reduce(totals, op=torch.distributed.ReduceOp.SUM)
        totals = totals.cpu()
    count = totals[-1].item()
    if count == 0:
        return {}
    out = {f"{prefix}{n}": (totals[i] / count).item() for i, n in enumerate(names)}
    out[f"{prefix}clips"] = count
    return out
