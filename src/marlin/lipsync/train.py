"""Training the lip generator (``marlin lipsync-train``) on the engine that pretraining and the sync expert use.

Each optimiser step takes ``batch_size`` windows of :class:`marlin.lipsync.data.LipWindows` per process (a face
window, a reference window of the same video, the sound in sync with the face), draws the lower half from the upper
half + reference + sound, and minimises ``(1 - sync_weight) * L1 + sync_weight * sync loss`` (Wav2Lip's generator
objective; the sync loss is ``-log P(in sync)`` of a frozen expert from ``marlin sync-train``, left out when no
expert is given). Held-out videos give, every ``val_every`` steps and at the end: the L1 of the drawn mouth, the L1
of copying the reference mouth (the baseline the generator must beat), and the expert's P(in sync) of drawn and of
real windows.

Outputs in ``out``: ``last.pt`` (``--resume`` continues exactly where it stopped), ``generator.pt`` (read by
:func:`marlin.lipsync.model.load_generator` and ``marlin lipsync --model``), ``results.json``. torchrun-ready.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..mae.patches import patchify
from ..utils.distributed import DistInfo, init_distributed, is_distributed, shutdown_distributed
from ..utils.fileio import atomic_write, atomic_write_text, json_safe
from ..utils.optim import make_optimizer, param_groups
from ..utils.precision import autocast
from ..utils.schedule import CosineSchedule
from ..utils.seeding import derive_seed
from .data import LipWindows
from .losses import PIXEL_LOSSES, pixel_loss, sync_loss
from .model import LipGenerator

__all__ = ["LipsyncTrainConfig", "LipsyncTrainResult", "evaluate_generator", "lipsync_train"]

log = logging.getLogger("marlin")

LAST_FILE, GENERATOR_FILE, RESULTS_FILE = "last.pt", "generator.pt", "results.json"


@dataclass
class LipsyncTrainConfig:
    """Everything a ``marlin lipsync-train`` run depends on (stored in its checkpoints and ``results.json``)."""

    videos: tuple[str, ...] = ()  # training videos (with sound) or store items
    val_videos: tuple[str, ...] = ()  # held-out videos; empty: `val_fraction` of `videos`
    val_fraction: float = 0.1
    model: str = "marlin_vit_base_ytf"  # the face encoder: registered name, checkpoint or save_pretrained directory
    random_init: bool = False
    pixel_loss: str = "mse"  # "l1" as Wav2Lip; why MSE: marlin.lipsync.losses.pixel_loss
    expert: str | None = None  # a marlin sync-train expert.pt for the sync loss; None: the pixel loss only
    # Wav2Lip uses 0.03 once its generator is warm. Why 0 here: against our raw-pixel expert (a linear map of pooled
    # grey pixels) a weight of 0.03 raised P(in sync) of drawn mouths from 0.01 to 0.78 in 140 steps while their
    # error grew (L1 0.044 vs 0.034 for copying the reference): the generator learned to fool the expert.
    sync_weight: float = 0.0
    encoder_lr_scale: float = 1.0  # the encoder's lr = lr * this
    fps: float = 25.0  # frame rate the mel windows are sized for (other rates are resampled to it)
    crop_face: bool = True  # False: the videos are face crops already (centre-cropped)
    detector: str = "mediapipe"
    steps: int = 3000
    batch_size: int = 8  # windows per process and step
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
                  (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
                  (0 <= self.sync_weight < 1, f"sync weight must be in [0, 1), got {self.sync_weight}"),
                  (self.pixel_loss in PIXEL_LOSSES, f"pixel loss must be one of {PIXEL_LOSSES}"),
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
class LipsyncTrainResult:
    generator: LipGenerator
    history: list[dict[str, float]] = field(default_factory=list)
    val: dict[str, float] | None = None
    step: int = 0
    stopped_by: int = 0
    checkpoint: Path | None = None


def load_frozen_expert(path: str, generator: LipGenerator, device: torch.device) -> Any:
    """The sync expert for the loss: eval mode, no parameter gradients; refused when its windows differ from the
    generator's (frames, mel length)."""
    from ..sync.expert import load_expert

    expert = load_expert(path, map_location=device).requires_grad_(False)
    if expert.clip_frames != generator.clip_frames or expert.mel_length != generator.mel_length:
        raise ValueError(f"{path}: the expert reads {expert.clip_frames}-frame windows with {expert.mel_length} mel "
                         f"steps, the generator {generator.clip_frames} with {generator.mel_length}; train an expert "
                         "with the same clip length and fps")  # fmt: skip
    return expert


def window_losses(gen: LipGenerator, batch: dict[str, Tensor], expert: Any, sync_weight: float,
                  device: torch.device, net: nn.Module | None = None,
                  kind: str = "mse") -> dict[str, Tensor]:  # fmt: skip
    """Loss terms of one batch: ``mse`` and ``l1`` of the drawn mouth, ``ref_mse`` and ``ref_l1`` of copying the
    reference (the baseline), ``sync`` and ``p_sync`` (when an expert is given) and the weighted ``loss`` (`kind`
    is the pixel term). `net` runs the forward pass when given
    (the DDP wrapper of `gen`)."""
    c = gen.config
    target = batch["target"].to(device).float().div_(255.0)  # [B, 3, T, S, S]
    reference = batch["reference"].to(device).float().div_(255.0)
    mel = batch["mel"].to(device)  # [B, 80, L]
    pred = (net or gen)(target, reference, mel)  # [B, N_lower, patch_dim]
    truth = patchify(target, c.tubelet_size, c.patch_size)[:, gen.lower]
    ref = patchify(reference, c.tubelet_size, c.patch_size)[:, gen.lower]
    out = {
        "mse": pixel_loss(pred, truth, "mse"),
        "l1": pixel_loss(pred, truth, "l1"),
        "ref_mse": pixel_loss(ref, truth, "mse").detach(),
        "ref_l1": pixel_loss(ref, truth, "l1").detach(),
    }
    if expert is None:
        out["loss"] = out[kind]
        return out
    with torch.set_grad_enabled(torch.is_grad_enabled() and sync_weight > 0):  # weight 0: a report only
        out["sync"], out["p_sync"] = sync_loss(expert, gen.compose(target, pred), mel)
    out["loss"] = (1 - sync_weight) * out[kind] + sync_weight * out["sync"]
    return out


@torch.no_grad()
def evaluate_generator(gen: LipGenerator, data: LipWindows, *, expert: Any = None, batch_size: int = 8,
                       workers: int = 0, device: torch.device | str = "cpu") -> dict[str, float]:  # fmt: skip
    """Held-out means: ``mse`` / ``l1`` of the drawn mouth, ``ref_mse`` / ``ref_l1`` of the copied reference mouth
    and, with an expert, ``p_sync`` of drawn windows and ``p_sync_real`` of the real ones."""
    from .losses import expert_input

    gen.eval()
    device = torch.device(device)
    sums: dict[str, float] = {}
    n = 0
    for batch in DataLoader(data, batch_size=batch_size, num_workers=workers):
        terms = window_losses(gen, batch, expert, 0.0, device)
        b = len(batch["mel"])
        if expert is not None:
            real = batch["target"].to(device).float().div_(255.0)
            logit = expert(expert_input(expert, real), batch["mel"].to(device)[:, None])[:, 0]
            terms["p_sync_real"] = logit.sigmoid().mean()
            terms["p_sync"] = terms["p_sync"].mean()
        for k in ("mse", "ref_mse", "l1", "ref_l1", "p_sync", "p_sync_real"):
            if k in terms:
                sums[k] = sums.get(k, 0.0) + float(terms[k]) * b
        n += b
    return {k: v / max(n, 1) for k, v in sums.items()}


class _LipRun:
    """One training run: data, generator (+ frozen expert), optimiser, schedule, and the engine's callbacks."""

    def __init__(self, cfg: LipsyncTrainConfig, dist: DistInfo, encoder: nn.Module | None) -> None:
        from ..models.model import from_spec
        from ..sync.train import split_videos
        from ..train.engine import wrap_ddp

        self.cfg, self.dist, self.main = cfg, dist, dist.is_main
        self.out = Path(cfg.out).expanduser() if cfg.out else None
        self.train_videos, self.val_videos = split_videos(cfg)  # type: ignore[arg-type]  # same fields
        if encoder is None:
            encoder = from_spec(cfg.model, full=False, random_init=cfg.random_init).encoder
        torch.manual_seed(derive_seed(cfg.seed, "init"))  # identical new parts on every rank
        self.gen = LipGenerator(encoder.config, encoder=encoder, fps=cfg.fps).to(dist.device)
        self.expert = load_frozen_expert(cfg.expert, self.gen, dist.device) if cfg.expert else None
        c = self.gen.config
        common = dict(clip_frames=c.clip_frames, size=c.img_size, mel_length=self.gen.mel_length,
                      crop_face=cfg.crop_face, detector=cfg.detector, seed=cfg.seed)  # fmt: skip
        self.train_set = LipWindows(self.train_videos, **common)
        self.val_set = LipWindows(self.val_videos, train=False, **common) if self.val_videos else None
        groups = []
        for part, scale in ((self.gen.encoder, cfg.encoder_lr_scale), (self.gen, 1.0)):
            own = part is self.gen.encoder
            named = [(n, p) for n, p in part.named_parameters() if own or not n.startswith("encoder.")]
            for g in param_groups(named, weight_decay=cfg.weight_decay):
                groups.append({**g, "lr_scale": scale})
        self.optimizer = make_optimizer(groups, cfg.lr)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.net = wrap_ddp(self.gen, dist)
        low = min(cfg.min_lr, cfg.lr)
        self.schedule = CosineSchedule(cfg.lr, low, low, min(cfg.warmup_steps, cfg.steps), cfg.steps)
        self.step, self.history, self.val = 0, [], None
        self._sums: dict[str, float] = {}
        self._n, self._t0 = 0, time.perf_counter()

    def resume(self) -> None:
        """Continue from ``out/last.pt`` when it exists."""
        path = self.out / LAST_FILE if self.out is not None else None
        if path is None or not path.is_file():
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("train_videos") != self.train_videos:
            raise ValueError(f"{path}: that run trained on other videos; pass the same videos or another --out")
        self.gen.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.history = int(state["step"]), list(state.get("history", []))
        if self.main:
            log.info("resumed %s at step %d of %d", path, self.step, self.cfg.steps)

    def save(self) -> None:
        if not (self.main and self.out is not None):
            return
        self.out.mkdir(parents=True, exist_ok=True)
        state = {"state_dict": {k: v.detach().cpu() for k, v in self.gen.state_dict().items()},
                 "optimizer": self.optimizer.state_dict(), "step": self.step, "history": self.history,
                 "train_videos": self.train_videos, "config": json_safe(self.cfg.to_dict())}  # fmt: skip
        atomic_write(self.out / LAST_FILE, lambda p: torch.save(state, p))

    def train_step(self, micro: list[dict[str, Tensor]]) -> dict[str, float]:
        self.net.train()
        with autocast(self.dist.device, self.cfg.precision):
            terms = window_losses(
                self.gen, micro[0], self.expert, self.cfg.sync_weight, self.dist.device, self.net, self.cfg.pixel_loss
            )
        if not torch.isfinite(terms["loss"]):
            raise RuntimeError(f"non-finite lipsync-train loss at step {self.step + 1}: lower --lr")
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if self.cfg.clip_grad:
            nn.utils.clip_grad_norm_(self.params, self.cfg.clip_grad)
        self.optimizer.step()
        b = len(micro[0]["mel"])
        for k, v in terms.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v.detach().float().mean()) * b
        self._n += b
        return {k: float(v.detach().float().mean()) for k, v in terms.items()}

    def after_step(self, step: int, metrics: dict[str, float], micro: list[Any]) -> None:
        cfg = self.cfg
        self.step = step
        if step % cfg.log_every == 0 or step == cfg.steps:
            rec = {"step": step, "lr": metrics["lr"], **{k: v / max(self._n, 1) for k, v in self._sums.items()}}
            self.history.append(rec)
            if self.main:
                rate = self._n * self.dist.world_size / max(time.perf_counter() - self._t0, 1e-9)
                extra = f", sync loss {rec['sync']:.4f}, P(in sync) {rec['p_sync']:.3f}" if "sync" in rec else ""
                log.info("lipsync-train step %d/%d: MSE %.5f, L1 %.4f (copying the reference: %.5f, %.4f)%s, lr %.3g, "
                         "%.1f windows/s", step, cfg.steps, rec["mse"], rec["l1"], rec["ref_mse"], rec["ref_l1"], extra,
                         rec["lr"], rate)  # fmt: skip
            self._sums, self._n, self._t0 = {}, 0, time.perf_counter()
        if self.val_set is not None and cfg.val_every and step % cfg.val_every == 0 and step < cfg.steps:
            self.validate()
        if cfg.save_every and step % cfg.save_every == 0:
            self.save()

    def validate(self) -> dict[str, float] | None:
        if self.val_set is None:
            return None
        self.val = evaluate_generator(self.gen, self.val_set, expert=self.expert, batch_size=self.cfg.batch_size,
                                      workers=self.cfg.workers, device=self.dist.device)  # fmt: skip
        self.history.append({"step": self.step, **{f"val_{k}": v for k, v in self.val.items()}})
        if self.main:
            log.info("lipsync-train step %d: val %s", self.step, ", ".join(f"{k} {v:.4f}" for k, v in self.val.items()))
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

    def finish(self, stopped_by: int) -> LipsyncTrainResult:
        """Final validation and outputs (rank 0): last.pt, generator.pt, results.json."""
        result = LipsyncTrainResult(self.gen, self.history, step=self.step, stopped_by=stopped_by)
        self.save()
        if not stopped_by:
            result.val = self.validate()
        if self.main and self.out is not None and not stopped_by:
            ckpt = self.gen.checkpoint(step=self.step, val_metrics=json_safe(result.val),
                                       train_config=json_safe(self.cfg.to_dict()), crop_face=self.cfg.crop_face,
                                       detector=self.cfg.detector)  # fmt: skip
            result.checkpoint = atomic_write(self.out / GENERATOR_FILE, lambda p: torch.save(ckpt, p))
            doc = {"config": self.cfg.to_dict(), "train_videos": self.train_videos, "val_videos": self.val_videos,
                   "steps": self.step, "val": result.val, "history": self.history,
                   "generator": str(result.checkpoint)}  # fmt: skip
            atomic_write_text(self.out / RESULTS_FILE, json.dumps(json_safe(doc), indent=2) + "\n")
        return result


def lipsync_train(cfg: LipsyncTrainConfig, *, resume: bool = False,
                  encoder: nn.Module | None = None) -> LipsyncTrainResult:  # fmt: skip
    """Train a lip generator (one process, or every rank of a torchrun job); see the module docstring.

    ``resume`` continues ``out/last.pt``; without it an existing ``last.pt`` is refused rather than overwritten.
    `encoder` replaces loading ``cfg.model`` (library use, tests).
    """
    owns_group = not is_distributed()
    dist = init_distributed(cfg.device)
    try:
        run = _LipRun(cfg, dist, encoder)
        if run.out is not None and (run.out / LAST_FILE).is_file() and not resume:
            raise ValueError(f"{run.out}: holds a lipsync-train run (last.pt); pass --resume to continue it, "
                             "or another --out")  # fmt: skip
        if resume:
            run.resume()
        if run.main:
            sync = f"x{cfg.sync_weight} ({cfg.expert})" if run.expert is not None else "off"
            log.info("lipsync-train %s: %d train / %d val videos, steps %d..%d, batch %d x %d ranks, sync loss %s, "
                     "device %s", run.gen.config.name, len(run.train_videos), len(run.val_videos), run.step,
                     cfg.steps, cfg.batch_size, dist.world_size, sync, dist.device)  # fmt: skip
        stopped_by = run.loop() if run.step < cfg.steps else 0
        return run.finish(stopped_by)
    finally:
        if owns_group:
            shutdown_distributed()
