"""The pretraining step and loop.

One iteration (the official order: critic first, then the generator against the updated critic)::

    pred = G(x, visible)                                   # one encoder/decoder forward, graph kept
    repeat d_steps:  critic step on  D(pred.detach()) vs D(target)   [+ gradient penalty]
    generator step on  rec(pred, target) + adv_weight * -mean(D'(pred))   with D' the updated critic, frozen

The official trainer runs the full forward twice (once per player) and back-propagates the critic loss through the
encoder/decoder only to throw those gradients away. The generator weights do not change during the critic steps, so
both forwards give the same `pred`: reusing it gives the same updates (tested) for about half the compute. Extra
generator steps (`g_steps > 1`) forward again, since the generator has changed. With gradient accumulation the
micro-batches are first forwarded without a graph for the critic, then again with one for the generator, which keeps
the same alternating semantics (and equality with one large batch) at the cost of one cheap forward.

Randomness is a function of (seed, step, sample position) — masks (drawn per batch by the DataLoader's
:class:`~marlin.data.collate.MaskCollator`), data order, the gradient-penalty factor — so a run gives the same losses
on 1 or N processes for the same global batch, and a resumed run continues exactly. The loop itself is the shared
engine (:func:`marlin.train.engine.train_steps`); this module adds the two players' updates, held-out evaluation,
checkpoints and exports.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from ..data.collate import MaskCollator
from ..data.datasets import balance_weights
from ..data.sampling import KeyedItems, StreamBatchSampler
from ..mae.critic import PatchCritic
from ..mae.losses import critic_loss, generator_adv_loss, gradient_penalty, masked_targets, reconstruction_loss
from ..mae.masking import Masker
from ..models.config import MarlinConfig
from ..models.model import Marlin
from ..utils.distributed import (
    DistInfo,
    GracefulStop,
    all_reduce_grads,
    broadcast_module,
    init_distributed,
    is_distributed,
)
from ..utils.fileio import atomic_write_text, copy_atomic, save_atomic
from ..utils.monitor import Monitor, format_duration
from ..utils.optim import make_optimizer, param_groups
from ..utils.precision import allow_tf32, autocast
from ..utils.schedule import CosineSchedule, set_lr
from ..utils.seeding import capture_rng, derive_seed, restore_rng
from . import state as ckio
from .config import PretrainConfig, build_schedule
from .engine import train_steps, wrap_ddp
from .inputs import build_dataset, build_val_sets, val_indices
from .validate import heldout_image, validate

__all__ = ["NonFiniteLossError", "Pretrainer", "TrainResult", "train"]

log = logging.getLogger("marlin")


class NonFiniteLossError(RuntimeError):
    """Raised after `log.max_nonfinite` consecutive steps with a NaN/inf loss."""


@dataclass
class TrainResult:
    steps: int  # optimiser steps done (the final step index)
    history: list[dict[str, float]] = field(default_factory=list)  # per-step metrics of this process's run
    val: list[dict[str, float]] = field(default_factory=list)  # held-out metrics, one entry per evaluation
    checkpoint: Path | None = None
    exports: dict[str, Path] = field(default_factory=dict)
    stopped_by: int = 0  # signal (SIGINT / SIGTERM) that stopped the run early, checkpoint saved; 0 = ran to the end


@dataclass
class _Prepared:
    """One micro-batch on the device: clips, their masks and the hidden-patch targets."""

    x: Tensor  # [b, 3, T, H, W]
    visible: Tensor  # [b, N] bool
    target: Tensor  # [b, N_hidden, P] float32


@dataclass
class _RunState:
    """What `Pretrainer.fit` carries from step to step besides the trainer itself."""

    result: TrainResult
    monitor: Monitor
    val_sets: dict[str, tuple[Dataset, list[int]]]
    ckpt_dir: Path
    total: int  # steps of the run (its schedule)
    stop: int  # step this session ends at: `total`, or `stop_at` when that comes first
    saved_at: int | None = None  # step of the last checkpoint written


class Pretrainer:
    """Owns the model, critic, optimisers and schedule of one run on one process (one rank of a torchrun job).

    `train_step(micro_batches)` runs one optimiser step on collated batches, which carry their ``"visible"``
    ``[b, N]`` masks (:class:`marlin.data.collate.MaskCollator` draws them); `fit()` runs the whole loop (data,
    logging, held-out evaluation, checkpoints, exports) on the shared engine.
    """

    def __init__(
        self,
        cfg: PretrainConfig,
        *,
        dataset: Dataset | None = None,
        dist_info: DistInfo | None = None,
        model: Marlin | None = None,
    ) -> None:
        self.cfg = cfg
        self.dist = dist_info or init_distributed(cfg.device)
        self.device = self.dist.device
        allow_tf32(self.device)
        self.out_dir = Path(cfg.out_dir).expanduser()
        torch.manual_seed(derive_seed(cfg.seed, "init"))  # identical initial weights on every rank
        self.model = (model or Marlin(cfg.model, as_feature_extractor=False)).to(self.device)
        if not self.model.full:
            raise ValueError("pretraining needs a full model (encoder + decoder), got an encoder-only Marlin")
        if cfg.init:
            self._load_init(cfg.init)
        self.model.set_grad_checkpointing(cfg.grad_checkpointing)
        if cfg.compile:
            self.model.compile_blocks()
        self.model.train()
        self.critic = PatchCritic.from_config(cfg.model).to(self.device) if cfg.loss.adversarial else None
        torch.manual_seed(derive_seed(cfg.seed, "rank", self.dist.rank))  # per-rank stream for anything else
        self.g_opt = self._optimizer(self.model, self.model.no_weight_decay())
        self.d_opt = None
        if self.critic is not None:
            broadcast_module(self.critic)
            self.d_opt = self._optimizer(self.critic, set())
        self.net: nn.Module = wrap_ddp(self.model, self.dist, gradient_as_bucket_view=True)
        self.dataset = dataset
        self.step = 0
        self.nonfinite_streak = 0
        self.schedule: CosineSchedule | None = None

    # ---- setup ------------------------------------------------------------------------------------------------------
    def _optimizer(self, module: nn.Module, no_decay: set[str]) -> torch.optim.Optimizer:
        o = self.cfg.optim
        groups = param_groups(module.named_parameters(), weight_decay=o.weight_decay, no_weight_decay=no_decay)
        return make_optimizer(groups, o.lr, kind=o.type, betas=o.betas, eps=o.eps)

    def _load_init(self, path: str) -> None:
        """Start from a VideoMAE / marlin checkpoint: encoder (+ decoder when present), non-strict, logged."""
        from ..models.checkpoint import read_checkpoint

        ckpt = read_checkpoint(path)
        report = self.model.load_checkpoint(ckpt, strict=False)
        if self.dist.is_main:
            log.info(
                "initialised from %s (%s): %d missing, %d unexpected keys%s",
                path, ckpt.format, len(report.missing), len(report.unexpected),
                f" (missing e.g. {report.missing[:3]})" if report.missing else "",
            )  # fmt: skip

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.cfg.precision)

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    def ensure_schedule(self, steps_per_epoch: float) -> CosineSchedule:
        if self.schedule is None:
            self.schedule = build_schedule(self.cfg, steps_per_epoch, self.world_size)
        return self.schedule

    def masker(self) -> Masker:
        """The run's masking strategy bound to its model geometry."""
        return Masker.for_config(self.cfg.model, self.cfg.mask.strategy, self.cfg.mask.ratio)

    # ---- one step ---------------------------------------------------------------------------------------------------
    def _prepare(self, batch: dict[str, Any]) -> _Prepared:
        if batch.get("visible") is None:
            raise ValueError("train_step needs batches with 'visible' masks [b, N]; collate them with MaskCollator")
        c = self.cfg
        x = batch["video"].to(self.device, non_blocking=True)  # [b, 3, T, H, W]
        visible = batch["visible"].to(self.device)  # [b, N]
        target = masked_targets(x, visible, c.model.tubelet_size, c.model.patch_size, normalize=c.loss.norm_target)
        return _Prepared(x, visible, target)

    def _all_finite(self, *values: Tensor) -> bool:
        flag = torch.stack([torch.isfinite(v.detach().float()).all() for v in values]).all().float()
        if is_distributed():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def _clip(self, params: Any) -> None:
        if self.cfg.optim.clip_grad is not None:
            nn.utils.clip_grad_norm_(list(params), self.cfg.optim.clip_grad)

    def train_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, float]:
        """One optimiser step over `accum_steps` micro-batches at the scheduled rate; returns metrics averaged over
        micro-batches and ranks. A step whose losses are not finite updates nothing: {"skipped": 1.0, ...}."""
        c = self.cfg
        if self.schedule is None:
            raise RuntimeError("call ensure_schedule(steps_per_epoch) before train_step")
        if len(micro_batches) != c.accum_steps:
            raise ValueError(f"train_step expects accum_steps={c.accum_steps} micro-batches, got {len(micro_batches)}")
        lr = self.schedule(self.step)
        set_lr((self.g_opt, self.d_opt), lr)
        prepared = [self._prepare(b) for b in micro_batches]
        sums: dict[str, Tensor] = {}

        def add(name: str, value: Tensor) -> None:
            sums[name] = sums.get(name, 0.0) + value.detach().float() / len(prepared)

        # Forward once; with accumulation, a graph-free forward per micro-batch feeds the critic.
        pred0 = None
        if len(prepared) == 1:
            with self._autocast():
                pred0 = self.net(prepared[0].x, prepared[0].visible)  # [b, N_hidden, P]
            fakes = [pred0.detach()]
        else:
            with torch.no_grad(), self._autocast():
                fakes = [self.net(p.x, p.visible) for p in prepared]
        if self.critic is not None and not self.critic_update(prepared, fakes, add):
            return self._skip("critic", lr)
        if not self.generator_update(prepared, pred0, add):
            return self._skip("generator", lr)
        self.nonfinite_streak = 0
        return {**self._reduce(sums), "lr": lr}

    def critic_update(self, prepared: list[_Prepared], fakes: list[Tensor], add: Any) -> bool:
        """`d_steps` critic updates on the detached predictions `fakes`; False (no update) on a non-finite loss."""
        c = self.cfg
        g = torch.Generator().manual_seed(derive_seed(c.seed, "gp", self.step))
        alpha = torch.rand(1, generator=g).to(self.device)  # one interpolation factor per global batch
        for d_iter in range(c.loss.d_steps):
            last = d_iter == c.loss.d_steps - 1
            self.d_opt.zero_grad(set_to_none=True)
            for p, fake in zip(prepared, fakes, strict=True):
                with self._autocast():
                    fake_s, real_s = self.critic(torch.cat([fake, p.target.to(fake.dtype)])).chunk(2)  # [b, Nh, 1]
                    d_loss = critic_loss(real_s, fake_s)
                    total = d_loss
                    if c.loss.gp_weight > 0:
                        gp = gradient_penalty(self.critic, p.target, fake.float(), alpha)
                        total = d_loss + c.loss.gp_weight * gp
                        if last:
                            add("loss/gp", gp)
                (total / len(prepared)).backward()
                if last:
                    add("loss/critic", d_loss)
            if not self._all_finite(*(q.grad for q in self.critic.parameters() if q.grad is not None), total):
                return False
            all_reduce_grads(self.critic.parameters())
            self._clip(self.critic.parameters())
            self.d_opt.step()
        return True

    def generator_update(self, prepared: list[_Prepared], pred0: Tensor | None, add: Any) -> bool:
        """`g_steps` encoder/decoder updates against the (updated, frozen) critic; `pred0` is the step's first forward
        when it can be reused. False (nothing updated) on a non-finite loss."""
        for g_iter in range(self.cfg.loss.g_steps):
            self.g_opt.zero_grad(set_to_none=True)
            last = g_iter == self.cfg.loss.g_steps - 1
            losses = []
            for i, p in enumerate(prepared):
                no_sync = i < len(prepared) - 1 and isinstance(self.net, DistributedDataParallel)
                with self.net.no_sync() if no_sync else contextlib.nullcontext():
                    if pred0 is not None and g_iter == 0:
                        pred = pred0
                    else:
                        with self._autocast():
                            pred = self.net(p.x, p.visible)
                    loss = self._generator_loss(pred, p.target, add if last else None)
                    (loss / len(prepared)).backward()
                    losses.append(loss.detach())
            if not self._all_finite(*losses):
                return False
            self._clip(self.model.parameters())
            self.g_opt.step()
            pred0 = None
        return True

    def _generator_loss(self, pred: Tensor, target: Tensor, add: Any) -> Tensor:
        """Reconstruction + adv_weight x the frozen critic's score of `pred`; logged through `add` when given."""
        rec = reconstruction_loss(pred, target)
        loss = rec
        if self.critic is not None:
            self.critic.requires_grad_(False)
            with self._autocast():
                adv = generator_adv_loss(self.critic(pred))
            self.critic.requires_grad_(True)
            loss = rec + self.cfg.loss.adv_weight * adv
            if add is not None:
                add("loss/adv", adv)
        if add is not None:
            add("loss/rec", rec)
            add("loss/gen", loss)
        return loss

    def _reduce(self, sums: dict[str, Tensor]) -> dict[str, float]:
        """Per-rank metric sums -> means over ranks."""
        names = sorted(sums)
        values = torch.stack([sums[n] for n in names])
        if is_distributed():
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
            values /= self.world_size
        return dict(zip(names, values.tolist(), strict=True))

    def _skip(self, where: str, lr: float) -> dict[str, float]:
        self.g_opt.zero_grad(set_to_none=True)
        if self.d_opt is not None:
            self.d_opt.zero_grad(set_to_none=True)
        self.nonfinite_streak += 1
        log.warning(
            "step %d: non-finite %s loss, step skipped (%d in a row, limit %d)",
            self.step, where, self.nonfinite_streak, self.cfg.log.max_nonfinite,
        )  # fmt: skip
        return {"skipped": 1.0, "lr": lr, "nonfinite_streak": float(self.nonfinite_streak)}

    # ---- state ------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        if self.critic is not None:
            sd.update({f"discriminator.{k}": v.detach().cpu() for k, v in self.critic.state_dict().items()})
        rng = capture_rng()
        if is_distributed():
            gathered: list[Any] = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, rng)
            rng = gathered
        else:
            rng = [rng]
        return {
            "format": ckio.CHECKPOINT_FORMAT,
            "config": self.cfg.model.to_dict(),
            "state_dict": sd,
            "train_config": self.cfg.to_dict(),
            "step": self.step,
            "g_opt": self.g_opt.state_dict(),
            "d_opt": self.d_opt.state_dict() if self.d_opt is not None else None,
            "rng": rng,
            "extra": {"nonfinite_streak": self.nonfinite_streak, "world_size": self.world_size},
        }

    def load_state_dict(self, ckpt: dict[str, Any], where: str = "checkpoint") -> None:
        sd = ckpt["state_dict"]
        model_sd = {k: v for k, v in sd.items() if not k.startswith("discriminator.")}
        self.model.load_state_dict(model_sd)
        critic_sd = {k.removeprefix("discriminator."): v for k, v in sd.items() if k.startswith("discriminator.")}
        if self.critic is not None:
            if not critic_sd:
                raise ValueError(f"{where}: the run is adversarial but the checkpoint holds no critic")
            self.critic.load_state_dict(critic_sd)
            if ckpt.get("d_opt") is not None:
                self.d_opt.load_state_dict(ckpt["d_opt"])
        self.g_opt.load_state_dict(ckpt["g_opt"])
        self.step = int(ckpt["step"])
        self.nonfinite_streak = int(ckpt.get("extra", {}).get("nonfinite_streak", 0))
        rng = ckpt.get("rng") or []
        if len(rng) == self.world_size:
            restore_rng(rng[self.dist.rank])

    def save(self, path: Path) -> Path | None:
        """Collective (RNG states are gathered); rank 0 writes."""
        state = self.state_dict()
        if self.dist.is_main:
            return save_atomic(state, path)
        return None

    def resume(self, path: str | Path) -> None:
        ckpt = ckio.load_training_checkpoint(path)
        saved = ckpt["train_config"]
        # fields added to MarlinConfig after the checkpoint was written take their defaults (what that model had)
        theirs, ours = {**MarlinConfig().to_dict(), **saved.get("model", {})}, self.cfg.model.to_dict()
        if theirs != ours:
            diff = ", ".join(
                f"{k}: checkpoint {theirs.get(k)!r}, run {v!r}" for k, v in ours.items() if theirs.get(k) != v
            )
            raise ValueError(
                f"{path}: the checkpoint's model differs from the run's ({diff}); resume with the same "
                "config (the run folder's config.yaml), or start a new --out"
            )
        self.load_state_dict(ckpt, str(path))
        if self.dist.is_main:
            log.info("resumed from %s at step %d", path, self.step)
            before = saved["batch_size"] * saved["accum_steps"] * ckpt.get("extra", {}).get("world_size", 1)
            if before != self.cfg.global_batch(self.world_size):
                log.warning(
                    "%s: global batch was %d, now %d: the data order and masks of the resumed run differ from "
                    "those an uninterrupted run would have used", path, before, self.cfg.global_batch(self.world_size),
                )  # fmt: skip

    # ---- exports ----------------------------------------------------------------------------------------------------
    def export(self, directory: Path) -> dict[str, Path]:
        """The encoder and full model in the official `.pt` layouts and as a marlin `save_pretrained` directory."""
        return self.model.export_all(directory)

    # ---- the loop ---------------------------------------------------------------------------------------------------
    def fit(self, resume: str | Path | None = None) -> TrainResult:
        """Train to the configured length. `resume`: a checkpoint path, or "auto" for `out_dir/checkpoints`."""
        ckpt_dir = self.out_dir / "checkpoints"
        if resume == "auto":
            resume = ckio.find_resume_checkpoint(ckpt_dir)
            if resume is None and self.dist.is_main:
                log.info("no checkpoint in %s: starting from scratch", ckpt_dir)
        if resume:
            self.resume(resume)
        loader, total, n_clips = self._loader()
        val_sets = {
            name: (ds, val_indices(len(ds), self.cfg.val.max_clips)) for name, ds in build_val_sets(self.cfg).items()
        }
        monitor = Monitor(self.out_dir, enabled=self.dist.is_main, tensorboard=self.cfg.log.tensorboard)
        self._log_start(total, n_clips, val_sets)
        stop = total if self.cfg.stop_at is None else min(total, self.cfg.stop_at)
        run = _RunState(TrainResult(steps=self.step), monitor, val_sets, ckpt_dir, total, stop)
        with GracefulStop() as signals:
            try:
                end = train_steps(
                    self.train_step, iter(loader), start=self.step, stop=stop, schedule=self.schedule,
                    optimizers=(self.g_opt, self.d_opt), accum_steps=self.cfg.accum_steps,
                    on_step=lambda step, metrics, micro: self._after_step(run, step, metrics, micro),
                    signals=signals, device=self.device,
                )  # fmt: skip
                run.result.stopped_by = end.stopped_by
                if end.stopped_by:
                    self._save_on_signal(run)
            finally:
                monitor.close()
        run.result.steps = self.step
        if not run.result.stopped_by and self.step < total and self.dist.is_main:
            log.info("stopped at step %d of %d (stop_at); %s holds it: continue with --resume", self.step, total,
                     ckpt_dir / ckio.LAST)  # fmt: skip
        elif not run.result.stopped_by:
            self._finish(run.result, end.seconds)
        return run.result

    def _loader(self) -> tuple[DataLoader, int, int]:
        """The run's DataLoader from the current step on (masks drawn in its collate), its length in steps, clips."""
        c = self.cfg
        dataset = self.dataset if self.dataset is not None else build_dataset(c)
        has_parse = getattr(dataset, "has_parse", None)
        if has_parse is None:  # a dataset that does not say: look at its first item
            has_parse = dataset[0].get("parse") is not None
        masker = self.masker()
        if masker.needs_parse and not has_parse:
            raise ValueError(
                f"mask strategy {c.mask.strategy!r} needs face parse maps, but the dataset "
                f"({type(dataset).__name__}, source {c.data.source!r}) has none; use mask.strategy=tube or random"
            )
        sampler = StreamBatchSampler(
            len(dataset), c.batch_size, c.accum_steps, self.dist.rank, self.world_size, c.seed, start_step=self.step,
            keys=True, weights=balance_weights(dataset, c.data.balance),
        )  # fmt: skip
        total = self.ensure_schedule(sampler.steps_per_epoch()).total_steps
        sampler.total_steps = total
        loader = DataLoader(
            KeyedItems(dataset), batch_sampler=sampler, collate_fn=MaskCollator(masker, c.seed),
            num_workers=c.data.num_workers, pin_memory=self.device.type == "cuda", persistent_workers=False,
            worker_init_fn=GracefulStop.ignore_in_worker,  # a Ctrl-C to the process group stops the loop, not them
        )  # fmt: skip
        return loader, total, len(dataset)

    def _log_start(self, total: int, n_clips: int, val_sets: dict[str, tuple[Dataset, list[int]]]) -> None:
        c, schedule = self.cfg, self.schedule
        if not self.dist.is_main:
            return
        atomic_write_text(self.out_dir / "config.yaml", c.to_yaml())  # never half-written: resume reads it
        epochs = total * c.global_batch(self.world_size) / n_clips
        log.info(
            "pretraining %s: %d steps (%.2f epochs of %d clips), global batch %d = %d x %d accum x %d ranks, "
            "lr %.3g -> %.3g, warmup %d steps, device %s",
            c.model.name, total, epochs, n_clips, c.global_batch(self.world_size), c.batch_size, c.accum_steps,
            self.world_size, schedule.base_lr, schedule.min_lr, schedule.warmup_steps, self.device,
        )  # fmt: skip
        if not val_sets:
            log.info("no held-out clips (val.source=%s): held-out reconstruction error not measured", c.val.source)
        for name, (ds, idx) in val_sets.items():
            log.info("held-out reconstruction error every %d steps on %d of %d clips of %s (val.source=%s)",
                     c.val.every, len(idx), len(ds), name, c.val.source)  # fmt: skip

    def _after_step(self, run: _RunState, step: int, metrics: dict[str, float], micro: list[dict[str, Any]]) -> None:
        """Everything the loop does after optimiser step `step` (1-based): logging, evaluation, checkpoints."""
        c = self.cfg
        metrics["samples_per_s"] = c.global_batch(self.world_size) / max(metrics.pop("step_s"), 1e-9)
        run.result.history.append({"step": step, **metrics})
        run.monitor.scalars(step, metrics)
        if metrics.get("skipped"):
            run.monitor.event(step, "non-finite loss, step skipped", streak=self.nonfinite_streak)
            if self.nonfinite_streak >= c.log.max_nonfinite:
                raise NonFiniteLossError(f"{self.nonfinite_streak} consecutive steps with a non-finite loss (up to "
                                         f"step {step}); lower optim.lr or check the data")  # fmt: skip
        if c.log.image_every and step % c.log.image_every == 0 and self.dist.is_main:
            self._log_image(run.monitor, step, micro[0])
        self.step = step
        if step % c.log.every == 0 or step == run.total:
            run.monitor.progress(step, run.total, metrics, c.global_batch(self.world_size))
        if run.val_sets and (step % c.val.every == 0 or step == run.total):
            self._validate_safely(run, step)
        if step % c.ckpt.every == 0 or step in (run.total, run.stop):
            self._checkpoint(run, step)

    def _validate_safely(self, run: _RunState, step: int) -> None:
        """Held-out evaluation; a clip that cannot be read must not end a long run (single process)."""
        try:
            run.result.val.append(self._validate(run.monitor, step, run.val_sets))
        except Exception as e:
            if self.world_size > 1:
                raise  # the other ranks wait in its all-reduce: stop all of them
            log.warning("held-out evaluation at step %d failed (%s: %s); training goes on without it",
                        step, type(e).__name__, e)  # fmt: skip
            run.val_sets = {}

    def _checkpoint(self, run: _RunState, step: int) -> None:
        """`last.pt` (collective), plus a numbered copy pruned to `ckpt.keep`."""
        path = self.save(run.ckpt_dir / ckio.LAST)
        if self.dist.is_main and self.cfg.ckpt.keep > 0:
            copy_atomic(path, run.ckpt_dir / f"step_{step}.pt")
            ckio.prune_checkpoints(run.ckpt_dir, self.cfg.ckpt.keep)
        run.result.checkpoint, run.saved_at = run.ckpt_dir / ckio.LAST, step

    def _save_on_signal(self, run: _RunState) -> None:
        if run.saved_at != self.step:
            self.save(run.ckpt_dir / ckio.LAST)
            run.result.checkpoint = run.ckpt_dir / ckio.LAST
        if self.dist.is_main:
            name = signal.Signals(run.result.stopped_by).name
            log.warning("stopped by %s at step %d/%d; %s holds it: continue with --resume", name, self.step,
                        run.total, run.result.checkpoint)  # fmt: skip

    def _finish(self, result: TrainResult, seconds: float) -> None:
        if not self.dist.is_main:
            return
        done = self.step - (result.history[0]["step"] - 1 if result.history else 0)
        log.info("done: %d steps in %s", done, format_duration(seconds))
        if self.cfg.ckpt.export:
            result.exports = self.export(self.out_dir / "export")
            log.info("exported %s", ", ".join(str(p) for p in result.exports.values()))

    def _validate(self, monitor: Monitor, step: int, sets: dict[str, tuple[Dataset, list[int]]]) -> dict[str, float]:
        """Score every held-out set; keys ``val/<metric>`` for one set, ``val/<set>/<metric>`` for several."""
        values: dict[str, float] = {}
        for name, (dataset, indices) in sets.items():
            t0 = time.perf_counter()
            prefix = "val/" if len(sets) == 1 else f"val/{name}/"
            v = validate(
                self.model, dataset, indices, self.cfg, rank=self.dist.rank, world_size=self.world_size,
                autocast=self._autocast(), prefix=prefix,
            )  # fmt: skip
            values.update(v)
            if self.dist.is_main and v:
                if self.cfg.loss.norm_target:
                    text = f"rec {v[prefix + 'rec']:.4g} (each patch's own mean: {v[prefix + 'patch_mean_rec']:.4g})"
                else:
                    text = (f"hidden-patch MSE {v[prefix + 'mse']:.4g} (predicting the clip's mean colour "
                            f"{v[prefix + 'clip_mean_mse']:.4g}, the visible patches' mean "
                            f"{v[prefix + 'visible_mean_mse']:.4g})")  # fmt: skip
                log.info("held-out step %d, %s: %s on %d clips in %.1fs", step, name, text, int(v[prefix + "clips"]),
                         time.perf_counter() - t0)  # fmt: skip
            if self.dist.is_main and self.cfg.log.image_every and indices:
                image = heldout_image(self.model, dataset, indices[0], self.cfg, autocast=self._autocast())
                monitor.image(step, f"heldout_{name}", image)
        monitor.scalars(step, values)
        return {"step": step, **values}

    @torch.no_grad()
    def _log_image(self, monitor: Monitor, step: int, batch: dict[str, Any]) -> None:
        from ..viz.reconstruct import reconstruction_views, render_grid

        c = self.cfg
        x = batch["video"][:1].to(self.device)
        visible = batch["visible"][:1].to(self.device)  # drawn by the collate
        was_training = self.model.training
        self.model.eval()
        with self._autocast():
            pred = self.model(x, visible).float()
        self.model.train(was_training)
        views = reconstruction_views(x[0], visible[0], pred[0], c.model, norm_target=c.loss.norm_target)
        monitor.image(step, "reconstruction", render_grid(*views, labels=False))


def train(cfg: PretrainConfig, *, dataset: Dataset | None = None, resume: str | Path | None = None) -> TrainResult:
    """Run (or resume) a pretraining job; works as a plain process or as every rank of a torchrun job."""
    from ..utils.distributed import shutdown_distributed

    dist_info = init_distributed(cfg.device)
    try:
        trainer = Pretrainer(cfg, dataset=dataset, dist_info=dist_info)
        result = trainer.fit(resume=resume)
        if is_distributed():  # rank 0 may still be exporting: leave together, or a rank that exits first can tear
            torch.distributed.barrier()  # down what another still needs (seen with torchrun's c10d rendezvous)
        return result
    finally:
        shutdown_distributed()
