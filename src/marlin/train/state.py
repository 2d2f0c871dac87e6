"""Training checkpoints: a run's whole state in one file, written atomically, found again to resume.

A checkpoint is one ``torch.save`` file (read back with ``weights_only=True``) holding::

    format          "marlin-pretrain-v1"
    config          MarlinConfig dict      } so `marlin.load(path)` / `marlin info path` read it as a marlin model
    state_dict      model weights (official key layout) + the critic as `discriminator.*` (dropped by marlin.load)
    train_config    the PretrainConfig dict
    step            optimiser steps done; the next step to run
    g_opt, d_opt    optimiser states
    rng             per-rank torch / CUDA / numpy / python RNG states
    extra           counters (non-finite streak, world size)

Files are written to a temporary name in the same directory and renamed (:func:`marlin.utils.fileio.save_atomic`), so
a crash (even ``kill -9``) never leaves a partial file under the real name; ``last.pt`` always is a complete
checkpoint. (Model weights files of every other format are read by :mod:`marlin.models.checkpoint`.)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..models.checkpoint import load_tagged_checkpoint

__all__ = [
    "CHECKPOINT_FORMAT",
    "LAST",
    "export_checkpoint",
    "find_resume_checkpoint",
    "load_training_checkpoint",
    "prune_checkpoints",
]

CHECKPOINT_FORMAT = "marlin-pretrain-v1"
LAST = "last.pt"
_NUMBERED = re.compile(r"^step_(\d+)\.pt$")


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint (weights only: no code execution); one-line errors name the file."""
    return load_tagged_checkpoint(path, CHECKPOINT_FORMAT, "training checkpoint")


def _numbered(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    return sorted((int(m.group(1)), p) for p in Path(ckpt_dir).glob("step_*.pt") if (m := _NUMBERED.match(p.name)))


def find_resume_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """`last.pt` in `ckpt_dir`, else the highest `step_N.pt`, else None."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / LAST).is_file():
        return ckpt_dir / LAST
    numbered = _numbered(ckpt_dir)
    return numbered[-1][1] if numbered else None


def prune_checkpoints(ckpt_dir: str | Path, keep: int) -> None:
    """Delete all but the `keep` newest `step_N.pt` files (`last.pt` is never touched)."""
    numbered = _numbered(ckpt_dir)
    for _, p in numbered[: max(0, len(numbered) - keep)]:
        p.unlink(missing_ok=True)


def export_checkpoint(path: str | Path, directory: str | Path) -> dict[str, Path]:
    """Write a training checkpoint's model as official `.encoder.pt` / `.full.pt` and a marlin directory."""
    from ..models.config import MarlinConfig
    from ..models.model import Marlin

    ckpt = load_training_checkpoint(path)
    config = MarlinConfig.from_dict(ckpt["config"])
    model = Marlin(config, as_feature_extractor=False)
    model.load_state_dict({k: v for k, v in ckpt["state_dict"].items() if not k.startswith("discriminator.")})
    return model.export_all(directory)
