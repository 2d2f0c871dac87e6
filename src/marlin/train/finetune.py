"""Fine-tuning a MARLIN encoder with a linear head on a labelled video set (``marlin finetune``).

The model is the encoder followed by one linear layer on the clip feature that ``Marlin.extract_features`` defines
(mean over the tokens, then the encoder's final LayerNorm). Losses per task: cross-entropy (multiclass), BCE with
logits (binary: one output; multilabel: one per label), MSE on train-standardised targets (regression; the model
outputs values in the targets' own units).

Data (:class:`marlin.data.datasets.VideoClips`, frames chosen by the one clip sampler :mod:`marlin.data.clips`):
each training step takes one random ``clip_frames``-frame clip per video, every ``sample_rate``-th frame (a video too
short for that span gets the largest rate that fits, then pads by repeating its last frame); frames are centre-
cropped to a square and resized to the model's ``img_size`` (videos are assumed to be face crops already).
Validation and testing average the head outputs of ``test_clips`` evenly spaced clips per video, so they are
deterministic. Clip choice and flips are seeded by (seed, epoch, video), never by the process, worker or batch.

Training runs on the engine pretraining uses (:mod:`marlin.train.engine`). Distributed: the same code is every rank
of a torchrun job (gloo on CPUs, NCCL on GPUs); :class:`marlin.data.sampling.ShardedBatchSampler` uses every training
video exactly once per epoch, so a run on N processes with batch b follows the run on one process with batch N x b.
Evaluation is sharded and gathered, so every rank takes the same early-stopping decisions; only rank 0 writes files.

Outputs (rank 0, in ``out``): ``best.pt`` (the best epoch by the validation primary metric, written atomically;
:func:`load_finetuned` reads it back, and ``marlin.load`` reads its encoder), ``results.json`` (config, split sizes,
per-epoch history, metrics per split with the best weights) and ``splits.json`` (video ids per split).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..data.datasets import VideoClips
from ..data.sampling import ShardedBatchSampler
from ..evaluate.manifest import SPLITS, LabelSet, read_labels
from ..evaluate.metrics import bootstrap_interval, compute_metrics, primary_metric
from ..evaluate.splits import SplitError, split_indices, subsample
from ..models.config import MarlinConfig
from ..models.encoder import MarlinEncoder
from ..models.layers import compile_each
from ..utils.distributed import DistInfo, init_distributed, is_distributed, shutdown_distributed
from ..utils.fileio import atomic_write, atomic_write_text, json_safe
from ..utils.monitor import format_duration
from ..utils.optim import layer_of, make_optimizer, param_groups
from ..utils.precision import TRAIN_PRECISIONS, allow_tf32, autocast
from ..utils.schedule import CosineSchedule
from ..utils.seeding import derive_seed
from .engine import train_steps, wrap_ddp

__all__ = [
    "FINETUNE_FORMAT",
    "FinetuneConfig",
    "FinetuneModel",
    "FinetuneResult",
    "evaluate",
    "finetune",
    "layer_decay_groups",
    "load_finetuned",
    "predict",
    "resolve_splits",
]

log = logging.getLogger("marlin")

FINETUNE_FORMAT = "marlin-finetune-v1"
BEST_FILE = "best.pt"
RESULTS_FILE = "results.json"
POOLS = ("mean", "time")  # what the head reads (FinetuneModel)
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
    sample_rate: int = 2  # frames between the frames of a clip (as `marlin extract --sample-rate`)
    test_clips: int = 4  # evenly spaced clips averaged per video in validation / testing
    pool: str = "mean"  # head input: "mean" (the clip feature), "time" (one per time step, in order: lip reading)
    train_clip: str = "random"  # "random" start per epoch, or "centre": the same clip each time (positions in time)
    head_norm: bool = False  # standardise the head input per batch (BatchNorm, no affine; MAE's linear-probe trick)
    # pool "time": subtract the clip's mean over its time steps from the head input, so the head reads what changes
    # within the clip (the mouth), not what the clip holds constant (who, light); the probe's `centre` for a fine-tune
    centre: bool = False
    hflip: bool = False  # random horizontal flips in training (off: some labels are left / right specific)
    workers: int = 2  # DataLoader processes per rank
    seed: int = 0
    out: str | None = None  # run folder; None writes nothing
    device: str = "auto"
    precision: str = "fp32"  # or "bf16" (autocast), or "auto" (`training_precision`); fp32: bf16 not measured here yet
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile each encoder block (GPUs; the first steps compile)
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
            (self.sample_rate >= 1, f"sample rate must be >= 1, got {self.sample_rate}"),
            (self.test_clips >= 1, f"test clips must be >= 1, got {self.test_clips}"),
            (self.workers >= 0, f"workers must be >= 0, got {self.workers}"),
            (0 < self.train_fraction <= 1, f"train fraction must be in (0, 1], got {self.train_fraction}"),
            (self.precision in TRAIN_PRECISIONS, f"precision must be auto, fp32 or bf16, got {self.precision!r}"),
            (self.warmup_epochs >= 0, f"warmup epochs must be >= 0, got {self.warmup_epochs}"),
            (self.pool in POOLS, f"pool must be one of {', '.join(POOLS)}, got {self.pool!r}"),
            (self.train_clip in ("random", "centre"), f"train clip must be random or centre, got {self.train_clip!r}"),
            (not self.centre or self.pool == "time", "centre needs the time-kept head input (pool time)"),
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

    `pool`: ``"mean"`` reads the released clip feature (all tokens averaged, then the final norm); ``"time"`` reads
    one such feature per time step (tokens averaged over the frame, then the norm), concatenated in order, so the head
    knows *when* something happens (a word's place in a sentence), which a mean over the clip averages away; with
    `centre` the clip's mean over its steps is subtracted from them first (what changes within the clip stays).

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
        sample_rate: int = 2,
        test_clips: int = 4,
        pool: str = "mean",
        head_norm: bool = False,
        centre: bool = False,
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
        if centre and pool != "time":
            raise ValueError("centre needs the time-kept head input (pool time)")
        self.centre = centre
        self.config, self.task, self.names, self.label = config, task, list(names), label
        self.sample_rate, self.test_clips, self.pool = sample_rate, test_clips, pool
        self.meta: dict[str, Any] = {}  # what a loaded checkpoint says besides the weights (epoch, metrics, config)
        self.encoder = encoder if encoder is not None else MarlinEncoder(config)
        steps = config.clip_frames // config.tubelet_size if pool == "time" else 1
        self.head = nn.Linear(steps * config.encoder_embed_dim, num_outputs)
        # clips of faces differ by a few % of the feature norm: standardised, that difference is what the head sees
        self.head_norm = nn.BatchNorm1d(self.head.in_features, affine=False) if head_norm else None
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("target_mean", torch.zeros(num_outputs))
        self.register_buffer("target_std", torch.ones(num_outputs))

    @property
    def num_outputs(self) -> int:
        return self.head.out_features

    def forward(self, x: Tensor) -> Tensor:
        """Clips ``[B, 3, T, H, W]`` in [0, 1] -> scores ``[B, K]``."""
        if self.pool == "time":
            enc, steps = self.encoder, self.config.clip_frames // self.config.tubelet_size
            h = enc.run_blocks(enc.embed(x))  # [B, N, D], tokens in (t, h, w) order
            feats = enc.norm(h.view(len(x), steps, -1, h.shape[-1]).mean(2))  # [B, T', D]
            if self.centre:
                feats = feats - feats.mean(1, keepdim=True)  # what changes over the clip's steps
            feats = feats.flatten(1)  # [B, T' * D]
        else:
            feats = self.encoder.extract_features(x, seq_mean_pool=True)  # [B, D]
        z = self.head(self._normalise(feats))  # [B, K]
        if self.task == "regression":
            z = z * self.target_std + self.target_mean
        return z

    def _normalise(self, feats: Tensor) -> Tensor:  # [B, F] -> [B, F]
        """The head norm, if any; a one-clip training batch (an epoch's remainder) uses the running statistics."""
        norm = self.head_norm
        if norm is None:
            return feats
        if self.training and len(feats) < 2:
            return F.batch_norm(feats, norm.running_mean, norm.running_var, training=False, eps=norm.eps)
        return norm(feats)

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
            "sample_rate": self.sample_rate,
            "test_clips": self.test_clips,
            "pool": self.pool,
            "head_norm": self.head_norm is not None,
            "centre": self.centre,
            **extra,
        }


def load_finetuned(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> FinetuneModel:
    """Read a ``best.pt`` written by :func:`finetune` (weights only, no code execution) into an eval-mode model;
    the file's other entries (epoch, validation metrics, run config) are in ``model.meta``."""
    from ..models.checkpoint import load_tagged_checkpoint

    obj = load_tagged_checkpoint(path, FINETUNE_FORMAT, "checkpoint (from marlin finetune)")
    config = MarlinConfig.from_dict(obj["config"])
    model = FinetuneModel(config, obj["task"], obj["names"], int(obj["num_outputs"]), label=obj.get("label", "label"),
                          sample_rate=int(obj.get("sample_rate", obj.get("stride", 2))),  # "stride": before 0.2
                          test_clips=int(obj.get("test_clips", 4)), pool=obj.get("pool", "mean"),
                          head_norm=bool(obj.get("head_norm", False)),
                          centre=bool(obj.get("centre", False)))  # fmt: skip
    model.load_state_dict({**obj["state_dict"], **obj["head_state"]})
    model.meta = {k: v for k, v in obj.items() if k not in ("state_dict", "head_state")}
    return model.eval().to(map_location)


# ---- optimiser ------------------------------------------------------------------------------------------------------
def layer_decay_groups(
    model: FinetuneModel, lr: float, weight_decay: float = 0.0, layer_decay: float = 1.0
) -> list[dict[str, Any]]:
    """AdamW parameter groups with layer-wise lr decay (BEiT / VideoMAE fine-tuning), from the layer groups the
    encoder declares (:meth:`MarlinEncoder.group_matcher`).

    The head (with the encoder's final norm, which acts on the pooled feature) gets ``lr``, the last block
    ``lr * layer_decay``, ... the first block ``lr * layer_decay ** depth`` and the patch embedding
    ``lr * layer_decay ** (depth + 1)``: low layers keep more of what pretraining learned. Weight decay applies to
    matrices only. Each group has ``lr_scale`` (the schedule's rate is multiplied by it), ``lr`` and ``layer``.
    """
    depth = len(model.encoder.blocks)
    layer = layer_of(model.encoder.group_matcher(), depth, prefix="encoder.")
    groups = param_groups(model.named_parameters(), weight_decay=weight_decay, layer=layer, n_layers=depth + 1,
                          layer_decay=layer_decay)  # fmt: skip
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return groups


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
        with autocast(device, precision):
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
    sample_rate: int | None = None,
    clips: int | None = None,
    batch_size: int = 8,
    workers: int = 0,
    device: str | torch.device | None = None,
    precision: str = "fp32",
) -> np.ndarray:
    """Scores ``[N, K]`` of videos (head outputs averaged over `clips` evenly spaced clips; by default the sample rate
    and clip count the model was fine-tuned with). Sharded over the ranks when a process group is running."""

    device = torch.device(device) if device is not None else next(model.parameters()).device
    c = model.config
    dataset = VideoClips(paths, np.zeros(len(paths)), clip_frames=c.clip_frames, img_size=c.img_size,
                         sample_rate=sample_rate or model.sample_rate, train=False,
                         n_clips=clips or model.test_clips)  # fmt: skip
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
    """One rank's state of a fine-tuning run (see :func:`finetune`): setup, the epoch loop on the shared engine,
    evaluation and the best checkpoint."""

    def __init__(self, cfg: FinetuneConfig, labels: LabelSet, model: FinetuneModel, splits: dict[str, np.ndarray],
                 dist_info: DistInfo) -> None:  # fmt: skip
        self.cfg, self.labels, self.splits, self.dist = cfg, labels, splits, dist_info
        self.device = dist_info.device
        self.model = model.to(self.device)
        self.main = dist_info.is_main
        c = model.config
        tr = splits["train"]
        self.train_set = VideoClips([labels.paths[i] for i in tr], labels.targets[tr], clip_frames=c.clip_frames,
                                    img_size=c.img_size, sample_rate=cfg.sample_rate, train=True, hflip=cfg.hflip,
                                    seed=cfg.seed, jitter=cfg.train_clip == "random")  # fmt: skip
        self.sampler = ShardedBatchSampler(len(tr), cfg.batch_size, dist_info.rank, dist_info.world_size, cfg.seed)
        steps = self.sampler.steps
        total = steps * cfg.epochs
        warmup = min(total, round(cfg.warmup_epochs * steps))
        self.schedule = CosineSchedule(cfg.lr, min(cfg.min_lr, cfg.lr), min(cfg.min_lr, cfg.lr), warmup, total)
        if cfg.freeze_encoder:
            model.encoder.requires_grad_(False)
        model.encoder.grad_checkpointing = cfg.grad_checkpointing
        if cfg.compile:
            compile_each(model.encoder.blocks)
        self.groups = layer_decay_groups(model, cfg.lr, cfg.weight_decay, cfg.layer_decay)
        self.optimizer = make_optimizer(self.groups, cfg.lr)
        self.params = [p for g in self.groups for p in g["params"]]
        self.net = wrap_ddp(model, dist_info)
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
        first = self.step
        self._loss_sum = torch.zeros(2, dtype=torch.float64)  # (sum of sample losses, samples) on this rank
        self._epoch, self._first, self._sampler = epoch, first, sampler
        self._t0, self._lr = time.perf_counter(), self.schedule(first)
        end = train_steps(self._train_step, iter(loader), start=first, stop=first + sampler.steps,
                          schedule=self.schedule, optimizers=(self.optimizer,), on_step=self._after_step,
                          pad_missing=True)  # fmt: skip
        self.step = end.step
        if dist.world_size > 1:
            import torch.distributed as tdist

            tdist.all_reduce(self._loss_sum, op=tdist.ReduceOp.SUM)
        return {"train_loss": float(self._loss_sum[0] / max(self._loss_sum[1], 1)), "lr": self._lr}

    def _train_step(self, micro: list[dict[str, Tensor] | None]) -> dict[str, float]:
        """One supervised update; a rank whose share of the last global batch is empty runs a zero-loss step so that
        DDP's gradient all-reduce still lines up."""
        batch, i = micro[0], self.step - self._first
        count = self._sampler.global_count(i)
        if batch is None:
            x, target = self._dummy(), None
        else:
            x = batch["video"].to(self.device, non_blocking=True).float().div_(255.0)
            target = batch["target"].to(self.device, non_blocking=True)
        with autocast(self.device, self.cfg.precision):
            scores = self.net(x)
        if target is None:
            loss = scores.float().sum() * 0.0
        else:
            per = self.model.per_sample_loss(scores, target)
            loss = per.sum() * (self.dist.world_size / count)  # DDP averages over ranks -> mean over the global batch
            self._loss_sum += torch.tensor([float(per.detach().sum()), len(per)], dtype=torch.float64)
            if not torch.isfinite(per.detach()).all():
                raise RuntimeError(f"non-finite training loss at epoch {self._epoch + 1}, step {i + 1}: lower --lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.clip_grad is not None:
            nn.utils.clip_grad_norm_(self.params, self.cfg.clip_grad)
        self.optimizer.step()
        return {}

    def _after_step(self, step: int, metrics: dict[str, float], micro: list[Any]) -> None:
        """Progress line every `log_every` steps within an epoch (rank 0)."""
        self.step, self._lr = step, metrics["lr"]
        done, steps = step - self._first, self._sampler.steps
        if self.main and self.cfg.log_every and done % self.cfg.log_every == 0 and done < steps:
            el = time.perf_counter() - self._t0
            log.info("epoch %d step %d/%d: loss %.4g, lr %.3g, %.1f videos/s, epoch ETA %s", self._epoch + 1, done,
                     steps, float(self._loss_sum[0] / max(self._loss_sum[1], 1)), self._lr,
                     done * self._sampler.global_batch / max(el, 1e-9),
                     format_duration(el / done * (steps - done)))  # fmt: skip

    def predict_split(self, name: str) -> np.ndarray:
        idx = self.splits[name]
        c = self.model.config
        data = VideoClips([self.labels.paths[i] for i in idx], self.labels.targets[idx], clip_frames=c.clip_frames,
                          img_size=c.img_size, sample_rate=self.cfg.sample_rate, train=False,
                          n_clips=self.cfg.test_clips)  # fmt: skip
        every = list(range(len(idx)))
        r, w = self.dist.rank, self.dist.world_size
        local = _predict_shard(self.model, data, every[r::w], batch_size=self.cfg.batch_size,
                               workers=self.cfg.workers, device=self.device, precision=self.cfg.precision)  # fmt: skip
        return _gather_scores(local, every, r, w, self.model.num_outputs)

    def evaluate_split(self, name: str, ci: bool = False) -> dict[str, float]:
        """Metrics of a split (plus ``loss``: the training loss of the clip-averaged scores); with `ci` also the 95%
        bootstrap interval of the primary metric over the split's videos (``ci95_low`` / ``ci95_high``)."""
        scores = self.predict_split(name)
        targets = self.labels.targets[self.splits[name]]
        metrics = compute_metrics(self.model.task, targets, scores)
        if ci:
            metrics["ci95_low"], metrics["ci95_high"] = bootstrap_interval(self.model.task, np.asarray(targets), scores)
        with torch.no_grad():
            per = self.model.per_sample_loss(torch.as_tensor(scores, dtype=torch.float32, device=self.device),
                                             torch.as_tensor(targets, device=self.device))  # fmt: skip
        metrics["loss"] = float(per.mean())
        metrics["neg_loss"] = -metrics["loss"]
        return metrics


def _load_encoder(cfg: FinetuneConfig) -> MarlinEncoder:
    from ..models.model import from_spec

    return from_spec(cfg.model, full=False, random_init=cfg.random_init).encoder


@dataclass
class _Best:
    """Model selection across epochs: the best validation score so far and what it came with."""

    score: tuple[float, float] = (-math.inf, -math.inf)
    epoch: int = -1
    state: dict[str, Tensor] | None = None
    val: dict[str, float] | None = None
    stale: int = 0  # epochs since the last improvement


def _setup(cfg: FinetuneConfig, labels: LabelSet | None, encoder: MarlinEncoder | None, dist: DistInfo) -> _Run:
    """Read the labels, split them, build the model (identical on every rank) and the run."""
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
                          label=labels.label, sample_rate=cfg.sample_rate, test_clips=cfg.test_clips,
                          pool=cfg.pool, head_norm=cfg.head_norm, centre=cfg.centre)  # fmt: skip
    model.init_head(labels.targets[splits["train"]])
    return _Run(cfg, labels, model, splits, dist)


def _log_start(run: _Run, source: str, out: Path | None) -> None:
    cfg, labels, n = run.cfg, run.labels, {k: len(v) for k, v in run.splits.items()}
    what = f"{len(labels.names)} classes" if labels.task == "multiclass" else f"{labels.num_outputs} outputs"
    log.info("fine-tuning %s on %s: %s %r (%s), %d train / %d val / %d test videos, %d epochs x %d steps, "
             "global batch %d = %d x %d ranks, lr %.3g%s%s, device %s", run.model.config.name, source,
             labels.task, labels.label, what, n["train"], n["val"], n["test"], cfg.epochs, run.sampler.steps,
             run.sampler.global_batch, cfg.batch_size, run.dist.world_size, cfg.lr,
             f" (layer decay {cfg.layer_decay})" if cfg.layer_decay < 1 else "",
             ", encoder frozen" if cfg.freeze_encoder else "", run.dist.device)  # fmt: skip
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        splits_doc = {k: [labels.ids[i] for i in v] for k, v in run.splits.items()}
        atomic_write_text(out / SPLITS_FILE, json.dumps(splits_doc) + "\n")


def _select(run: _Run, best: _Best, epoch: int, val: dict[str, float], selection: str, out: Path | None) -> bool:
    """Keep the weights of epoch `epoch` when its validation score is the best so far (ties: the lower validation
    loss); rank 0 writes them to ``best.pt``. Returns whether it improved."""
    score = (val[selection] if not math.isnan(val[selection]) else -math.inf, val["neg_loss"])
    if not (score > best.score or best.state is None):
        best.stale += 1
        return False
    best.score, best.epoch, best.val, best.stale = score, epoch + 1, val, 0
    best.state = {k: v.detach().cpu().clone() for k, v in run.model.state_dict().items()}
    if run.main and out is not None:
        state = run.model.checkpoint(epoch=epoch + 1, val_metrics=json_safe(val), selection_metric=selection,
                                     finetune_config=json_safe(run.cfg.to_dict()))  # fmt: skip
        atomic_write(out / BEST_FILE, lambda p, s=state: torch.save(s, p))
    return True


def _fit_epochs(run: _Run, out: Path | None) -> tuple[list[dict[str, Any]], _Best, str, bool]:
    """Train epoch by epoch with validation, best-checkpointing and early stopping: (history, best, selection metric,
    stopped early)."""
    cfg, primary = run.cfg, primary_metric(run.labels.task)
    selection, best, history, t_start = primary, _Best(), [], time.perf_counter()
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        record: dict[str, Any] = {"epoch": epoch + 1, **run.train_epoch(epoch)}
        val = run.evaluate_split("val")
        if epoch == 0 and math.isnan(val[primary]):
            selection = "neg_loss"
            if run.main:
                log.warning("validation %s is undefined (e.g. one class only): selecting by validation loss", primary)
        improved = _select(run, best, epoch, val, selection, out)
        record.update(val=val, seconds=time.perf_counter() - t0)
        history.append(record)
        if run.main:
            eta = format_duration((time.perf_counter() - t_start) / (epoch + 1) * (cfg.epochs - epoch - 1))
            log.info("epoch %d/%d: train loss %.4g, val loss %.4g, val %s %.4f (best %.4f at epoch %d)%s, "
                     "lr %.3g, %s, ETA %s", epoch + 1, cfg.epochs, record["train_loss"], val["loss"], selection,
                     val[selection], best.val[selection], best.epoch, " *" if improved else "", record["lr"],
                     format_duration(record["seconds"]), eta)  # fmt: skip
        if cfg.patience and best.stale >= cfg.patience and epoch + 1 < cfg.epochs:
            if run.main:
                log.info("early stop: no better validation %s for %d epochs", selection, cfg.patience)
            return history, best, selection, True
    return history, best, selection, False


def _write_results(result: FinetuneResult, run: _Run, out: Path, source: str, model_spec: str | None,
                   seconds: float) -> None:  # fmt: skip
    """``results.json`` beside ``best.pt`` (rank 0)."""
    labels = run.labels
    doc = {
        "format": FINETUNE_FORMAT, "model": model_spec, "labels": source, "label": labels.label, "task": labels.task,
        "names": labels.names, "primary_metric": primary_metric(labels.task),
        "selection_metric": result.selection_metric, "world_size": run.dist.world_size,
        "n": {k: len(v) for k, v in run.splits.items()}, "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early, "epochs_run": len(result.history), "seconds": seconds,
        "metrics": result.metrics, "history": result.history, "checkpoint": str(out / BEST_FILE),
        "config": run.cfg.to_dict(),
    }  # fmt: skip
    result.results = atomic_write_text(out / RESULTS_FILE, json.dumps(json_safe(doc), indent=2) + "\n")
    result.checkpoint = out / BEST_FILE


def finetune(
    cfg: FinetuneConfig,
    *,
    labels: LabelSet | None = None,
    encoder: MarlinEncoder | None = None,
) -> FinetuneResult:
    """Fine-tune (as one process or as every rank of a torchrun job) and return the best model and its metrics.

    `labels` / `encoder` replace reading ``cfg.labels`` / loading ``cfg.model`` (library use, tests).
    """
    owns_group = not is_distributed()
    dist = init_distributed(cfg.device)
    allow_tf32(dist.device)
    try:
        t_start, source = time.perf_counter(), cfg.labels or "the label set"
        out = Path(cfg.out).expanduser() if cfg.out else None
        run = _setup(cfg, labels, encoder, dist)
        if run.main:
            _log_start(run, source, out)
        history, best, selection, stopped_early = _fit_epochs(run, out)
        run.model.load_state_dict(best.state)
        metrics: dict[str, dict[str, float] | None] = {"val": best.val}
        metrics["test"] = run.evaluate_split("test", ci=True) if len(run.splits["test"]) else None
        if cfg.eval_train:
            metrics["train"] = run.evaluate_split("train")
        result = FinetuneResult(metrics=metrics, history=history, best_epoch=best.epoch, selection_metric=selection,
                                model=run.model, splits=run.splits, labels=run.labels,
                                stopped_early=stopped_early)  # fmt: skip
        if run.main:
            if metrics["test"] is None:
                log.warning("no test videos: test metrics skipped")
            else:
                log.info("test (best epoch %d): %s", best.epoch,
                         ", ".join(f"{k} {v:.4f}" for k, v in metrics["test"].items() if k != "neg_loss"))  # fmt: skip
            if out is not None:
                spec = None if encoder is not None else cfg.model
                _write_results(result, run, out, source, spec, time.perf_counter() - t_start)
        return result
    finally:
        if owns_group:
            shutdown_distributed()
