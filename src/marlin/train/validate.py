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
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..mae.masking import FACE_STRATEGIES, generate_visible
from ..utils.distributed import derive_seed, is_distributed
from .config import PretrainConfig

if TYPE_CHECKING:
    import numpy as np

__all__ = ["build_val_sets", "heldout_image", "val_indices", "validate"]

log = logging.getLogger("marlin")


def _is_store(path: str) -> bool:
    return (Path(path).expanduser() / "store.json").is_file()


def build_val_sets(cfg: PretrainConfig) -> dict[str, Dataset]:
    """The held-out sets named by `cfg.val.source`, by name; empty when validation is off or nothing is held out.

    ``"auto"``: the ``val`` split of each training store (`marlin prepare` holds out whole identities), one set per
    store that has one, named after the store's folder; none for video folders or synthetic data. Store paths
    (comma-separated): all of their items, one set each. A directory / glob / list of videos: one set ("videos"),
    windows cut as for training. Each set is scored apart, so a mix of easy and hard held-out data stays visible.
    """
    from ..data.datasets import VideoFolderClips, expand_video_sources
    from ..data.store import PretrainDataset

    source = (cfg.val.source or "none").strip()
    if source.lower() == "none":
        return {}
    m = cfg.model
    auto = source.lower() == "auto"
    parts = [s.strip() for s in (cfg.data.source if auto else source).split(",") if s.strip()]
    if all(_is_store(p) for p in parts):
        sets: dict[str, Dataset] = {}
        for p in parts:
            path = Path(p).expanduser()
            ds = PretrainDataset.from_config(path, m, split=None, stride=cfg.data.temporal_sample_rate, mode="eval")
            ds.items = [it for it in ds.items if it.split == "val"] if auto else ds.items
            if ds.items:
                base = path.name or path.resolve().name  # the folder name as given ("." -> its real name)
                name, k = base, 2
                while name in sets:  # two stores with the same folder name
                    name, k = f"{base}_{k}", k + 1
                sets[name] = ds
        return sets
    if auto:  # synthetic data or plain videos: no split to hold out
        return {}
    videos = VideoFolderClips(
        expand_video_sources(source),
        clip_frames=m.clip_frames,
        sample_rate=cfg.data.temporal_sample_rate,
        img_size=m.img_size,
        window_stride=cfg.data.window_stride,
    )
    return {"videos": videos}


def val_indices(n: int, max_clips: int) -> list[int]:
    """At most `max_clips` indices spread evenly over ``range(n)`` (all of them when n <= max_clips)."""
    if n <= max_clips:
        return list(range(n))
    return sorted({round(i * (n - 1) / (max_clips - 1)) for i in range(max_clips)}) if max_clips > 1 else [0]


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
    m, parse = cfg.model, item.get("parse")
    face = cfg.mask.strategy in FACE_STRATEGIES
    strategy = cfg.mask.strategy if (not face or parse is not None) else "tube"
    return generate_visible(
        strategy, 1, parse=parse[None] if face and parse is not None else None, mask_ratio=cfg.mask.ratio,
        clip_frames=m.clip_frames, tubelet=m.tubelet_size, img_size=m.img_size, patch=m.patch_size,
        generator=torch.Generator().manual_seed(derive_seed(cfg.seed, "val", index)),
    )  # fmt: skip


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
