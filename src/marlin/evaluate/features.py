"""Feature matrices for probing: read `marlin extract` outputs for a :class:`LabelSet`, reduce them over time.

Sources: an extraction folder (``index.csv`` maps inputs to outputs; else ``.npy`` files found by their stem or by
the video path relative to the folder), a combined ``.npz`` / ``.safetensors`` (keys are paths without suffix), or
a single ``.npy`` of ``[N, ...]`` rows aligned with the label set.

Per-video arrays are ``[D]`` (already reduced), ``[W, D]`` (one feature per window) or ``[W, N_tokens, D]``
(``--keep-seq``; tokens are averaged first). Temporal reductions over the windows:

- ``mean`` / ``max``: one ``[D]`` vector;
- ``concat``: the windows in order, flattened to ``[W * D]`` ("time-kept"); every video must have the same W.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..video.extract import OUTPUT_SEP
from .manifest import LabelSet

__all__ = ["FeatureError", "REDUCTIONS", "find_feature_files", "load_features", "reduce_windows"]

REDUCTIONS = ("mean", "max", "concat")


class FeatureError(ValueError):
    """Features that cannot be matched to the labels or reduced; the message says which video."""


def reduce_windows(x: np.ndarray, reduction: str, where: str = "features") -> np.ndarray:
    """One video's features -> a vector (see the module docstring)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3:
        x = x.mean(1)  # [W, N, D] -> [W, D]
    if x.ndim == 1:
        if reduction == "concat":
            return x
        x = x[None]
    if x.ndim != 2:
        raise FeatureError(f"{where}: expected [D], [W, D] or [W, N, D] features, found shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise FeatureError(f"{where}: no windows (the video is shorter than one clip?)")
    if reduction == "mean":
        return x.mean(0)
    if reduction == "max":
        return x.max(0)
    if reduction == "concat":
        return x.reshape(-1)
    raise FeatureError(f"temporal reduction must be one of {', '.join(REDUCTIONS)}, found {reduction!r}")


def _index_map(folder: Path) -> dict[str, Path]:
    """``index.csv`` of `marlin extract`: resolved input path -> output file, for inputs that succeeded."""
    index = folder / "index.csv"
    out: dict[str, Path] = {}
    if not index.is_file():
        return out
    with open(index, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("status") in ("ok", "skipped") and row.get("output"):
                if OUTPUT_SEP in row["output"]:
                    raise FeatureError(
                        f"{index}: {row['input']} has one feature file per face track "
                        f"({row['output']}); a probe needs one per video: extract without --all-faces"
                    )
                p = Path(row["output"])
                out[str(Path(row["input"]).resolve())] = p if p.is_absolute() else folder / p
    return out


def find_feature_files(folder: str | os.PathLike, labels: LabelSet) -> list[Path]:
    """The feature file of every video in `labels` inside an extraction `folder` (raises naming the first missing)."""
    folder = Path(folder)
    by_input = _index_map(folder)
    by_stem: dict[str, list[Path]] = {}
    for f in folder.rglob("*.npy"):
        by_stem.setdefault(f.stem, []).append(f)
    found, missing = [], []
    for path, vid in zip(labels.paths, labels.ids, strict=True):
        hit = by_input.get(str(Path(path).resolve()))
        if hit is None or not hit.is_file():
            cands = by_stem.get(vid) or by_stem.get(Path(path).stem) or []
            if len(cands) > 1:
                rel = [c for c in cands if c.with_suffix("").name == Path(path).stem and Path(path).parent.name
                       == c.parent.name]  # fmt: skip
                cands = rel if len(rel) == 1 else cands
            if len(cands) > 1:
                raise FeatureError(f"{folder}: {len(cands)} feature files named {vid}.npy; keep one extraction per "
                                   "folder or use index.csv")  # fmt: skip
            hit = cands[0] if cands else None
        if hit is None:
            missing.append(str(path))
        found.append(hit)
    if missing:
        raise FeatureError(f"{folder}: no features for {len(missing)} of {len(labels)} videos, e.g. {missing[0]} "
                           "(run `marlin extract` on them, or check the manifest paths)")  # fmt: skip
    return found


def _combined(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def load_features(source: str | os.PathLike, labels: LabelSet, reduction: str = "mean") -> np.ndarray:
    """``[N, F]`` float32 features in the order of `labels`."""
    source = Path(source)
    if not source.exists():
        raise FeatureError(f"{source}: no such feature folder or file")
    if source.is_file() and source.suffix == ".npy":
        arr = np.load(source)
        if len(arr) != len(labels):
            raise FeatureError(f"{source}: {len(arr)} rows for {len(labels)} labelled videos")
        rows: Sequence[np.ndarray] = list(arr)
        wheres = [f"{source}[{i}]" for i in range(len(arr))]
    elif source.is_file():
        arrays = _combined(source)
        by_stem: dict[str, str] = {}
        for k in arrays:
            by_stem.setdefault(Path(k).name.split(".face")[0], k)
        rows, wheres = [], []
        for path, vid in zip(labels.paths, labels.ids, strict=True):
            key = by_stem.get(vid) or by_stem.get(Path(path).stem)
            if key is None:
                raise FeatureError(f"{source}: no features for {path}")
            rows.append(arrays[key])
            wheres.append(f"{source}:{key}")
    else:
        files = find_feature_files(source, labels)
        rows = [np.load(f) for f in files]
        wheres = [str(f) for f in files]
    vecs = [reduce_windows(r, reduction, w) for r, w in zip(rows, wheres, strict=True)]
    sizes = {v.shape[0] for v in vecs}
    if len(sizes) != 1:
        raise FeatureError(f"{source}: feature sizes differ after {reduction!r} reduction ({sorted(sizes)[:4]}); "
                           "'concat' needs the same number of windows per video — use mean or max")  # fmt: skip
    return np.stack(vecs).astype(np.float32)
