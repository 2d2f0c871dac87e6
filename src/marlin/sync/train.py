"""Training the lip-sync expert (``marlin sync-train``) on the engine that pretraining and fine-tuning use.

Each optimiser step takes ``batch_size`` items of :class:`marlin.data.SyncPairs`-style pairs per process (item ``g``
of the run's sample stream is fixed by ``(seed, g)``), scores every clip against its in-sync and shifted mel windows
and minimises Wav2Lip's expert loss: binary cross-entropy of the cosine logit, in-sync pairs weighted as much as all
shifted ones together. Held-out videos give a validation loss and the in-sync vs shifted AUC every ``val_every``
steps and at the end.

Outputs in ``out``: ``last.pt`` (model, optimiser, step: ``--resume`` continues from it, exactly where it stopped),
``expert.pt`` (the final expert; :func:`marlin.sync.expert.load_expert` and ``marlin sync --model`` read it),
``results.json`` (config, videos per split, history). torchrun-ready: the model is wrapped in DDP and every rank reads
its own share of each global batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..models.encoder import MarlinEncoder
from ..train.steprun import StepRun, VideoRunConfig, encoder_scaled_optimizer, run_to_end, split_videos
from ..utils.distributed import DistInfo
from ..utils.fileio import json_safe
from ..utils.precision import autocast
from ..utils.seeding import derive_seed
from .data import SyncPairs
from .expert import VISUAL_STREAMS, SyncExpert

__all__ = ["SyncTrainConfig", "SyncTrainResult", "evaluate_pairs", "sync_train"]

log = logging.getLogger("marlin")

EXPERT_FILE = "expert.pt"


@dataclass
class SyncTrainConfig(VideoRunConfig):
    """Everything a ``marlin sync-train`` run depends on (stored in its checkpoints and ``results.json``); the shared
    fields are :class:`marlin.train.steprun.VideoRunConfig`'s."""

    visual: str = "encoder"  # "pixels": the raw-pixel baseline stream instead of the encoder (`model` gives the sizes)
    freeze_encoder: bool = False
    encoder_lr_scale: float = 0.1  # the encoder trains at lr * this (it is pretrained; the heads are new)
    embed_dim: int = 128
    negatives: int = 2  # shifted windows per clip
    min_shift: int = 2
    max_shift: int = 15

    def checks(self) -> list[tuple[bool, str]]:
        return [*super().checks(),
                (self.batch_size >= 2, f"batch size must be >= 2 (the embeddings are batch-normalised), got "
                                       f"{self.batch_size}"),
                (self.visual in VISUAL_STREAMS,
                 f"visual must be one of {VISUAL_STREAMS}, got {self.visual!r}")]  # fmt: skip


@dataclass
class SyncTrainResult:
    expert: SyncExpert
    history: list[dict[str, float]] = field(default_factory=list)
    val: dict[str, float] | None = None
    step: int = 0
    stopped_by: int = 0
    checkpoint: Path | None = None


def pair_loss(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Per-clip expert loss ``[B]`` of logits ``[B, 1 + K]`` (column 0 in sync, the rest shifted): BCE, the in-sync
    pair weighted 1/2 and each shifted one 1/(2K); and whether each clip's in-sync logit is its highest ``[B]``."""
    target = torch.zeros_like(logits)
    target[:, 0] = 1.0
    k = logits.shape[1] - 1
    weight = torch.full_like(logits, 0.5 / k)
    weight[:, 0] = 0.5
    per = (F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none") * weight).sum(1)
    return per, logits.argmax(1) == 0


@torch.no_grad()
def evaluate_pairs(expert: SyncExpert, data: SyncPairs, *, batch_size: int = 8, workers: int = 0,
                   device: torch.device | str = "cpu") -> dict[str, float]:  # fmt: skip
    """Loss, in-sync-first accuracy and in-sync vs shifted AUC over the deterministic pairs of `data` (train=False)."""
    from ..evaluate.metrics import binary_auc

    expert.eval()
    device = torch.device(device)
    loader = DataLoader(data, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    losses, firsts, scores, labels = [], [], [], []
    for batch in loader:
        video, mel = batch["video"].to(device, non_blocking=True), batch["mel"].to(device, non_blocking=True)
        logits = expert(video.float().div_(255.0), mel).float().cpu()
        per, first = pair_loss(logits)
        losses.append(per), firsts.append(first)
        scores.append(logits.flatten())
        labels.append((batch["shift"] == 0).flatten())
    y, s = torch.cat(labels).numpy(), torch.cat(scores).numpy()
    return {"loss": float(torch.cat(losses).mean()), "first": float(torch.cat(firsts).float().mean()),
            "auc": binary_auc(y.astype(np.int64), s)}  # fmt: skip


def _build(cfg: SyncTrainConfig, encoder: MarlinEncoder | None) -> SyncExpert:
    if encoder is None:
        from ..models.model import from_spec

        encoder = from_spec(cfg.model, full=False, random_init=cfg.random_init or cfg.visual == "pixels").encoder
    torch.manual_seed(derive_seed(cfg.seed, "init"))  # identical heads on every rank
    return SyncExpert(encoder.config, embed_dim=cfg.embed_dim, fps=cfg.fps, visual=cfg.visual,
                      encoder=encoder if cfg.visual == "encoder" else None)  # fmt: skip


class _Run(StepRun):
    """One ``marlin sync-train`` run: data, expert, optimiser and the training step (the rest: StepRun)."""

    name = "sync-train"

    def __init__(self, cfg: SyncTrainConfig, dist: DistInfo, encoder: MarlinEncoder | None) -> None:
        self.cfg, self.dist = cfg, dist
        self.train_videos, self.val_videos = split_videos(cfg)
        self.expert = self.model = _build(cfg, encoder).to(dist.device)
        if cfg.freeze_encoder and self.expert.encoder is not None:
            self.expert.encoder.requires_grad_(False)
        c = self.expert.config
        common = dict(clip_frames=c.clip_frames, size=c.img_size, mel_length=self.expert.mel_length,
                      crop_face=cfg.crop_face, detector=cfg.detector, negatives=cfg.negatives,
                      min_shift=cfg.min_shift, max_shift=cfg.max_shift, seed=cfg.seed)  # fmt: skip
        self.train_set = SyncPairs(self.train_videos, **common)
        self.val_set = SyncPairs(self.val_videos, train=False, **common) if self.val_videos else None
        self.optimizer = encoder_scaled_optimizer(self.expert, self.expert.encoder, cfg)
        self.start()

    def train_step(self, micro: list[dict[str, Tensor]]) -> dict[str, float]:
        batch, dev = micro[0], self.dist.device
        self.net.train()
        if self.cfg.freeze_encoder and self.expert.encoder is not None:
            self.expert.encoder.eval()
        with autocast(dev, self.cfg.precision):
            video, mel = batch["video"].to(dev, non_blocking=True), batch["mel"].to(dev, non_blocking=True)
            logits = self.net(video.float().div_(255.0), mel)
        per, first = pair_loss(logits)
        loss = per.mean()
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite sync-train loss at step {self.step + 1}: lower --lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.clip_grad:
            nn.utils.clip_grad_norm_(self.params, self.cfg.clip_grad)
        self.optimizer.step()
        means = {"loss": float(per.detach().mean()), "first": float(first.float().mean())}
        self.record(means, len(per))
        return means

    def log_line(self, rec: dict[str, float], rate: float) -> str:
        return (
            f"loss {rec['loss']:.4f}, in-sync ranked first {rec['first']:.3f}, lr {rec['lr']:.3g}, {rate:.1f} clips/s"
        )

    def evaluate(self) -> dict[str, float]:
        """Loss, in-sync ranked first, in-sync vs shifted AUC."""
        return evaluate_pairs(self.expert, self.val_set, batch_size=self.cfg.batch_size, workers=self.cfg.workers,
                              device=self.dist.device)  # fmt: skip


def sync_train(cfg: SyncTrainConfig, *, resume: bool = False, encoder: MarlinEncoder | None = None) -> SyncTrainResult:
    """Train a lip-sync expert (one process, or every rank of a torchrun job); see the module docstring.

    ``resume`` continues ``out/last.pt``; without it an existing ``last.pt`` is refused rather than overwritten.
    `encoder` replaces loading ``cfg.model`` (library use, tests).
    """

    def describe(run: StepRun) -> str:
        return (f"{run.model.config.name}: {len(run.train_videos)} train / {len(run.val_videos)} val videos, steps "
                f"{run.step}..{cfg.steps}, batch {cfg.batch_size} x {run.dist.world_size} ranks, {cfg.negatives} "
                f"shifted windows per clip, device {run.dist.device}")  # fmt: skip

    run, stopped_by = run_to_end(lambda dist: _Run(cfg, dist, encoder), cfg, resume, describe)
    result = SyncTrainResult(run.expert, run.history, val=run.val if not stopped_by else None, step=run.step,
                             stopped_by=stopped_by)  # fmt: skip
    if not stopped_by:
        ckpt = run.expert.checkpoint(step=run.step, val_metrics=json_safe(run.val),
                                     train_config=json_safe(cfg.to_dict()), crop_face=cfg.crop_face,
                                     detector=cfg.detector)  # fmt: skip
        result.checkpoint = run.write_outputs(ckpt, EXPERT_FILE, "expert")
    return result
