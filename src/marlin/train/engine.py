"""The training engine shared by pretraining and fine-tuning: process setup and the per-iteration loop.

As MAE keeps ``engine_pretrain.train_one_epoch`` apart from ``main_pretrain``, the loop here knows nothing about
models, losses, evaluation or checkpoints: :func:`train_steps` runs optimiser steps ``start .. stop - 1``, each one

1. taking ``accum_steps`` micro-batches from the loader,
2. setting the learning rate of every optimiser from the schedule (times each group's ``lr_scale``),
3. calling the task's ``step_fn(micro_batches)`` (pretraining: critic then generator update; fine-tuning: one
   supervised update), which returns its metrics,
4. calling ``on_step(step_done, metrics, micro_batches)`` (logging, held-out evaluation, checkpoints: the caller's),
5. stopping early, with every rank at the same step, when SIGINT / SIGTERM arrived (:class:`GracefulStop`).

Setup helpers (:func:`wrap_ddp`) are shared too, so both trainers build their process group, DDP wrapper,
optimiser groups (:mod:`marlin.utils.optim`) and schedule (:mod:`marlin.utils.schedule`) the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..utils.distributed import DistInfo, GracefulStop, is_distributed
from ..utils.schedule import set_lr

__all__ = ["LoopEnd", "train_steps", "wrap_ddp"]

MISSING = None  # what a rank's micro-batch is when its share of the last global batch is empty (pad_missing=True)


def wrap_ddp(model: nn.Module, dist: DistInfo, **kwargs: Any) -> nn.Module:
    """`model` itself in a single process, else a DistributedDataParallel replica on this rank's device."""
    if dist.world_size == 1:
        return model
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False, **kwargs)


@dataclass
class LoopEnd:
    """How :func:`train_steps` ended."""

    step: int  # optimiser steps done (the next step to run)
    stopped_by: int = 0  # the signal that stopped it early, 0 = ran to `stop`
    seconds: float = 0.0


def _next_micro(batches: Iterator[Any], accum_steps: int, pad_missing: bool, stop: GracefulStop | None) -> list | None:
    """The next step's micro-batches; None when a signal broke the loader (single process: workers get it too)."""
    try:
        if pad_missing:
            return [next(batches, MISSING) for _ in range(accum_steps)]
        return [next(batches) for _ in range(accum_steps)]
    except Exception:  # DataLoader workers hit by the same Ctrl-C (RuntimeError, OSError, ...)
        if stop is None or not stop.signum or is_distributed():
            raise
        return None


def rank_batches(start: int, stop: int, batch: int, rank: int, world: int) -> Iterator[list[int]]:
    """This rank's item indices of steps ``start .. stop - 1`` of a seeded sample stream (the global batch of step
    s is items ``s * batch * world ...``, rank r reading its ``batch`` of them): a resumed or multi-process run reads
    exactly the items of one uninterrupted run."""
    for step in range(start, stop):
        first = (step * world + rank) * batch
        yield list(range(first, first + batch))


def train_steps(
    step_fn: Callable[[list[Any]], dict[str, float]],
    batches: Iterator[Any],
    *,
    start: int,
    stop: int,
    schedule: Callable[[int], float],
    optimizers: Sequence[torch.optim.Optimizer | None],
    accum_steps: int = 1,
    on_step: Callable[[int, dict[str, float], list[Any]], None] | None = None,
    signals: GracefulStop | None = None,
    device: torch.device | None = None,
    pad_missing: bool = False,
) -> LoopEnd:
    """Run optimiser steps ``start .. stop - 1`` (see the module docstring); metrics gain ``lr`` and ``step_s``.

    `pad_missing`: a loader that runs out early yields ``None`` micro-batches instead of ending the loop (a rank
    whose share of the last global batch is empty must still join the step's collectives).
    """
    t_start = time.perf_counter()
    for step in range(start, stop):
        micro = _next_micro(batches, accum_steps, pad_missing, signals)
        if micro is None:
            return LoopEnd(step, signals.signum, time.perf_counter() - t_start)
        lr = schedule(step)
        set_lr(optimizers, lr)
        t0 = time.perf_counter()
        metrics = step_fn(micro)
        metrics.update(lr=lr, step_s=time.perf_counter() - t0)
        if on_step is not None:
            on_step(step + 1, metrics, micro)
        got = signals.agreed(device or torch.device("cpu")) if signals is not None else 0  # collective
        if got and step + 1 < stop:  # a signal during the last step: the run is complete anyway
            return LoopEnd(step + 1, got, time.perf_counter() - t_start)
    return LoopEnd(stop, 0, time.perf_counter() - t_start)
