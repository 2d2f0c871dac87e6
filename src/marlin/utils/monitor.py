"""Run monitoring on rank 0: JSONL scalars (always), TensorBoard (when installed), progress lines, images.

TensorBoard is optional (`pip install 'marlin[train]'`): without it scalars still go to ``metrics.jsonl`` (one JSON
object per logged step) and images to ``images/<tag>_step_N.png``. Progress lines go to the ``marlin`` logger, which
the CLI prints to the console; library callers see them once they configure logging.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Monitor", "format_duration"]

log = logging.getLogger("marlin")


def format_duration(seconds: float) -> str:
    """`3h02m`, `4m05s`, `12s`."""
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


class Monitor:
    """Writes scalars and images of a run to `out_dir`; every method is a no-op when `enabled` is False."""

    def __init__(self, out_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self.tb = None
        self._jsonl = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.info("tensorboard is not installed (pip install 'marlin[train]'); scalars go to metrics.jsonl")
            else:
                self.tb = SummaryWriter(str(self.out_dir / "tb"))
        self._t_start = time.perf_counter()
        self._t_last, self._step_last = self._t_start, None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._write({"step": step, **{k: _num(v) for k, v in values.items()}})
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def progress(self, step: int, total: int, values: dict[str, float], samples_per_step: int) -> None:
        """One console line: step, losses, lr, throughput since the previous line and the ETA."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._step_last is None:
            rate = (step) / max(now - self._t_start, 1e-9)
        else:
            rate = (step - self._step_last) / max(now - self._t_last, 1e-9)
        self._t_last, self._step_last = now, step
        eta = format_duration((total - step) / rate) if rate > 0 else "?"
        parts = [f"{k.split('/')[-1]} {v:.4g}" for k, v in values.items() if k.startswith("loss/")]
        log.info(
            "step %d/%d (%.1f%%) | %s | lr %.3g | %.2f samples/s | ETA %s",
            step, total, 100 * step / total, " | ".join(parts), values.get("lr", float("nan")),
            rate * samples_per_step, eta,
        )  # fmt: skip

    def image(self, step: int, tag: str, image: np.ndarray) -> Path | None:
        """Save an ``[H, W, 3]`` uint8 image as ``images/{tag}_step_{step}.png`` (and to TensorBoard)."""
        if not self.enabled:
            return None
        from PIL import Image

        path = self.out_dir / "images" / f"{tag}_step_{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        if self.tb is not None:
            self.tb.add_image(tag, image, step, dataformats="HWC")
        return path

    def event(self, step: int, message: str, **fields: Any) -> None:
        """A non-scalar record (e.g. a skipped step) in metrics.jsonl (the trainer also logs a warning for it)."""
        if not self.enabled:
            return
        self._write({"step": step, "event": message, **fields})

    def _write(self, record: dict[str, Any]) -> None:
        """One line of metrics.jsonl, opened on the first record (a run that dies first leaves no empty file)."""
        if self._jsonl is None:
            self._jsonl = open(self.out_dir / "metrics.jsonl", "a", buffering=1)  # noqa: SIM115 - closed in close()
        self._jsonl.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _num(v: Any) -> Any:
    f = float(v)
    return f if np.isfinite(f) else str(f)
