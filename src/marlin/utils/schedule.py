"""Learning-rate schedule: linear warmup then cosine decay, evaluated at every iteration.

The official trainer builds the same per-iteration table but steps a LambdaLR once per epoch (and starts the warmup
at 0, ignoring its `warmup` setting); here the rate is set before every optimiser step, starting from `warmup_lr`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

__all__ = ["CosineSchedule", "set_lr"]


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


def set_lr(optimizers: Iterable[torch.optim.Optimizer | None], lr: float) -> None:
    """Set every group's rate to ``lr`` times its ``lr_scale`` (1 when absent; see :mod:`marlin.utils.optim`)."""
    for opt in optimizers:
        if opt is not None:
            for group in opt.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
