"""Learning-rate schedule: linear warmup then cosine decay, evaluated at every iteration.

The official trainer builds the same per-iteration table but steps a LambdaLR once per epoch (and starts the warmup
at 0, ignoring its `warmup` setting); here the rate is set before every optimiser step, starting from `warmup_lr`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .config import PretrainConfig

__all__ = ["CosineSchedule", "build_schedule", "set_lr", "total_steps"]


@dataclass(frozen=True)
class CosineSchedule:
    """lr(step): `warmup_lr -> base_lr` linearly over `warmup_steps`, then cosine `base_lr -> min_lr` until
    `total_steps` (reached one step after the last step, as the official table)."""

    base_lr: float
    min_lr: float
    warmup_lr: float
    warmup_steps: int
    total_steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.base_lr - self.warmup_lr) * step / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


def total_steps(cfg: PretrainConfig, steps_per_epoch: float) -> int:
    """Optimiser steps of the run: `max_steps`, else `ceil(epochs * steps_per_epoch)`."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * steps_per_epoch))


def build_schedule(cfg: PretrainConfig, steps_per_epoch: float, world_size: int = 1) -> CosineSchedule:
    """The run's schedule; rates are scaled by global_batch / 256 when `optim.scale_lr` (official)."""
    o = cfg.optim
    scale = cfg.lr_scale(world_size)
    total = total_steps(cfg, steps_per_epoch)
    warmup = o.warmup_steps if o.warmup_steps is not None else round(o.warmup_epochs * steps_per_epoch)
    return CosineSchedule(o.lr * scale, o.min_lr * scale, o.warmup_lr * scale, min(warmup, total), total)


def set_lr(optimizers: Iterable[torch.optim.Optimizer | None], lr: float) -> None:
    for opt in optimizers:
        if opt is not None:
            for group in opt.param_groups:
                group["lr"] = lr
