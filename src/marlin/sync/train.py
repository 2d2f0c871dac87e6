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

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..models.encoder import MarlinEncoder
from ..utils.distributed import DistInfo, init_distributed, is_distributed, shutdown_distributed
from ..utils.fileio import atomic_write, atomic_write_text, json_safe
from ..utils.optim import make_optimizer, param_groups
from ..utils.precision import autocast
from ..utils.schedule import CosineSchedule
from ..utils.seeding import derive_seed
from .data import SyncPairs
from .expert import VISUAL_STREAMS, SyncExpert

__all__ = ["SyncTrainConfig", "SyncTrainResult", "evaluate_pairs", "sync_train"]

log = logging.getLogger("marlin")

LAST_FILE, EXPERT_FILE, RESULTS_FILE = "last.pt", "expert.pt", "results.json"


@dataclass
class SyncTrainConfig:
    """Everything a ``marlin sync-train`` run depends on (stored in its checkpoints and ``results.json``)."""

    videos: tuple[str, ...] = ()  # training videos (with sound)
    val_videos: tuple[str, ...] = ()  # held-out videos; empty: `val_fraction` of `videos`
    val_fraction: float = 0.1
    model: str = "marlin_vit_base_ytf"  # the encoder: registered name, checkpoint or save_pretrained directory
    random_init: bool = False
    visual: str = "encoder"  # "pixels": the raw-pixel baseline stream instead of the encoder (`model` gives the sizes)
    freeze_encoder: bool = False
    encoder_lr_scale: float = 0.1  # the encoder trains at lr * this (it is pretrained; the heads are new)
    embed_dim: int = 128
    fps: float = 25.0  # frame rate the mel windows are sized for (other rates are resampled to it)
    crop_face: bool = True  # False: the videos are face crops already (centre-cropped)
    detector: str = "mediapipe"
    steps: int = 2000
    batch_size: int = 8  # clips per process and step (>= 2: the embeddings' batch norm needs two)
    negatives: int = 2  # shifted windows per clip
    min_shift: int = 2
    max_shift: int = 15
    lr: float = 3e-4
    min_lr: float = 1e-6
    warmup_steps: int = 100
    weight_decay: float = 0.01
    clip_grad: float | None = 1.0
    workers: int = 2
    seed: int = 0
    out: str | None = None
    device: str = "auto"
    precision: str = "fp32"
    save_every: int = 200
    val_every: int = 500
    log_every: int = 20

    def __post_init__(self) -> None:
        self.videos, self.val_videos = tuple(map(str, self.videos)), tuple(map(str, self.val_videos))
        checks = [(self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
                  (self.batch_size >= 2, f"batch size must be >= 2 (the embeddings are batch-normalised), got "
                                         f"{self.batch_size}"),
                  (self.visual in VISUAL_STREAMS, f"visual must be one of {VISUAL_STREAMS}, got {self.visual!r}"),
                  (self.lr > 0, f"lr must be > 0, got {self.lr}"),
                  (0 <= self.val_fraction < 1, f"val fraction must be in [0, 1), got {self.val_fraction}"),
                  (self.precision in ("fp32", "bf16"), f"precision must be fp32 or bf16, got {self.precision!r}"),
                  (self.fps > 0, f"fps must be > 0, got {self.fps}")]  # fmt: skip
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["videos"], d["val_videos"] = list(self.videos), list(self.val_videos)
        return d


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


def split_videos(cfg: SyncTrainConfig) -> tuple[list[str], list[str]]:
    """(train, val) video lists: the given held-out set, else a seeded `val_fraction` of the videos."""
    videos = list(cfg.videos)
    if cfg.val_videos or cfg.val_fraction == 0:
        return videos, list(cfg.val_videos)
    order = np.random.default_rng(derive_seed(cfg.seed, "val-split")).permutation(len(videos))
    n_val = max(1, round(cfg.val_fraction * len(videos))) if len(videos) > 1 else 0
    return [videos[i] for i in sorted(order[n_val:])], [videos[i] for i in sorted(order[:n_val])]


@torch.no_grad()
def evaluate_pairs(expert: SyncExpert, data: SyncPairs, *, batch_size: int = 8, workers: int = 0,
                   device: torch.device | str = "cpu") -> dict[str, float]:  # fmt: skip
    """Loss, in-sync-first accuracy and in-sync vs shifted AUC over the deterministic pairs of `data` (train=False)."""
    from ..evaluate.metrics import binary_auc

    expert.eval()
    loader = DataLoader(data, batch_size=batch_size, num_workers=workers)
    losses, firsts, scores, labels = [], [], [], []
    for batch in loader:
        logits = expert(batch["video"].to(device).float().div_(255.0), batch["mel"].to(device)).float().cpu()
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


def _optimizer(cfg: SyncTrainConfig, expert: SyncExpert) -> torch.optim.Optimizer:
    if cfg.freeze_encoder and expert.encoder is not None:
        expert.encoder.requires_grad_(False)
    groups = []
    parts = ((expert.encoder, cfg.encoder_lr_scale), (expert, 1.0)) if expert.encoder is not None else ((expert, 1.0),)
    for part, scale in parts:
        named = [(n, p) for n, p in part.named_parameters() if part is expert.encoder or not n.startswith("encoder.")]
        for g in param_groups(named, weight_decay=cfg.weight_decay):
            g["lr_scale"] = scale
            groups.append(g)
    return make_optimizer(groups, cfg.lr)


class _Run:
    """One training run: data, model, optimiser, schedule and the step / validation / checkpoint callbacks."""

    def __init__(self, cfg: SyncTrainConfig, dist: DistInfo, encoder: MarlinEncoder | None) -> None:
        from ..train.engine import wrap_ddp

        self.cfg, self.dist, self.main = cfg, dist, dist.is_main
        self.out = Path(cfg.out).expanduser() if cfg.out else None
        self.train_videos, self.val_videos = split_videos(cfg)
        self.expert = _build(cfg, encoder).to(dist.device)
        c = self.expert.config
        common = dict(clip_frames=c.clip_frames, size=c.img_size, mel_length=self.expert.mel_length,
                      crop_face=cfg.crop_face, detector=cfg.detector, negatives=cfg.negatives,
                      min_shift=cfg.min_shift, max_shift=cfg.max_shift, seed=cfg.seed)  # fmt: skip
        self.train_set = SyncPairs(self.train_videos, **common)
        self.val_set = SyncPairs(self.val_videos, train=False, **common) if self.val_videos else None
        self.optimizer = _optimizer(cfg, self.expert)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.net = wrap_ddp(self.expert, dist)
        low = min(cfg.min_lr, cfg.lr)
        self.schedule = CosineSchedule(cfg.lr, low, low, min(cfg.warmup_steps, cfg.steps), cfg.steps)
        self.step, self.history, self.val = 0, [], None
        self._sums, self._t0 = np.zeros(3), time.perf_counter()  # (loss, first, clips) since the last log line

    def resume(self) -> bool:
        """Continue from ``out/last.pt`` when it exists; returns whether it did."""
        path = self.out / LAST_FILE if self.out is not None else None
        if path is None or not path.is_file():
            return False
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("train_videos") != self.train_videos:
            raise ValueError(f"{path}: that run trained on other videos; pass the same videos or another --out")
        self.expert.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.history = int(state["step"]), list(state.get("history", []))
        if self.main:
            log.info("resumed %s at step %d of %d", path, self.step, self.cfg.steps)
        return True

    def save(self) -> None:
        if not (self.main and self.out is not None):
            return
        self.out.mkdir(parents=True, exist_ok=True)
        state = {"state_dict": {k: v.detach().cpu() for k, v in self.expert.state_dict().items()},
                 "optimizer": self.optimizer.state_dict(), "step": self.step, "history": self.history,
                 "train_videos": self.train_videos, "config": json_safe(self.cfg.to_dict())}  # fmt: skip
        atomic_write(self.out / LAST_FILE, lambda p: torch.save(state, p))

    def train_step(self, micro: list[dict[str, Tensor]]) -> dict[str, float]:
        batch, dev = micro[0], self.dist.device
        self.net.train()
        if self.cfg.freeze_encoder and self.expert.encoder is not None:
            self.expert.encoder.eval()
        with autocast(dev, self.cfg.precision):
            logits = self.net(batch["video"].to(dev).float().div_(255.0), batch["mel"].to(dev))
        per, first = pair_loss(logits)
        loss = per.mean()
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite sync-train loss at step {self.step + 1}: lower --lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.clip_grad:
            nn.utils.clip_grad_norm_(self.params, self.cfg.clip_grad)
        self.optimizer.step()
        self._sums += (float(per.detach().sum()), float(first.float().sum()), len(per))
        return {"loss": float(loss.detach()), "first": float(first.float().mean())}

    def after_step(self, step: int, metrics: dict[str, float], micro: list[Any]) -> None:
        cfg = self.cfg
        self.step = step
        if step % cfg.log_every == 0 or step == cfg.steps:
            loss, first, n = (float(x) for x in self._sums)  # plain floats: last.pt loads with weights_only
            rec = {"step": step, "loss": loss / max(n, 1), "first": first / max(n, 1), "lr": metrics["lr"]}
            self.history.append(rec)
            if self.main:
                rate = n * self.dist.world_size / max(time.perf_counter() - self._t0, 1e-9)
                log.info("sync-train step %d/%d: loss %.4f, in-sync ranked first %.3f, lr %.3g, %.1f clips/s", step,
                         cfg.steps, rec["loss"], rec["first"], rec["lr"], rate)  # fmt: skip
            self._sums, self._t0 = np.zeros(3), time.perf_counter()
        if self.val_set is not None and cfg.val_every and step % cfg.val_every == 0 and step < cfg.steps:
            self.validate()
        if cfg.save_every and step % cfg.save_every == 0:
            self.save()

    def validate(self) -> dict[str, float] | None:
        if self.val_set is None:
            return None
        self.val = evaluate_pairs(self.expert, self.val_set, batch_size=self.cfg.batch_size,
                                  workers=self.cfg.workers, device=self.dist.device)  # fmt: skip
        self.history.append({"step": self.step, **{f"val_{k}": v for k, v in self.val.items()}})
        if self.main:
            log.info("sync-train step %d: val loss %.4f, in-sync ranked first %.3f, in-sync vs shifted AUC %.4f",
                     self.step, self.val["loss"], self.val["first"], self.val["auc"])  # fmt: skip
        return self.val

    def loop(self) -> int:
        """Run the remaining steps on the engine; returns the signal that stopped it early (0: ran to the end)."""
        from ..train.engine import rank_batches, train_steps
        from ..utils.distributed import GracefulStop

        cfg, d = self.cfg, self.dist
        sampler = rank_batches(self.step, cfg.steps, cfg.batch_size, d.rank, d.world_size)
        loader = DataLoader(self.train_set, batch_sampler=sampler, num_workers=cfg.workers,
                            persistent_workers=False, pin_memory=d.device.type == "cuda")  # fmt: skip
        with GracefulStop() as signals:
            end = train_steps(self.train_step, iter(loader), start=self.step, stop=cfg.steps, schedule=self.schedule,
                              optimizers=(self.optimizer,), on_step=self.after_step, signals=signals,
                              device=d.device)  # fmt: skip
        self.step = end.step
        return end.stopped_by


def _finish(run: _Run, stopped_by: int) -> SyncTrainResult:
    """Final validation and outputs (rank 0): last.pt, expert.pt, results.json."""
    result = SyncTrainResult(run.expert, run.history, step=run.step, stopped_by=stopped_by)
    run.save()
    if not stopped_by:
        result.val = run.validate()
    if run.main and run.out is not None and not stopped_by:
        ckpt = run.expert.checkpoint(step=run.step, val_metrics=json_safe(result.val),
                                     train_config=json_safe(run.cfg.to_dict()), crop_face=run.cfg.crop_face,
                                     detector=run.cfg.detector)  # fmt: skip
        result.checkpoint = atomic_write(run.out / EXPERT_FILE, lambda p: torch.save(ckpt, p))
        doc = {"config": run.cfg.to_dict(), "train_videos": run.train_videos, "val_videos": run.val_videos,
               "steps": run.step, "val": result.val, "history": run.history,
               "expert": str(result.checkpoint)}  # fmt: skip
        atomic_write_text(run.out / RESULTS_FILE, json.dumps(json_safe(doc), indent=2) + "\n")
    return result


def sync_train(cfg: SyncTrainConfig, *, resume: bool = False, encoder: MarlinEncoder | None = None) -> SyncTrainResult:
    """Train a lip-sync expert (one process, or every rank of a torchrun job); see the module docstring.

    ``resume`` continues ``out/last.pt``; without it an existing ``last.pt`` is refused rather than overwritten.
    `encoder` replaces loading ``cfg.model`` (library use, tests).
    """
    owns_group = not is_distributed()
    dist = init_distributed(cfg.device)
    try:
        run = _Run(cfg, dist, encoder)
        if run.out is not None and (run.out / LAST_FILE).is_file() and not resume:
            raise ValueError(f"{run.out}: holds a sync-train run (last.pt); pass --resume to continue it, "
                             "or another --out")  # fmt: skip
        if resume:
            run.resume()
        if run.main:
            log.info("sync-train %s: %d train / %d val videos, steps %d..%d, batch %d x %d ranks, %d shifted windows "
                     "per clip, device %s", run.expert.config.name, len(run.train_videos), len(run.val_videos),
                     run.step, cfg.steps, cfg.batch_size, dist.world_size, cfg.negatives, dist.device)  # fmt: skip
        stopped_by = run.loop() if run.step < cfg.steps else 0
        return _finish(run, stopped_by)
    finally:
        if owns_group:
            shutdown_distributed()
