"""Fine-tuning a MARLIN encoder with a linear head on a labelled video set (``marlin finetune``).

The model is the encoder followed by one linear layer on the clip feature that ``Marlin.extract_features`` defines
(mean over the tokens, then the encoder's final LayerNorm). Losses per task: cross-entropy (multiclass), BCE with
logits (binary: one output; multilabel: one per label), MSE on train-standardised targets (regression; the model
outputs values in the targets' own units).

Data: each training step takes one random ``clip_frames``-frame clip per video at temporal ``stride`` (a video too
short for that span gets the largest stride that fits, then pads by repeating its last frame); frames are centre-
cropped to a square and resized to the model's ``img_size`` (videos are assumed to be face crops already).
Validation and testing average the head outputs of ``test_clips`` evenly spaced clips per video, so they are
deterministic. Clip choice and flips are seeded by (seed, epoch, video), never by the process, worker or batch.

Distributed: the same code is every rank of a torchrun job (gloo on CPUs, NCCL on GPUs). Each epoch is one seeded
permutation cut into global batches of ``batch_size x world_size``; rank ``r`` takes the ``r``-th slice of each, so
every training video is used exactly once per epoch, and a run on N processes with batch b follows the run on one
process with batch N x b. Evaluation is sharded and gathered, so every rank takes the same early-stopping decisions;
only rank 0 writes files.

Outputs (rank 0, in ``out``): ``best.pt`` (the best epoch by the validation primary metric, written atomically;
:func:`load_finetuned` reads it back, and ``marlin.load`` reads its encoder), ``results.json`` (config, split sizes,
per-epoch history, metrics per split with the best weights) and ``splits.json`` (video ids per split).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..models.config import MarlinConfig
from ..models.encoder import MarlinEncoder
from ..utils.fileio import atomic_write, atomic_write_text, json_safe
from .manifest import SPLITS, LabelSet, read_labels
from .metrics import compute_metrics, primary_metric
from .splits import SplitError, split_indices, subsample

__all__ = [
    "FINETUNE_FORMAT",
    "FinetuneConfig",
    "FinetuneModel",
    "FinetuneResult",
    "ShardedBatchSampler",
    "VideoClips",
    "effective_stride",
    "eval_clip_indices",
    "evaluate",
    "finetune",
    "layer_decay_groups",
    "load_finetuned",
    "predict",
    "read_frames",
    "resolve_splits",
    "train_clip_indices",
]

log = logging.getLogger("marlin")

FINETUNE_FORMAT = "marlin-finetune-v1"
BEST_FILE = "best.pt"
RESULTS_FILE = "results.json"
SPLITS_FILE = "splits.json"


# ---- configuration -------------------------------------------------------------------------------------------------
@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run depends on (stored in ``results.json`` and the checkpoint)."""

    model: str = "marlin_vit_base_ytf"  # registered name, checkpoint file or save_pretrained directory
    random_init: bool = False  # build the named architecture untrained instead of loading weights
    labels: str = ""  # CSV manifest, CelebV-HQ root or GRID folder (see marlin.evaluate.manifest)
    label: tuple[str, ...] = ()  # label column(s), CelebV-HQ task or GRID slot
    task: str | None = None  # None: inferred by the manifest reader
    path_col: str = "path"
    group_col: str | None = None
    split_col: str | None = None
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)  # train / val / test, when the dataset defines no split
    train_fraction: float = 1.0  # low-data regime: keep this fraction of the training videos (stratified)
    freeze_encoder: bool = False  # train the head only (linear probing on random clips)
    epochs: int = 30
    batch_size: int = 8  # videos per process and step
    lr: float = 1e-4  # peak learning rate of the head (the encoder's with layer_decay = 1)
    min_lr: float = 1e-6  # end of the cosine decay
    warmup_epochs: float = 1.0
    layer_decay: float = 1.0  # < 1: the block k levels below the head trains at lr * layer_decay ** k
    weight_decay: float = 0.05  # AdamW, on weight matrices only (not biases / norms)
    clip_grad: float | None = None  # max global gradient norm
    patience: int = 10  # epochs without a better validation score before stopping; 0 = never stop early
    stride: int = 2  # temporal stride between the frames of a clip
    test_clips: int = 4  # evenly spaced clips averaged per video in validation / testing
    hflip: bool = False  # random horizontal flips in training (off: some labels are left / right specific)
    workers: int = 2  # DataLoader processes per rank
    seed: int = 0
    out: str | None = None  # run folder; None writes nothing
    device: str = "auto"
    precision: str = "fp32"  # or "bf16" (autocast)
    grad_checkpointing: bool = False
    eval_train: bool = True  # also report metrics on the training split with the best weights
    log_every: int = 50  # steps between progress lines within an epoch

    def __post_init__(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 < self.layer_decay <= 1, f"layer decay must be in (0, 1], got {self.layer_decay}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (self.patience >= 0, f"patience must be >= 0, got {self.patience}"),
            (self.stride >= 1, f"stride must be >= 1, got {self.stride}"),
            (self.test_clips >= 1, f"test clips must be >= 1, got {self.test_clips}"),
            (self.workers >= 0, f"workers must be >= 0, got {self.workers}"),
            (0 < self.train_fraction <= 1, f"train fraction must be in (0, 1], got {self.train_fraction}"),
            (self.precision in ("fp32", "bf16"), f"precision must be fp32 or bf16, got {self.precision!r}"),
            (self.warmup_epochs >= 0, f"warmup epochs must be >= 0, got {self.warmup_epochs}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        self.label = tuple(self.label)
        self.split = tuple(float(f) for f in self.split)  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["label"], d["split"] = list(self.label), list(self.split)
        return d


# ---- the model ------------------------------------------------------------------------------------------------------
class FinetuneModel(nn.Module):
    """MARLIN encoder + linear head on the pooled clip feature; `forward` gives task-space scores ``[B, K]``.

    Scores are logits for the classification tasks and values in the targets' units for regression (the head
    predicts train-standardised targets; ``target_mean`` / ``target_std`` undo that).
    """

    def __init__(
        self,
        config: MarlinConfig,
        task: str,
        names: Sequence[str],
        num_outputs: int,
        *,
        encoder: MarlinEncoder | None = None,
        label: str = "label",
        stride: int = 2,
        test_clips: int = 4,
    ) -> None:
        super().__init__()
        self.config, self.task, self.names, self.label = config, task, list(names), label
        self.stride, self.test_clips = stride, test_clips
        self.meta: dict[str, Any] = {}  # what a loaded checkpoint says besides the weights (epoch, metrics, config)
        self.encoder = encoder if encoder is not None else MarlinEncoder(config)
        self.head = nn.Linear(config.encoder_embed_dim, num_outputs)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("target_mean", torch.zeros(num_outputs))
        self.register_buffer("target_std", torch.ones(num_outputs))

    @property
    def num_outputs(self) -> int:
        return self.head.out_features

    def forward(self, x: Tensor) -> Tensor:
        """Clips ``[B, 3, T, H, W]`` in [0, 1] -> scores ``[B, K]``."""
        z = self.head(self.encoder.extract_features(x, seq_mean_pool=True))  # [B, K]
        if self.task == "regression":
            z = z * self.target_std + self.target_mean
        return z

    def init_head(self, targets: np.ndarray) -> None:
        """Start the head at the training targets' prior (class log-frequencies, label rates) or, for regression,
        record their mean / std so the head learns standardised values: the first steps then fit the features
        rather than the label balance or scale."""
        k = self.num_outputs
        with torch.no_grad():
            if self.task == "multiclass":
                freq = np.bincount(targets, minlength=k)[:k] / max(len(targets), 1)
                logp = np.log(np.clip(freq, 1e-3, None))
                self.head.bias.copy_(torch.as_tensor(logp - logp.mean(), dtype=torch.float32))
            elif self.task in ("binary", "multilabel"):
                p = np.clip(np.asarray(targets, np.float64).reshape(len(targets), -1).mean(0), 1e-3, 1 - 1e-3)
                self.head.bias.copy_(torch.as_tensor(np.log(p / (1 - p)), dtype=torch.float32))
            else:
                y = np.asarray(targets, np.float64).reshape(len(targets), -1)
                std = y.std(0)
                self.target_mean.copy_(torch.as_tensor(y.mean(0), dtype=torch.float32))
                self.target_std.copy_(torch.as_tensor(np.where(std > 0, std, 1.0), dtype=torch.float32))

    def per_sample_loss(self, scores: Tensor, target: Tensor) -> Tensor:
        """Loss of each sample ``[B]`` (averaged over outputs for multilabel / regression)."""
        scores = scores.float()
        if self.task == "multiclass":
            return F.cross_entropy(scores, target.long(), reduction="none")
        if self.task == "binary":
            return F.binary_cross_entropy_with_logits(scores[:, 0], target.float(), reduction="none")
        if self.task == "multilabel":
            return F.binary_cross_entropy_with_logits(scores, target.float(), reduction="none").mean(1)
        err = (scores - target.float().view_as(scores)) / self.target_std
        return (err**2).mean(1)

    def checkpoint(self, **extra: Any) -> dict[str, Any]:
        """A weights-only dict: ``config`` + encoder ``state_dict`` (so ``marlin.load`` reads it as an encoder),
        the head state and what is needed to use the model (task, names, clip sampling)."""
        sd = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        return {
            "format": FINETUNE_FORMAT,
            "config": self.config.to_dict(),
            "state_dict": {k: v for k, v in sd.items() if k.startswith("encoder.")},
            "head_state": {k: v for k, v in sd.items() if not k.startswith("encoder.")},
            "task": self.task,
            "names": list(self.names),
            "label": self.label,
            "num_outputs": self.num_outputs,
            "stride": self.stride,
            "test_clips": self.test_clips,
            **extra,
        }


def load_finetuned(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> FinetuneModel:
    """Read a ``best.pt`` written by :func:`finetune` (weights only, no code execution) into an eval-mode model;
    the file's other entries (epoch, validation metrics, run config) are in ``model.meta``."""
    from ..train.state import load_tagged_checkpoint

    obj = load_tagged_checkpoint(path, FINETUNE_FORMAT, "checkpoint (from marlin finetune)")
    config = MarlinConfig.from_dict(obj["config"])
    model = FinetuneModel(config, obj["task"], obj["names"], int(obj["num_outputs"]), label=obj.get("label", "label"),
                          stride=int(obj.get("stride", 2)), test_clips=int(obj.get("test_clips", 4)))  # fmt: skip
    model.load_state_dict({**obj["state_dict"], **obj["head_state"]})
    model.meta = {k: v for k, v in obj.items() if k not in ("state_dict", "head_state")}
    return model.eval().to(map_location)


# ---- optimiser ------------------------------------------------------------------------------------------------------
def _layer_id(name: str, depth: int) -> int:
    """0 for the patch / position embedding, k + 1 for encoder block k, depth + 1 for the final norm and head."""
    if name.startswith(("encoder.patch_embedding.", "encoder.pos_embedding.")):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1


def layer_decay_groups(
    model: FinetuneModel, lr: float, weight_decay: float = 0.0, layer_decay: float = 1.0
) -> list[dict[str, Any]]:
    """AdamW parameter groups with layer-wise lr decay (BEiT / VideoMAE fine-tuning).

    The head (with the encoder's final norm, which acts on the pooled feature) gets ``lr``, the last block
    ``lr * layer_decay``, ... the first block ``lr * layer_decay ** depth`` and the patch embedding
    ``lr * layer_decay ** (depth + 1)``: low layers keep more of what pretraining learned. Weight decay applies to
    matrices only. Each group has ``lr_scale`` (the schedule's rate is multiplied by it) and ``layer``.
    """
    depth = len(model.encoder.blocks)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = _layer_id(name, depth)
        decay = p.ndim > 1 and weight_decay > 0
        key = (layer, decay)
        if key not in groups:
            scale = layer_decay ** (depth + 1 - layer)
            groups[key] = {"params": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale,
                           "lr": lr * scale, "layer": layer}  # fmt: skip
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def _make_optimizer(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """AdamW with the fused kernel where available (much faster on CPUs), else the default implementation."""
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))


# ---- clips ----------------------------------------------------------------------------------------------------------
def effective_stride(n_frames: int, clip_frames: int, stride: int) -> int:
    """The largest stride <= `stride` whose clip fits in `n_frames` (1 when even consecutive frames do not fit)."""
    if clip_frames <= 1:
        return stride
    return max(1, min(stride, (n_frames - 1) // (clip_frames - 1)))


def _clip(n_frames: int, clip_frames: int, stride: int, start: int) -> list[int]:
    return [min(start + k * stride, n_frames - 1) for k in range(clip_frames)]


def train_clip_indices(n_frames: int, clip_frames: int, stride: int, rng: np.random.Generator) -> list[int]:
    """Frame indices of one random clip (uniform start); short videos lower the stride, then repeat the last frame."""
    s = effective_stride(n_frames, clip_frames, stride)
    max_start = max(0, n_frames - ((clip_frames - 1) * s + 1))
    return _clip(n_frames, clip_frames, s, int(rng.integers(0, max_start + 1)))


def eval_clip_indices(n_frames: int, clip_frames: int, stride: int, n_clips: int) -> list[list[int]]:
    """`n_clips` clips with evenly spaced starts from the first to the last possible one (one clip: the middle)."""
    s = effective_stride(n_frames, clip_frames, stride)
    max_start = max(0, n_frames - ((clip_frames - 1) * s + 1))
    starts = [max_start // 2] if n_clips == 1 else np.round(np.linspace(0, max_start, n_clips)).astype(int).tolist()
    return [_clip(n_frames, clip_frames, s, int(st)) for st in starts]


def _square(frame: np.ndarray, size: int) -> Tensor:
    """``[H, W, 3]`` uint8 -> centre square crop resized to ``[3, size, size]`` uint8 (antialiased bilinear)."""
    h, w = frame.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = torch.from_numpy(np.ascontiguousarray(frame[top : top + side, left : left + side])).permute(2, 0, 1)
    if side != size:
        x = F.interpolate(x[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        x = x[0].round().clamp(0, 255).to(torch.uint8)
    return x  # [3, S, S]


def read_frames(path: str | os.PathLike, indices: Sequence[int], img_size: int) -> Tensor:
    """Frames `indices` of a video (decoder order, via :mod:`marlin.video.io`), centre-cropped and resized:
    uint8 ``[3, len(indices), S, S]``.

    Only the selected frames are converted and kept, so memory stays at one clip's worth. An index past the frames
    that actually decode (a container that over-reports its length) repeats the last decoded frame.
    """
    from ..video.io import iter_frames

    wanted = sorted(set(int(i) for i in indices))
    start, stop = wanted[0], wanted[-1] + 1
    step = reduce(math.gcd, (b - a for a, b in zip(wanted[:-1], wanted[1:], strict=True)), 0) or 1
    keep = set(wanted)
    got: dict[int, Tensor] = {}
    for k, frame in enumerate(iter_frames(path, start=start, step=step, stop=stop)):
        if start + k * step in keep:
            got[start + k * step] = _square(frame, img_size)
    if not got:  # decoding ended before `start`: use the last frame that decodes
        last = None
        for last in iter_frames(path):  # noqa: B007 - only the final frame is kept
            pass
        got[-1] = _square(last, img_size)
    decoded = sorted(got)
    out = []
    for i in indices:
        j = int(i) if int(i) in got else max((d for d in decoded if d <= int(i)), default=decoded[0])
        out.append(got[j])
    return torch.stack(out, dim=1)  # [3, T, S, S]


class VideoClips(Dataset):
    """Labelled videos as clips: one random clip per item in training, `n_clips` evenly spaced ones otherwise.

    Items: ``{"video": uint8 [3, T, S, S] (train) or [n_clips, 3, T, S, S], "target": tensor, "index": int}``.
    Training randomness (clip start, flip) is seeded by (seed, epoch, index): call :meth:`set_epoch` before each
    epoch's loader is created (workers copy the dataset then).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        targets: np.ndarray,
        *,
        clip_frames: int,
        img_size: int,
        stride: int = 2,
        train: bool = True,
        n_clips: int = 4,
        hflip: bool = False,
        seed: int = 0,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.targets = torch.as_tensor(np.asarray(targets))
        self.clip_frames, self.img_size, self.stride = clip_frames, img_size, stride
        self.train, self.n_clips, self.hflip, self.seed = train, n_clips, hflip, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from ..utils.distributed import derive_seed
        from ..video.io import probe_video

        path = self.paths[index]
        n = max(1, probe_video(path).n_frames)  # frames that fail to decode are padded by read_frames
        if self.train:
            rng = np.random.default_rng(derive_seed(self.seed, "finetune-clip", self.epoch, index))
            clip = read_frames(path, train_clip_indices(n, self.clip_frames, self.stride, rng), self.img_size)
            if self.hflip and rng.random() < 0.5:
                clip = clip.flip(-1)
            video = clip  # [3, T, S, S]
        else:
            clips = eval_clip_indices(n, self.clip_frames, self.stride, self.n_clips)
            flat = read_frames(path, [i for c in clips for i in c], self.img_size)  # [3, n * T, S, S]
            video = flat.view(3, len(clips), self.clip_frames, self.img_size, self.img_size).transpose(0, 1)
        return {"video": video.contiguous(), "target": self.targets[index], "index": index}


class ShardedBatchSampler(Sampler[list[int]]):
    """This rank's slice of every global batch of one epoch (see the module docstring).

    Global batch ``g`` is positions ``[g * B * W, (g + 1) * B * W)`` of a permutation seeded by (seed, epoch); rank
    ``r`` takes ``[r * B, (r + 1) * B)`` of it. Only the last global batch can be short, so a rank may run out one
    step early: the trainer then does an empty step to keep the collectives in line.
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, epoch: int = 0):
        from ..utils.distributed import derive_seed

        if n < 1:
            raise ValueError("the training split is empty")
        self.n, self.b, self.rank, self.world = n, batch_size, rank, world_size
        g = torch.Generator().manual_seed(derive_seed(seed, "finetune-epoch", epoch))
        self.perm = torch.randperm(n, generator=g).tolist()

    @property
    def global_batch(self) -> int:
        return self.b * self.world

    @property
    def steps(self) -> int:
        """Optimiser steps of the epoch (the same on every rank)."""
        return -(-self.n // self.global_batch)

    def global_count(self, step: int) -> int:
        """Videos in global batch `step`, over all ranks."""
        return min(self.global_batch, self.n - step * self.global_batch)

    def batch(self, step: int) -> list[int]:
        first = step * self.global_batch + self.rank * self.b
        return self.perm[first : min(first + self.b, self.n)]

    def __iter__(self):
        for step in range(self.steps):
            idx = self.batch(step)
            if idx:
                yield idx

    def __len__(self) -> int:
        return sum(1 for s in range(self.steps) if self.batch(s))


# ---- splits ---------------------------------------------------------------------------------------------------------
def resolve_splits(
    labels: LabelSet,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
    *,
    train_fraction: float = 1.0,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Train / val / test indices: the dataset's own split when it defines one, else `split_indices` (whole groups
    when the set has groups, else stratified for single-label tasks). A defined split without validation videos
    gets 10% of its training groups / videos as validation. `train_fraction` < 1 then subsamples the training part.
    """
    n, y, groups = len(labels), labels.stratify_labels(), labels.groups
    if labels.splits is not None:
        s = np.asarray(labels.splits)
        idx = {name: np.flatnonzero(s == name) for name in SPLITS}
        if len(idx["val"]) == 0 and len(idx["train"]) > 1:
            tr = idx["train"]
            sub = split_indices(len(tr), (0.9, 0.1, 0.0), y=None if y is None else y[tr],
                                groups=None if groups is None else [groups[i] for i in tr], seed=seed)  # fmt: skip
            idx["train"], idx["val"] = tr[sub["train"]], tr[sub["val"]]
            log.info("the dataset's split has no validation videos: using %d of its training videos", len(idx["val"]))
    else:
        idx = split_indices(n, tuple(fractions), y=y, groups=groups, seed=seed)
    if train_fraction < 1:
        idx["train"] = subsample(idx["train"], train_fraction, y=y, seed=seed)
    for name in ("train", "val"):
        if len(idx[name]) == 0:
            raise SplitError(f"the {name} split is empty ({n} videos; split sizes "
                             f"{', '.join(f'{k} {len(v)}' for k, v in idx.items())})")  # fmt: skip
    return idx


# ---- prediction -----------------------------------------------------------------------------------------------------
def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def _predict_shard(
    model: FinetuneModel, dataset: VideoClips, indices: Sequence[int], *, batch_size: int, workers: int,
    device: torch.device, precision: str = "fp32",
) -> np.ndarray:  # fmt: skip
    """Clip-averaged scores ``[len(indices), K]`` (float64) of dataset items `indices`."""
    k = model.num_outputs
    if len(indices) == 0:
        return np.zeros((0, k))
    batches = [list(indices[i : i + batch_size]) for i in range(0, len(indices), batch_size)]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    out = []
    for batch in loader:
        v = batch["video"].to(device, non_blocking=True)  # [b, n, 3, T, S, S] uint8
        b, n = v.shape[:2]
        x = v.flatten(0, 1).float().div_(255.0)
        with _autocast(device, precision):
            scores = model(x)  # [b * n, K]
        out.append(scores.float().view(b, n, -1).mean(1).cpu().double().numpy())
    model.train(was_training)
    return np.concatenate(out)


def _gather_scores(local: np.ndarray, indices: Sequence[int], rank: int, world: int, k: int) -> np.ndarray:
    """Every rank's shard (rank r holds positions r::world) back into one ``[len(indices), K]`` array."""
    n = len(indices)
    if world == 1:
        return local
    import torch.distributed as dist

    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, local)
    full = np.zeros((n, k))
    for r, part in enumerate(parts):
        full[r::world] = part
    return full


def predict(
    model: FinetuneModel,
    paths: Sequence[str | os.PathLike],
    *,
    stride: int | None = None,
    clips: int | None = None,
    batch_size: int = 8,
    workers: int = 0,
    device: str | torch.device | None = None,
    precision: str = "fp32",
) -> np.ndarray:
    """Scores ``[N, K]`` of videos (head outputs averaged over `clips` evenly spaced clips; by default the stride
    and clip count the model was fine-tuned with). Sharded over the ranks when a process group is running."""
    from ..utils.distributed import is_distributed

    device = torch.device(device) if device is not None else next(model.parameters()).device
    c = model.config
    dataset = VideoClips(paths, np.zeros(len(paths)), clip_frames=c.clip_frames, img_size=c.img_size,
                         stride=stride or model.stride, train=False, n_clips=clips or model.test_clips)  # fmt: skip
    rank, world = 0, 1
    if is_distributed():
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
    every = list(range(len(paths)))
    local = _predict_shard(model, dataset, every[rank::world], batch_size=batch_size, workers=workers, device=device,
                           precision=precision)  # fmt: skip
    return _gather_scores(local, every, rank, world, model.num_outputs)


def evaluate(model: FinetuneModel, labels: LabelSet, **kwargs: Any) -> dict[str, float]:
    """Every metric of the task on a labelled set (keyword arguments as :func:`predict`)."""
    scores = predict(model, labels.paths, **kwargs)
    return compute_metrics(model.task, labels.targets, scores)


# ---- training -------------------------------------------------------------------------------------------------------
@dataclass
class FinetuneResult:
    """What a run produced: metrics per split with the best weights, the per-epoch history, the model (best weights)."""

    metrics: dict[str, dict[str, float] | None]
    history: list[dict[str, Any]]
    best_epoch: int
    selection_metric: str
    model: FinetuneModel
    splits: dict[str, np.ndarray]
    labels: LabelSet
    stopped_early: bool = False
    checkpoint: Path | None = None
    results: Path | None = None


def _check_videos(labels: LabelSet, index: np.ndarray, source: str) -> None:
    """Fail before training, in one line naming the first missing file, when listed videos are absent."""
    missing = [labels.paths[i] for i in index if not labels.paths[i].is_file()]
    if missing:
        more = f" ({len(missing)} of {len(index)} listed videos are missing)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"{missing[0]}: no such video file, listed in {source}{more}")


class _Run:
    """One rank's state of a fine-tuning run (see :func:`finetune`)."""

    def __init__(self, cfg: FinetuneConfig, labels: LabelSet, model: FinetuneModel, splits: dict[str, np.ndarray],
                 dist_info: Any) -> None:  # fmt: skip
        from torch.nn.parallel import DistributedDataParallel

        from ..utils.schedule import CosineSchedule

        self.cfg, self.labels, self.splits, self.dist = cfg, labels, splits, dist_info
        self.device = dist_info.device
        self.model = model.to(self.device)
        self.main = dist_info.is_main
        c = model.config
        tr = splits["train"]
        self.train_set = VideoClips([labels.paths[i] for i in tr], labels.targets[tr], clip_frames=c.clip_frames,
                                    img_size=c.img_size, stride=cfg.stride, train=True, hflip=cfg.hflip,
                                    seed=cfg.seed)  # fmt: skip
        self.sampler = ShardedBatchSampler(len(tr), cfg.batch_size, dist_info.rank, dist_info.world_size, cfg.seed)
        steps = self.sampler.steps
        total = steps * cfg.epochs
        warmup = min(total, round(cfg.warmup_epochs * steps))
        self.schedule = CosineSchedule(cfg.lr, min(cfg.min_lr, cfg.lr), min(cfg.min_lr, cfg.lr), warmup, total)
        if cfg.freeze_encoder:
            model.encoder.requires_grad_(False)
        model.encoder.grad_checkpointing = cfg.grad_checkpointing
        self.groups = layer_decay_groups(model, cfg.lr, cfg.weight_decay, cfg.layer_decay)
        self.optimizer = _make_optimizer(self.groups, cfg.lr)
        self.params = [p for g in self.groups for p in g["params"]]
        self.net: nn.Module = model
        if dist_info.world_size > 1:
            self.net = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda"
                                               else None, broadcast_buffers=False)  # fmt: skip
        self.step = 0

    def _dummy(self) -> Tensor:
        c = self.model.config
        return torch.zeros(1, c.in_chans, c.clip_frames, c.img_size, c.img_size, device=self.device)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training split; returns the mean loss over all ranks and the last lr."""
        cfg, dist = self.cfg, self.dist
        sampler = ShardedBatchSampler(self.sampler.n, cfg.batch_size, dist.rank, dist.world_size, cfg.seed, epoch)
        self.train_set.set_epoch(epoch)
        loader = DataLoader(self.train_set, batch_sampler=sampler, num_workers=cfg.workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=False)  # fmt: skip
        self.net.train()
        if cfg.freeze_encoder:
            self.model.encoder.eval()
        it = iter(loader)
        loss_sum = torch.zeros(2, dtype=torch.float64)  # (sum of sample losses, samples) on this rank
        t0 = time.perf_counter()
        lr = self.schedule(self.step)
        for i in range(sampler.steps):
            lr = self.schedule(self.step)
            for g in self.optimizer.param_groups:
                g["lr"] = lr * g["lr_scale"]
            batch = next(it, None)
            count = sampler.global_count(i)
            if batch is None:  # this rank's share of the last global batch is empty
                x, target = self._dummy(), None
            else:
                x = batch["video"].to(self.device, non_blocking=True).float().div_(255.0)
                target = batch["target"].to(self.device, non_blocking=True)
            with _autocast(self.device, cfg.precision):
                scores = self.net(x)
            if target is None:
                loss = scores.float().sum() * 0.0
            else:
                per = self.model.per_sample_loss(scores, target)
                loss = per.sum() * (dist.world_size / count)  # DDP averages over ranks -> mean over the global batch
                loss_sum += torch.tensor([float(per.detach().sum()), len(per)], dtype=torch.float64)
                if not torch.isfinite(per.detach()).all():
                    raise RuntimeError(f"non-finite training loss at epoch {epoch + 1}, step {i + 1}: lower --lr")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad is not None:
                nn.utils.clip_grad_norm_(self.params, cfg.clip_grad)
            self.optimizer.step()
            self.step += 1
            done = i + 1
            if self.main and cfg.log_every and done % cfg.log_every == 0 and done < sampler.steps:
                from ..utils.monitor import format_duration

                el = time.perf_counter() - t0
                log.info("epoch %d step %d/%d: loss %.4g, lr %.3g, %.1f videos/s, epoch ETA %s", epoch + 1, done,
                         sampler.steps, float(loss_sum[0] / max(loss_sum[1], 1)), lr,
                         done * sampler.global_batch / max(el, 1e-9),
                         format_duration(el / done * (sampler.steps - done)))  # fmt: skip
        if dist.world_size > 1:
            import torch.distributed as tdist

            tdist.all_reduce(loss_sum, op=tdist.ReduceOp.SUM)
        return {"train_loss": float(loss_sum[0] / max(loss_sum[1], 1)), "lr": lr}

    def predict_split(self, name: str) -> np.ndarray:
        idx = self.splits[name]
        c = self.model.config
        data = VideoClips([self.labels.paths[i] for i in idx], self.labels.targets[idx], clip_frames=c.clip_frames,
                          img_size=c.img_size, stride=self.cfg.stride, train=False,
                          n_clips=self.cfg.test_clips)  # fmt: skip
        every = list(range(len(idx)))
        r, w = self.dist.rank, self.dist.world_size
        local = _predict_shard(self.model, data, every[r::w], batch_size=self.cfg.batch_size,
                               workers=self.cfg.workers, device=self.device, precision=self.cfg.precision)  # fmt: skip
        return _gather_scores(local, every, r, w, self.model.num_outputs)

    def evaluate_split(self, name: str) -> dict[str, float]:
        """Metrics of a split (plus ``loss``: the training loss of the clip-averaged scores)."""
        scores = self.predict_split(name)
        targets = self.labels.targets[self.splits[name]]
        metrics = compute_metrics(self.model.task, targets, scores)
        with torch.no_grad():
            per = self.model.per_sample_loss(torch.as_tensor(scores, dtype=torch.float32, device=self.device),
                                             torch.as_tensor(targets, device=self.device))  # fmt: skip
        metrics["loss"] = float(per.mean())
        metrics["neg_loss"] = -metrics["loss"]
        return metrics


def _load_encoder(cfg: FinetuneConfig) -> MarlinEncoder:
    from ..models.model import from_spec

    return from_spec(cfg.model, full=False, random_init=cfg.random_init).encoder


def finetune(
    cfg: FinetuneConfig,
    *,
    labels: LabelSet | None = None,
    encoder: MarlinEncoder | None = None,
) -> FinetuneResult:
    """Fine-tune (as one process or as every rank of a torchrun job) and return the best model and its metrics.

    `labels` / `encoder` replace reading ``cfg.labels`` / loading ``cfg.model`` (library use, tests).
    """
    from ..utils.distributed import derive_seed, init_distributed, is_distributed, shutdown_distributed
    from ..utils.monitor import format_duration

    owns_group = not is_distributed()
    given_encoder = encoder is not None
    dist = init_distributed(cfg.device)
    try:
        source = cfg.labels or "the label set"
        if labels is None:
            labels = read_labels(cfg.labels, list(cfg.label), task=cfg.task, path_col=cfg.path_col,
                                 group_col=cfg.group_col, split_col=cfg.split_col)  # fmt: skip
        _check_videos(labels, np.arange(len(labels)), source)
        splits = resolve_splits(labels, cfg.split, train_fraction=cfg.train_fraction, seed=cfg.seed)

        torch.manual_seed(derive_seed(cfg.seed, "init"))  # identical weights on every rank (DDP also broadcasts)
        if encoder is None:
            encoder = _load_encoder(cfg)
        model = FinetuneModel(encoder.config, labels.task, labels.names, labels.num_outputs, encoder=encoder,
                              label=labels.label, stride=cfg.stride, test_clips=cfg.test_clips)  # fmt: skip
        model.init_head(labels.targets[splits["train"]])
        run = _Run(cfg, labels, model, splits, dist)

        out = Path(cfg.out).expanduser() if cfg.out else None
        primary = primary_metric(labels.task)
        selection = primary
        n_split = {k: len(v) for k, v in splits.items()}
        if dist.is_main:
            what = f"{len(labels.names)} classes" if labels.task == "multiclass" else f"{labels.num_outputs} outputs"
            log.info("fine-tuning %s on %s: %s %r (%s), %d train / %d val / %d test videos, %d epochs x %d steps, "
                     "global batch %d = %d x %d ranks, lr %.3g%s%s, device %s", model.config.name, source,
                     labels.task, labels.label, what, n_split["train"], n_split["val"], n_split["test"], cfg.epochs,
                     run.sampler.steps, run.sampler.global_batch, cfg.batch_size, dist.world_size, cfg.lr,
                     f" (layer decay {cfg.layer_decay})" if cfg.layer_decay < 1 else "",
                     ", encoder frozen" if cfg.freeze_encoder else "", dist.device)  # fmt: skip
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                splits_doc = {k: [labels.ids[i] for i in v] for k, v in splits.items()}
                atomic_write_text(out / SPLITS_FILE, json.dumps(splits_doc) + "\n")

        history: list[dict[str, Any]] = []
        best_score: tuple[float, float] = (-math.inf, -math.inf)
        best_epoch, best_state, best_val = -1, None, None
        stale, stopped_early = 0, False
        t_start = time.perf_counter()
        for epoch in range(cfg.epochs):
            t0 = time.perf_counter()
            record: dict[str, Any] = {"epoch": epoch + 1, **run.train_epoch(epoch)}
            val = run.evaluate_split("val")
            if epoch == 0 and math.isnan(val[primary]):
                selection = "neg_loss"
                if dist.is_main:
                    log.warning("validation %s is undefined (e.g. one class only): selecting by validation loss",
                                primary)  # fmt: skip
            # ties on the selection metric (common on small validation sets) go to the lower validation loss
            score = (val[selection] if not math.isnan(val[selection]) else -math.inf, val["neg_loss"])
            record["val"] = val
            record["seconds"] = time.perf_counter() - t0
            history.append(record)
            improved = score > best_score or best_state is None
            if improved:
                best_score, best_epoch, best_val, stale = score, epoch + 1, val, 0
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                if dist.is_main and out is not None:
                    state = model.checkpoint(epoch=epoch + 1, val_metrics=json_safe(val), selection_metric=selection,
                                             finetune_config=json_safe(cfg.to_dict()))  # fmt: skip
                    atomic_write(out / BEST_FILE, lambda p, s=state: torch.save(s, p))
            else:
                stale += 1
            if dist.is_main:
                el = time.perf_counter() - t_start
                eta = format_duration(el / (epoch + 1) * (cfg.epochs - epoch - 1))
                log.info("epoch %d/%d: train loss %.4g, val loss %.4g, val %s %.4f (best %.4f at epoch %d)%s, "
                         "lr %.3g, %s, ETA %s", epoch + 1, cfg.epochs, record["train_loss"], val["loss"], selection,
                         val[selection], best_val[selection], best_epoch, " *" if improved else "", record["lr"],
                         format_duration(record["seconds"]), eta)  # fmt: skip
            if cfg.patience and stale >= cfg.patience and epoch + 1 < cfg.epochs:
                stopped_early = True
                if dist.is_main:
                    log.info("early stop: no better validation %s for %d epochs", selection, cfg.patience)
                break

        model.load_state_dict(best_state)
        metrics: dict[str, dict[str, float] | None] = {"val": best_val}
        metrics["test"] = run.evaluate_split("test") if len(splits["test"]) else None
        if cfg.eval_train:
            metrics["train"] = run.evaluate_split("train")
        result = FinetuneResult(metrics=metrics, history=history, best_epoch=best_epoch, selection_metric=selection,
                                model=model, splits=splits, labels=labels, stopped_early=stopped_early)  # fmt: skip
        if dist.is_main:
            if metrics["test"] is None:
                log.warning("no test videos: test metrics skipped")
            else:
                log.info("test (best epoch %d): %s", best_epoch,
                         ", ".join(f"{k} {v:.4f}" for k, v in metrics["test"].items() if k != "neg_loss"))  # fmt: skip
            if out is not None:
                doc = {
                    "format": FINETUNE_FORMAT,
                    "model": None if given_encoder else cfg.model,
                    "labels": source,
                    "label": labels.label,
                    "task": labels.task,
                    "names": labels.names,
                    "primary_metric": primary,
                    "selection_metric": selection,
                    "world_size": dist.world_size,
                    "n": n_split,
                    "best_epoch": best_epoch,
                    "stopped_early": stopped_early,
                    "epochs_run": len(history),
                    "seconds": time.perf_counter() - t_start,
                    "metrics": metrics,
                    "history": history,
                    "checkpoint": str(out / BEST_FILE),
                    "config": cfg.to_dict(),
                }
                result.results = atomic_write_text(out / RESULTS_FILE, json.dumps(json_safe(doc), indent=2) + "\n")
                result.checkpoint = out / BEST_FILE
        return result
    finally:
        if owns_group:
            shutdown_distributed()
