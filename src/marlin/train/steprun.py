"""A fixed-step training run over a seeded stream of video items, on the engine (``marlin sync-train``,
``marlin lipsync-train``): the config fields such runs share, the held-out split, ``last.pt`` resume, the log /
validation / checkpoint cadence and the final outputs.

Item ``g`` of a run's sample stream is fixed by ``(seed, g)`` and step ``s`` reads items ``s * batch * world ...``
(:func:`marlin.train.engine.rank_batches`), so a resumed or multi-process run reads exactly the items of one
uninterrupted run. A subclass of :class:`StepRun` builds its model, data and optimiser and defines one training step
and its validation; everything else is here.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..utils.distributed import DistInfo, init_distributed, is_distributed, shutdown_distributed
from ..utils.fileio import atomic_write, atomic_write_text, json_safe
from ..utils.precision import TRAIN_PRECISIONS, allow_tf32
from ..utils.seeding import derive_seed

__all__ = [
    "LAST_FILE",
    "RESULTS_FILE",
    "StepRun",
    "VideoRunConfig",
    "encoder_scaled_optimizer",
    "run_to_end",
    "split_videos",
]

log = logging.getLogger("marlin")

LAST_FILE, RESULTS_FILE = "last.pt", "results.json"


@dataclass
class VideoRunConfig:
    """The fields every video-item run has (its subclass adds its own; all are stored in checkpoints and
    ``results.json``)."""

    videos: tuple[str, ...] = ()  # training videos (with sound) or store items
    val_videos: tuple[str, ...] = ()  # held-out videos; empty: `val_fraction` of `videos`
    val_fraction: float = 0.1
    model: str = "marlin_vit_base_ytf"  # the encoder: registered name, checkpoint or save_pretrained directory
    random_init: bool = False
    encoder_lr_scale: float = 1.0  # the encoder trains at lr * this
    fps: float = 25.0  # frame rate the mel windows are sized for (other rates are resampled to it)
    crop_face: bool = True  # False: the videos are face crops already (centre-cropped)
    detector: str = "mediapipe"
    steps: int = 2000
    batch_size: int = 8  # items per process and step
    lr: float = 3e-4
    min_lr: float = 1e-6
    warmup_steps: int = 100
    weight_decay: float = 0.01
    clip_grad: float | None = 1.0
    workers: int = 2
    seed: int = 0
    out: str | None = None
    device: str = "auto"
    precision: str = "fp32"  # or "bf16", or "auto" (`training_precision`)
    save_every: int = 200
    val_every: int = 500
    log_every: int = 20

    def checks(self) -> list[tuple[bool, str]]:
        """(holds, message) pairs; a subclass extends the list."""
        return [(self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
                (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
                (self.lr > 0, f"lr must be > 0, got {self.lr}"),
                (0 <= self.val_fraction < 1, f"val fraction must be in [0, 1), got {self.val_fraction}"),
                (self.precision in TRAIN_PRECISIONS, f"precision must be auto, fp32 or bf16, got {self.precision!r}"),
                (self.fps > 0, f"fps must be > 0, got {self.fps}")]  # fmt: skip

    def __post_init__(self) -> None:
        self.videos, self.val_videos = tuple(map(str, self.videos)), tuple(map(str, self.val_videos))
        for ok, msg in self.checks():
            if not ok:
                raise ValueError(msg)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["videos"], d["val_videos"] = list(self.videos), list(self.val_videos)
        return d


def split_videos(cfg: VideoRunConfig) -> tuple[list[str], list[str]]:
    """(train, val) video lists: the given held-out set, else a seeded `val_fraction` of the videos."""
    videos = list(cfg.videos)
    if cfg.val_videos or cfg.val_fraction == 0:
        return videos, list(cfg.val_videos)
    order = np.random.default_rng(derive_seed(cfg.seed, "val-split")).permutation(len(videos))
    n_val = max(1, round(cfg.val_fraction * len(videos))) if len(videos) > 1 else 0
    return [videos[i] for i in sorted(order[n_val:])], [videos[i] for i in sorted(order[:n_val])]


def encoder_scaled_optimizer(model: nn.Module, encoder: nn.Module | None, cfg: VideoRunConfig) -> torch.optim.Optimizer:
    """The optimiser of `model` whose submodule `encoder` (None: none) trains at ``lr * cfg.encoder_lr_scale`` and
    everything else at ``lr``; frozen parameters left out, weight decay as :func:`marlin.utils.optim.param_groups`."""
    from ..utils.optim import make_optimizer, param_groups

    prefix = next((n + "." for n, m in model.named_modules() if m is encoder), None) if encoder is not None else None
    groups = []
    for part, scale in ((encoder, cfg.encoder_lr_scale), (model, 1.0)):
        if part is None:
            continue
        own = part is encoder
        named = [(n, q) for n, q in part.named_parameters() if own or prefix is None or not n.startswith(prefix)]
        groups += [{**g, "lr_scale": scale} for g in param_groups(named, weight_decay=cfg.weight_decay)]
    return make_optimizer(groups, cfg.lr)


class StepRun:
    """One run. A subclass's ``__init__`` sets ``cfg``, ``dist``, ``model`` (what ``last.pt`` holds), ``optimizer``,
    ``train_set``, ``val_set`` (or None), ``train_videos`` and ``val_videos``, then calls :meth:`start` (which adds
    ``net``, the DDP wrapper, ``params`` and the cosine ``schedule``); it defines :meth:`train_step` (which reports
    its per-item means with :meth:`record`), :meth:`evaluate` (held-out metrics) and :meth:`log_line`."""

    name = "run"  # the command, in messages
    cfg: VideoRunConfig
    dist: DistInfo
    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_set: Dataset
    val_set: Dataset | None
    train_videos: list[str]
    val_videos: list[str]

    def start(self) -> None:
        from ..utils.schedule import CosineSchedule
        from .engine import wrap_ddp

        cfg = self.cfg
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.net = wrap_ddp(self.model, self.dist)
        low = min(cfg.min_lr, cfg.lr)
        self.schedule = CosineSchedule(cfg.lr, low, low, min(cfg.warmup_steps, cfg.steps), cfg.steps)
        self.main = self.dist.is_main
        self.out = Path(self.cfg.out).expanduser() if self.cfg.out else None
        self.step, self.history, self.val = 0, [], None
        self._sums: dict[str, float] = {}
        self._n, self._t0 = 0, time.perf_counter()

    def train_step(self, micro: list[Any]) -> dict[str, float]:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        """Metrics of the model on ``val_set``."""
        raise NotImplementedError

    def validate(self) -> dict[str, float] | None:
        """:meth:`evaluate`, kept in ``val`` and the history, logged; None without held-out videos."""
        if self.val_set is None:
            return None
        self.val = self.evaluate()
        self.history.append({"step": self.step, **{f"val_{k}": v for k, v in self.val.items()}})
        if self.main:
            log.info("%s step %d: val %s", self.name, self.step, ", ".join(f"{k} {v:.4f}" for k, v in self.val.items()))
        return self.val

    def log_line(self, rec: dict[str, float], rate: float) -> str:
        raise NotImplementedError

    def extra_state(self) -> dict[str, Any]:
        """Modules and optimisers besides ``model`` and ``optimizer`` that ``last.pt`` keeps (a critic and its
        optimiser), by name; none by default."""
        return {}

    def record(self, means: dict[str, float], n: int) -> None:
        """Add one step's per-item means over `n` items to the sums of the next log line."""
        for k, v in means.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v) * n
        self._n += n

    def resume(self) -> None:
        """Continue from ``out/last.pt`` when it exists."""
        path = self.out / LAST_FILE if self.out is not None else None
        if path is None or not path.is_file():
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("train_videos") != self.train_videos:
            raise ValueError(f"{path}: that run trained on other videos; pass the same videos or another --out")
        self.model.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        for name, obj in self.extra_state().items():
            if name not in state.get("extra", {}):
                raise ValueError(f"{path}: that run had no {name}; resume with its settings or use another --out")
            obj.load_state_dict(state["extra"][name])
        self.step, self.history = int(state["step"]), list(state.get("history", []))
        if self.main:
            log.info("resumed %s at step %d of %d", path, self.step, self.cfg.steps)

    def save(self) -> None:
        if not (self.main and self.out is not None):
            return
        self.out.mkdir(parents=True, exist_ok=True)
        state = {"state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                 "optimizer": self.optimizer.state_dict(), "step": self.step, "history": self.history,
                 "train_videos": self.train_videos, "config": json_safe(self.cfg.to_dict()),
                 "extra": {name: obj.state_dict() for name, obj in self.extra_state().items()}}  # fmt: skip
        atomic_write(self.out / LAST_FILE, lambda p: torch.save(state, p))

    def after_step(self, step: int, metrics: dict[str, float], micro: list[Any]) -> None:
        cfg = self.cfg
        self.step = step
        if step % cfg.log_every == 0 or step == cfg.steps:
            rec = {"step": step, **{k: v / max(self._n, 1) for k, v in self._sums.items()}, "lr": metrics["lr"]}
            self.history.append(rec)  # plain floats: last.pt loads with weights_only
            if self.main:
                rate = self._n * self.dist.world_size / max(time.perf_counter() - self._t0, 1e-9)
                log.info("%s step %d/%d: %s", self.name, step, cfg.steps, self.log_line(rec, rate))
            self._sums, self._n, self._t0 = {}, 0, time.perf_counter()
        if self.val_set is not None and cfg.val_every and step % cfg.val_every == 0 and step < cfg.steps:
            self.validate()
        if cfg.save_every and step % cfg.save_every == 0:
            self.save()

    def loop(self) -> int:
        """Run the remaining steps on the engine; returns the signal that stopped it early (0: ran to the end)."""
        from ..utils.distributed import GracefulStop
        from .engine import rank_batches, train_steps

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

    def write_outputs(self, checkpoint: dict[str, Any], file_name: str, key: str) -> Path | None:
        """Rank 0: the final model file `file_name` and ``results.json`` (config, videos, history; `key` names the
        model file). Returns the model file's path (None on other ranks or without ``out``)."""
        if not (self.main and self.out is not None):
            return None
        path = atomic_write(self.out / file_name, lambda p: torch.save(checkpoint, p))
        doc = {"config": self.cfg.to_dict(), "train_videos": self.train_videos, "val_videos": self.val_videos,
               "steps": self.step, "val": self.val, "history": self.history, key: str(path)}  # fmt: skip
        atomic_write_text(self.out / RESULTS_FILE, json.dumps(json_safe(doc), indent=2) + "\n")
        return path


def run_to_end(build: Callable[[DistInfo], StepRun], cfg: VideoRunConfig, resume: bool,
               describe: Callable[[StepRun], str]) -> tuple[StepRun, int]:  # fmt: skip
    """Build a run (one process, or every rank of a torchrun job), refuse to overwrite an existing ``last.pt`` unless
    `resume`, continue it when asked, log `describe(run)` and train the remaining steps; returns the run and the
    signal that stopped it (0: it ran to the end). The caller writes the outputs before returning."""
    owns_group = not is_distributed()
    dist = init_distributed(cfg.device)
    allow_tf32(dist.device)
    try:
        run = build(dist)
        if run.out is not None and (run.out / LAST_FILE).is_file() and not resume:
            raise ValueError(f"{run.out}: holds a {run.name} run (last.pt); pass --resume to continue it, "
                             "or another --out")  # fmt: skip
        if resume:
            run.resume()
        if run.main:
            log.info("%s %s", run.name, describe(run))
        stopped_by = run.loop() if run.step < cfg.steps else 0
        run.save()
        if not stopped_by:
            run.validate()
        return run, stopped_by
    finally:
        if owns_group:
            shutdown_distributed()
