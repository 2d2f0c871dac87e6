"""Process-group setup for torchrun (single process, multi-process, multi-node) and small collective helpers.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; without them the run is one process and
every helper here is a no-op. The backend is NCCL on GPUs and gloo on CPUs.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("marlin")

__all__ = [
    "DistInfo",
    "GracefulStop",
    "all_reduce_grads",
    "barrier",
    "broadcast_module",
    "gather_to_main",
    "init_distributed",
    "is_distributed",
    "shutdown_distributed",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _pick_device(preference: str, local_rank: int) -> torch.device:
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
        return torch.device("cuda", local_rank)
    return torch.device(preference)


def init_distributed(device: str = "auto", *, backend: str | None = None, timeout: timedelta | None = None) -> DistInfo:
    """Join the torchrun process group when WORLD_SIZE > 1 (or reuse an initialised one) and pick this rank's device.

    ``backend`` overrides the default (NCCL on GPUs, gloo on CPUs): a job whose collectives only exchange small CPU
    objects (extraction) uses gloo everywhere. ``timeout`` bounds every collective (torch's default: 30 minutes for
    gloo, 10 for NCCL); a barrier that waits for the slowest rank of a long job needs more.
    """
    if is_distributed():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return DistInfo(rank, world, local, _pick_device(device, local))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local)
    if world > 1:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        extra = {} if timeout is None else {"timeout": timeout}
        dist.init_process_group(backend=backend, rank=rank, world_size=world, **extra)
    return DistInfo(rank, world, local, dev)


def shutdown_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if is_distributed():
        dist.barrier()


def gather_to_main(obj: Any) -> list[Any] | None:
    """Rank 0 gets every rank's picklable ``obj`` in rank order, the other ranks None (one process: ``[obj]``)."""
    if not is_distributed():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_reduce_grads(params: Iterable[nn.Parameter]) -> None:
    """Average `.grad` over ranks with one flat all-reduce (for small modules kept outside DDP, e.g. the critic)."""
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s parameters and buffers to every rank."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src)


class GracefulStop:
    """SIGINT / SIGTERM ask the training loop to stop after the current step, with a checkpoint; a second Ctrl-C
    stops at once (KeyboardInterrupt).

    Batch schedulers (SLURM, Kubernetes) send SIGTERM before killing a job, and torchrun forwards it to every rank:
    the loop then saves ``last.pt`` and returns instead of losing the steps since the last periodic checkpoint.
    Handlers are only installed from the main thread; outside it this is a no-op.
    """

    REPEAT_AFTER_S = 1.0  # a second SIGINT sooner than this is the same Ctrl-C delivered twice (terminal + torchrun)

    def __init__(self) -> None:
        self.signum = 0  # the first signal received, 0 = none
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum:
            if signum == signal.SIGINT and time.monotonic() - self._first_at > self.REPEAT_AFTER_S:
                raise KeyboardInterrupt
            return
        self.signum, self._first_at = signum, time.monotonic()
        log.warning("%s received: stopping after this step and saving a checkpoint (Ctrl-C again to stop now)",
                    signal.Signals(signum).name)  # fmt: skip

    @staticmethod
    def ignore_in_worker(worker_id: int = 0) -> None:
        """DataLoader `worker_init_fn`: workers ignore SIGINT / SIGTERM (a terminal's Ctrl-C or a scheduler signals
        the whole process group) and are shut down by their loader once the main process has saved and returned."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def agreed(self, device: torch.device) -> int:
        """The signal any rank received (collective under torchrun, so every rank stops at the same step)."""
        if not is_distributed():
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
