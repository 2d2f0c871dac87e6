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

Randomness is a function of (seed, step, sample position) — masks, data order, the gradient-penalty factor — so a run
gives the same losses on 1 or N processes for the same global batch, and a resumed run continues exactly.
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

from ..data.datasets import StreamBatchSampler, build_dataset, collate_clips, global_positions
from ..mae.critic import PatchCritic
from ..mae.losses import critic_loss, generator_adv_loss, gradient_penalty, masked_targets, reconstruction_loss
from ..mae.masking import FACE_STRATEGIES, generate_visible
from ..models.model import Marlin
from ..utils.distributed import (
    DistInfo,
    GracefulStop,
    all_reduce_grads,
    broadcast_module,
    derive_seed,
    init_distributed,
    is_distributed,
)
from ..utils.monitor import Monitor, format_duration
from ..utils.schedule import CosineSchedule, set_lr
from . import state as ckio
from .config import PretrainConfig, build_schedule
from .validate import build_val_sets, heldout_image, val_indices, validate

__all__ = ["NonFiniteLossError", "Pretrainer", "TrainResult", "make_visible", "train"]

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


def make_visible(
    cfg: PretrainConfig, step: int, positions: Tensor, parse: Tensor | None, device: torch.device
) -> Tensor:
    """Visibility masks ``[b, N]`` for samples at stream `positions` of optimiser step `step`.

    Each sample's mask is drawn from its own generator seeded from (seed, step, position), so the masks do not
    depend on how the global batch is split over processes or micro-steps.
    """
    m, strategy = cfg.model, cfg.mask.strategy
    if strategy in FACE_STRATEGIES and parse is None:
        raise ValueError(f"mask strategy {strategy!r} needs parse maps, but the batch has none")
    rows = []
    for i, pos in enumerate(positions.tolist()):
        g = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, "mask", step, pos))
        rows.append(
            generate_visible(
                strategy,
                1,
                parse=parse[i : i + 1] if strategy in FACE_STRATEGIES else None,
                mask_ratio=cfg.mask.ratio,
                clip_frames=m.clip_frames,
                tubelet=m.tubelet_size,
                img_size=m.img_size,
                patch=m.patch_size,
                generator=g,
                device=device,
            )
        )
    return torch.cat(rows)  # [b, N]


def _param_groups(module: nn.Module, weight_decay: float, skip: set[str]) -> list[dict[str, Any]]:
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if weight_decay == 0:
        return [{"params": [p for _, p in params], "weight_decay": 0.0}]
    decay = [p for n, p in params if n not in skip and p.ndim > 1]
    no_decay = [p for n, p in params if n in skip or p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _make_optimizer(cfg: PretrainConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """AdamW / Adam with the fused kernel (one pass over each tensor; ~5x faster than the per-parameter loop that
    PyTorch uses by default on CPU), falling back to the default implementation where it is unavailable."""
    o = cfg.optim
    cls = torch.optim.AdamW if o.type == "AdamW" else torch.optim.Adam
    try:
        return cls(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=True)
    except (RuntimeError, ValueError):
        return cls(groups, lr=o.lr, betas=o.betas, eps=o.eps)


class Pretrainer:
    """Owns the model, critic, optimisers and schedule of one run on one process (one rank of a torchrun job).

    `train_step(micro_batches)` runs one optimiser step on already-collated batches; `fit()` runs the whole loop
    (data, logging, checkpoints, exports). Batches may carry a "visible" [b, N] mask to bypass mask generation
    (tests, benchmarks).
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
        self.out_dir = Path(cfg.out_dir).expanduser()
        torch.manual_seed(derive_seed(cfg.seed, "init"))  # identical initial weights on every rank

        self.model = (model or Marlin(cfg.model, as_feature_extractor=False)).to(self.device)
        if self.model.as_feature_extractor:
            raise ValueError("pretraining needs a full model (encoder + decoder), got an encoder-only Marlin")
        if cfg.init:
            self._load_init(cfg.init)
        self.model.set_grad_checkpointing(cfg.grad_checkpointing)
        self.model.train()
        self.critic = PatchCritic.from_config(cfg.model).to(self.device) if cfg.loss.adversarial else None
        torch.manual_seed(derive_seed(cfg.seed, "rank", self.dist.rank))  # per-rank stream for anything else

        self.g_opt = _make_optimizer(
            cfg, _param_groups(self.model, cfg.optim.weight_decay, self.model.no_weight_decay())
        )
        self.d_opt = None
        if self.critic is not None:
            broadcast_module(self.critic)
            self.d_opt = _make_optimizer(cfg, _param_groups(self.critic, cfg.optim.weight_decay, set()))
        self.net: nn.Module = self.model
        if self.dist.world_size > 1:
            self.net = DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
                gradient_as_bucket_view=True,
            )
        self.dataset = dataset
        self.step = 0
        self.nonfinite_streak = 0
        self.schedule: CosineSchedule | None = None

    # ---- setup ------------------------------------------------------------------------------------------------------
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
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    def ensure_schedule(self, steps_per_epoch: float) -> CosineSchedule:
        if self.schedule is None:
            self.schedule = build_schedule(self.cfg, steps_per_epoch, self.world_size)
        return self.schedule

    # ---- one step ---------------------------------------------------------------------------------------------------
    def _prepare(self, batch: dict[str, Any], micro: int) -> tuple[Tensor, Tensor, Tensor]:
        c = self.cfg
        x = batch["video"].to(self.device, non_blocking=True)  # [b, 3, T, H, W]
        visible = batch.get("visible")
        if visible is None:
            positions = global_positions(self.step, micro, x.shape[0], c.accum_steps, self.dist.rank, self.world_size)
            parse = batch.get("parse")
            parse = parse.to(self.device, non_blocking=True) if parse is not None else None
            visible = make_visible(c, self.step, positions, parse, self.device)  # [b, N]
        visible = visible.to(self.device)
        target = masked_targets(
            x, visible, c.model.tubelet_size, c.model.patch_size, normalize=c.loss.norm_target
        )  # [b, N_hidden, P] float32
        return x, visible, target

    def _all_finite(self, *values: Tensor) -> bool:
        flag = torch.stack([torch.isfinite(v.detach().float()).all() for v in values]).all().float()
        if is_distributed():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())

    def _clip(self, params: Any) -> None:
        if self.cfg.optim.clip_grad is not None:
            nn.utils.clip_grad_norm_(list(params), self.cfg.optim.clip_grad)

    def train_step(self, micro_batches: list[dict[str, Any]]) -> dict[str, float]:
        """One optimiser step over `accum_steps` micro-batches; returns metrics averaged over micro-batches and ranks.

        A step whose losses are not finite updates nothing and returns {"skipped": 1.0, ...}.
        """
        c = self.cfg
        if self.schedule is None:
            raise RuntimeError("call ensure_schedule(steps_per_epoch) before train_step")
        if len(micro_batches) != c.accum_steps:
            raise ValueError(f"train_step expects accum_steps={c.accum_steps} micro-batches, got {len(micro_batches)}")
        lr = self.schedule(self.step)
        set_lr((self.g_opt, self.d_opt), lr)
        accum = len(micro_batches)
        single = accum == 1
        prepared = [self._prepare(b, m) for m, b in enumerate(micro_batches)]
        sums: dict[str, Tensor] = {}

        def add(name: str, value: Tensor) -> None:
            sums[name] = sums.get(name, 0.0) + value.detach().float() / accum

        # Forward once; with accumulation, a graph-free forward per micro-batch feeds the critic.
        pred0 = None
        if single:
            x, visible, _ = prepared[0]
            with self._autocast():
                pred0 = self.net(x, visible)  # [b, N_hidden, P]
            fakes = [pred0.detach()]
        else:
            with torch.no_grad(), self._autocast():
                fakes = [self.net(x, visible) for x, visible, _ in prepared]

        # Critic: d_steps updates on the detached predictions.
        if self.critic is not None:
            g = torch.Generator().manual_seed(derive_seed(c.seed, "gp", self.step))
            alpha = torch.rand(1, generator=g).to(self.device)  # one interpolation factor per global batch
            for d_iter in range(c.loss.d_steps):
                self.d_opt.zero_grad(set_to_none=True)
                for (_, _, target), fake in zip(prepared, fakes, strict=True):
                    with self._autocast():
                        scores = self.critic(torch.cat([fake, target.to(fake.dtype)]))  # [2b, N_hidden, 1]
                        fake_s, real_s = scores.chunk(2)
                        d_loss = critic_loss(real_s, fake_s)
                        total = d_loss
                        if c.loss.gp_weight > 0:
                            gp = gradient_penalty(self.critic, target, fake.float(), alpha)
                            total = d_loss + c.loss.gp_weight * gp
                            if d_iter == c.loss.d_steps - 1:
                                add("loss/gp", gp)
                    (total / accum).backward()
                    if d_iter == c.loss.d_steps - 1:
                        add("loss/critic", d_loss)
                if not self._all_finite(*(p.grad for p in self.critic.parameters() if p.grad is not None), total):
                    return self._skip("critic", lr)
                all_reduce_grads(self.critic.parameters())
                self._clip(self.critic.parameters())
                self.d_opt.step()

        # Generator: g_steps updates against the (updated, frozen) critic.
        for g_iter in range(c.loss.g_steps):
            self.g_opt.zero_grad(set_to_none=True)
            last = g_iter == c.loss.g_steps - 1
            losses = []
            for i, (x, visible, target) in enumerate(prepared):
                sync = i == accum - 1
                ctx = self.net.no_sync() if (not sync and isinstance(self.net, DistributedDataParallel)) else None
                with ctx or contextlib.nullcontext():
                    if pred0 is not None and g_iter == 0:
                        pred = pred0
                    else:
                        with self._autocast():
                            pred = self.net(x, visible)
                    rec = reconstruction_loss(pred, target)
                    loss = rec
                    if self.critic is not None:
                        self.critic.requires_grad_(False)
                        with self._autocast():
                            adv = generator_adv_loss(self.critic(pred))
                        self.critic.requires_grad_(True)
                        loss = rec + c.loss.adv_weight * adv
                        if last:
                            add("loss/adv", adv)
                    if last:
                        add("loss/rec", rec)
                        add("loss/gen", loss)
                    (loss / accum).backward()
                    losses.append(loss.detach())
            if not self._all_finite(*losses):
                self.g_opt.zero_grad(set_to_none=True)
                return self._skip("generator", lr)
            self._clip(self.model.parameters())
            self.g_opt.step()
            pred0 = None

        self.nonfinite_streak = 0
        names = sorted(sums)
        values = torch.stack([sums[n] for n in names])
        if is_distributed():
            torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM)
            values /= self.world_size
        out = dict(zip(names, values.tolist(), strict=True))
        out["lr"] = lr
        return out

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
        rng = ckio.capture_rng()
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
            ckio.restore_rng(rng[self.dist.rank])

    def save(self, path: Path) -> Path | None:
        """Collective (RNG states are gathered); rank 0 writes."""
        state = self.state_dict()
        if self.dist.is_main:
            return ckio.save_atomic(state, path)
        return None

    def resume(self, path: str | Path) -> None:
        ckpt = ckio.load_training_checkpoint(path)
        saved = ckpt["train_config"]
        if saved.get("model") != self.cfg.model.to_dict():
            raise ValueError(f"{path}: checkpoint model {saved.get('model', {}).get('name')!r} differs from the run's")
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
        name = self.cfg.model.name
        model = self.model
        return {
            "encoder_official": model.export_official(directory / f"{name}.encoder.pt", full_model=False),
            "full_official": model.export_official(directory / f"{name}.full.pt", full_model=True),
            "marlin": model.save_pretrained(directory / name),
        }

    # ---- the loop ---------------------------------------------------------------------------------------------------
    def fit(self, resume: str | Path | None = None) -> TrainResult:
        """Train to the configured length. `resume`: a checkpoint path, or "auto" for `out_dir/checkpoints`."""
        c = self.cfg
        ckpt_dir = self.out_dir / "checkpoints"
        if resume == "auto":
            resume = ckio.find_resume_checkpoint(ckpt_dir)
            if resume is None and self.dist.is_main:
                log.info("no checkpoint in %s: starting from scratch", ckpt_dir)
        if resume:
            self.resume(resume)
        dataset = self.dataset if self.dataset is not None else build_dataset(c)
        has_parse = getattr(dataset, "has_parse", None)
        if has_parse is None:  # a dataset that does not say: look at its first item
            has_parse = dataset[0].get("parse") is not None
        if c.mask.strategy in FACE_STRATEGIES and not has_parse:
            raise ValueError(
                f"mask strategy {c.mask.strategy!r} needs face parse maps, but the dataset "
                f"({type(dataset).__name__}, source {c.data.source!r}) has none; use mask.strategy=tube or random"
            )
        sampler = StreamBatchSampler(
            len(dataset), c.batch_size, c.accum_steps, self.dist.rank, self.world_size, c.seed, start_step=self.step
        )
        schedule = self.ensure_schedule(sampler.steps_per_epoch())
        total = schedule.total_steps
        sampler.total_steps = total
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate_clips,
            num_workers=c.data.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            worker_init_fn=GracefulStop.ignore_in_worker,  # a Ctrl-C to the process group stops the loop, not them
        )
        val_sets = {name: (ds, val_indices(len(ds), c.val.max_clips)) for name, ds in build_val_sets(c).items()}
        monitor = Monitor(self.out_dir, enabled=self.dist.is_main, tensorboard=c.log.tensorboard)
        if self.dist.is_main:
            (self.out_dir / "config.yaml").write_text(c.to_yaml())
            log.info(
                "pretraining %s: %d steps (%.2f epochs of %d clips), global batch %d = %d x %d accum x %d ranks, "
                "lr %.3g -> %.3g, warmup %d steps, device %s",
                c.model.name, total, total / sampler.steps_per_epoch(), len(dataset), c.global_batch(self.world_size),
                c.batch_size, c.accum_steps, self.world_size, schedule.base_lr, schedule.min_lr,
                schedule.warmup_steps, self.device,
            )  # fmt: skip
            if not val_sets:
                log.info("no held-out clips (val.source=%s): held-out reconstruction error not measured", c.val.source)
            for name, (ds, idx) in val_sets.items():
                log.info("held-out reconstruction error every %d steps on %d of %d clips of %s (val.source=%s)",
                         c.val.every, len(idx), len(ds), name, c.val.source)  # fmt: skip
        result = TrainResult(steps=self.step)
        samples_per_step = c.global_batch(self.world_size)
        it = iter(loader)
        t0 = time.perf_counter()
        saved_at = None
        with GracefulStop() as stop:
            try:
                while self.step < total:
                    try:
                        micro = [next(it) for _ in range(c.accum_steps)]
                    except Exception:  # DataLoader workers hit by the same Ctrl-C (RuntimeError, OSError, ...)
                        if not stop.signum or self.world_size > 1:
                            raise
                        result.stopped_by = stop.signum
                        break
                    t_step = time.perf_counter()
                    metrics = self.train_step(micro)
                    metrics["samples_per_s"] = samples_per_step / max(time.perf_counter() - t_step, 1e-9)
                    step_done = self.step + 1
                    result.history.append({"step": step_done, **metrics})
                    monitor.scalars(step_done, metrics)
                    if metrics.get("skipped"):
                        monitor.event(step_done, "non-finite loss, step skipped", streak=self.nonfinite_streak)
                        if self.nonfinite_streak >= c.log.max_nonfinite:
                            raise NonFiniteLossError(
                                f"{self.nonfinite_streak} consecutive steps with a non-finite loss (up to step "
                                f"{step_done}); lower optim.lr or check the data"
                            )
                    if c.log.image_every and step_done % c.log.image_every == 0 and self.dist.is_main:
                        self._log_image(monitor, step_done, micro[0])
                    self.step = step_done
                    if step_done % c.log.every == 0 or step_done == total:
                        monitor.progress(step_done, total, metrics, samples_per_step)
                    if val_sets and (step_done % c.val.every == 0 or step_done == total):
                        try:
                            result.val.append(self._validate(monitor, step_done, val_sets))
                        except Exception as e:  # a held-out clip that cannot be read must not end a long run
                            if self.world_size > 1:
                                raise  # the other ranks wait in its all-reduce: stop all of them
                            log.warning("held-out evaluation at step %d failed (%s: %s); training goes on without it",
                                        step_done, type(e).__name__, e)  # fmt: skip
                            val_sets = {}
                    if step_done % c.ckpt.every == 0 or step_done == total:
                        path = self.save(ckpt_dir / ckio.LAST)
                        if self.dist.is_main and c.ckpt.keep > 0:
                            ckio.copy_atomic(path, ckpt_dir / f"step_{step_done}.pt")
                            ckio.prune_checkpoints(ckpt_dir, c.ckpt.keep)
                        result.checkpoint, saved_at = ckpt_dir / ckio.LAST, step_done
                    result.stopped_by = stop.agreed(self.device)
                    if result.stopped_by:
                        break
                if self.step >= total:
                    result.stopped_by = 0  # a signal during the last step: the run is complete anyway
                if result.stopped_by:
                    if saved_at != self.step:
                        self.save(ckpt_dir / ckio.LAST)
                        result.checkpoint = ckpt_dir / ckio.LAST
                    if self.dist.is_main:
                        name = signal.Signals(result.stopped_by).name
                        log.warning("stopped by %s at step %d/%d; %s holds it: continue with --resume", name,
                                    self.step, total, result.checkpoint)  # fmt: skip
            finally:
                monitor.close()
        result.steps = self.step
        if result.stopped_by:
            return result
        if self.dist.is_main:
            log.info(
                "done: %d steps in %s",
                self.step - (result.history[0]["step"] - 1 if result.history else 0),
                format_duration(time.perf_counter() - t0),
            )
            if c.ckpt.export:
                result.exports = self.export(self.out_dir / "export")
                log.info("exported %s", ", ".join(str(p) for p in result.exports.values()))
        return result

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
        visible = batch.get("visible")
        if visible is None:
            parse = batch.get("parse")
            pos = global_positions(step - 1, 0, batch["video"].shape[0], c.accum_steps, self.dist.rank, self.world_size)
            visible = make_visible(
                c, step - 1, pos[:1], parse[:1].to(self.device) if parse is not None else None, self.device
            )
        was_training = self.model.training
        self.model.eval()
        with self._autocast():
            pred = self.model(x, visible[:1].to(self.device)).float()
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
