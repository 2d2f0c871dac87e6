"""Training checkpoints: atomic, resumable, and loadable as models.

A checkpoint is one ``torch.save`` file (read back with ``weights_only=True``) holding::

    config          MarlinConfig dict      } so `marlin.load(path)` / `marlin info path` read it as a marlin model
    state_dict      model weights (official key layout) + the critic as `discriminator.*` (dropped by marlin.load)
    train_config    the PretrainConfig dict
    step            optimiser steps done; the next step to run
    g_opt, d_opt    optimiser states
    rng             per-rank torch / CUDA / numpy / python RNG states
    extra           counters (non-finite streak, samples seen, world size)

Files are written to a temporary name in the same directory and renamed, so a crash (even ``kill -9``) never leaves a
partial file under the real name; ``last.pt`` always points at a complete checkpoint.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "capture_rng",
    "copy_atomic",
    "export_checkpoint",
    "find_resume_checkpoint",
    "load_tagged_checkpoint",
    "load_training_checkpoint",
    "prune_checkpoints",
    "restore_rng",
    "save_atomic",
]

CHECKPOINT_FORMAT = "marlin-pretrain-v1"
LAST = "last.pt"
_NUMBERED = re.compile(r"^step_(\d+)\.pt$")


def save_atomic(obj: Any, path: str | Path) -> Path:
    """`torch.save` to a temporary file in the target directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def copy_atomic(src: str | Path, dst: str | Path) -> Path:
    """Copy a file to `dst` through a temporary name in the target directory."""
    dst = Path(dst)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dst


def load_tagged_checkpoint(path: str | Path, fmt: str, what: str = "checkpoint") -> dict[str, Any]:
    """Read a dict checkpoint whose ``"format"`` entry must be `fmt` (weights only: no code execution); one-line
    errors name the file and say what was expected (`what`, e.g. "training checkpoint")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise ValueError(f"{path}: not a readable {what} ({str(e).strip().splitlines()[0][:160]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: expected a {fmt} {what}, found {found!r}")
    return ckpt


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint (weights only: no code execution); one-line errors name the file."""
    return load_tagged_checkpoint(path, CHECKPOINT_FORMAT, "training checkpoint")


def find_resume_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """`last.pt` in `ckpt_dir`, else the highest `step_N.pt`, else None."""
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / LAST).is_file():
        return ckpt_dir / LAST
    numbered = sorted((int(m.group(1)), p) for p in ckpt_dir.glob("step_*.pt") if (m := _NUMBERED.match(p.name)))
    return numbered[-1][1] if numbered else None


def prune_checkpoints(ckpt_dir: str | Path, keep: int) -> None:
    """Delete all but the `keep` newest `step_N.pt` files (`last.pt` is never touched)."""
    numbered = sorted((int(m.group(1)), p) for p in Path(ckpt_dir).glob("step_*.pt") if (m := _NUMBERED.match(p.name)))
    for _, p in numbered[: max(0, len(numbered) - keep)]:
        p.unlink(missing_ok=True)


def capture_rng() -> dict[str, Any]:
    """This process's RNG states as tensors / plain containers (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def export_checkpoint(path: str | Path, directory: str | Path) -> dict[str, Path]:
    """Write a training checkpoint's model as official `.encoder.pt` / `.full.pt` and a marlin directory."""
    from ..models.config import MarlinConfig
    from ..models.model import Marlin

    ckpt = load_training_checkpoint(path)
    config = MarlinConfig.from_dict(ckpt["config"])
    model = Marlin(config, as_feature_extractor=False)
    model.load_state_dict({k: v for k, v in ckpt["state_dict"].items() if not k.startswith("discriminator.")})
    directory = Path(directory)
    return {
        "encoder_official": model.export_official(directory / f"{config.name}.encoder.pt", full_model=False),
        "full_official": model.export_official(directory / f"{config.name}.full.pt", full_model=True),
        "marlin": model.save_pretrained(directory / config.name),
    }
