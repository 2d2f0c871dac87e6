"""Feature matrices for probing: read `marlin extract` outputs for a :class:`LabelSet`, reduce them over time.

Sources: an extraction folder (``index.csv`` maps inputs to outputs; else ``.npy`` files found by their stem or by
the video path relative to the folder), a combined ``.npz`` / ``.safetensors`` (keys are paths without suffix), or
a single ``.npy`` of ``[N, ...]`` rows aligned with the label set. Index and combined files are read by
:mod:`marlin.video.features`; this module matches them to the labels.

Per-video arrays are ``[D]`` (already reduced), ``[W, D]`` (one feature per window) or ``[W, N_tokens, D]``
(``--keep-seq``; tokens are averaged first). Temporal reductions over the windows:

- ``mean`` / ``max``: one ``[D]`` vector;
- ``concat``: the windows in order, flattened to ``[W * D]`` ("time-kept"); every video must have the same W.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..video.features import HAS_FEATURES, load_npy, open_features, read_index, reduce_features
from .manifest import LabelSet

__all__ = ["FeatureError", "REDUCTIONS", "find_feature_files", "load_features", "reduce_tokens", "reduce_windows"]

REDUCTIONS = ("mean", "max", "concat")


class FeatureError(ValueError):
    """Features that cannot be matched to the labels or reduced; the message says which video."""


def reduce_windows(x: np.ndarray, reduction: str, where: str = "features") -> np.ndarray:
    """One video's features -> a vector (see the module docstring; :func:`marlin.video.features.reduce_features`)."""
    if reduction not in REDUCTIONS:
        raise FeatureError(f"temporal reduction must be one of {', '.join(REDUCTIONS)}, found {reduction!r}")
    try:
        return reduce_features(x, reduction, where)
    except ValueError as e:
        raise FeatureError(str(e)) from None


def _index_map(folder: Path) -> dict[str, Path]:
    """``index.csv`` of `marlin extract`: resolved input path -> its output file, for inputs that succeeded and whose
    file is on disk (the others are looked up by name)."""
    index = folder / "index.csv"
    out: dict[str, Path] = {}
    if not index.is_file():
        return out
    for row in read_index(index):
        if row.status in HAS_FEATURES and row.output:
            if len(row.files) + len(row.missing) > 1:
                raise FeatureError(
                    f"{index}: {row.input} has one feature file per face track "
                    f"({row.output}); a probe needs one per video: extract without --all-faces"
                )
            if row.files:
                out[_resolved(row.input)] = row.files[0]
    return out


def _resolved(path: str | os.PathLike) -> str:
    """The absolute path, symlinks followed; a looping or broken link stays as written (it matches nothing)."""
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError):  # RuntimeError: "Symlink loop from ..." (Python < 3.13)
        return str(Path(path).absolute())


def find_feature_files(folder: str | os.PathLike, labels: LabelSet) -> list[Path]:
    """The feature file of every video in `labels` inside an extraction `folder` (raises naming the first missing)."""
    folder = Path(folder)
    by_input = _index_map(folder)
    by_stem: dict[str, list[Path]] = {}
    for f in folder.rglob("*.npy"):
        by_stem.setdefault(f.stem, []).append(f)
    found, missing = [], []
    for path, vid in zip(labels.paths, labels.ids, strict=True):
        hit = by_input.get(_resolved(path))
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


def _gather_rows(source: Path, labels: LabelSet) -> tuple[Sequence[np.ndarray], list[str]]:
    """Each labelled video's array from `source`, and where it came from (for error messages)."""
    if not source.exists():
        raise FeatureError(f"{source}: no such feature folder or file")
    if source.is_file() and source.suffix == ".npy":
        arr = np.load(source)
        if len(arr) != len(labels):
            raise FeatureError(f"{source}: {len(arr)} rows for {len(labels)} labelled videos")
        return list(arr), [f"{source}[{i}]" for i in range(len(arr))]
    if source.is_file():
        if source.suffix not in (".npz", ".safetensors"):
            raise FeatureError(f"{source}: expected a feature folder, a combined .npz / .safetensors or a .npy")
        arrays = open_features(source)
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
        return rows, wheres
    files = find_feature_files(source, labels)
    return [load_npy(f, mmap=False) for f in files], [str(f) for f in files]


def reduce_tokens(x: np.ndarray, reduction: str, where: str = "features") -> np.ndarray:
    """One video's tokens ``[W, L, D]`` (``--keep-seq``) -> ``[L, D]`` (``mean`` / ``max`` over the windows, token by
    token) or ``[W * L, D]`` (``concat``: the windows' tokens in order), for the attentive probe."""
    if reduction not in REDUCTIONS:
        raise FeatureError(f"temporal reduction must be one of {', '.join(REDUCTIONS)}, found {reduction!r}")
    if x.ndim != 3:
        raise FeatureError(f"{where}: the attentive probe needs tokens [windows, tokens, D] (extract with "
                           f"--keep-seq), found shape {tuple(x.shape)}")  # fmt: skip
    if reduction == "concat":
        return x.reshape(-1, x.shape[-1])
    return x.mean(0) if reduction == "mean" else x.max(0)


def load_features(
    source: str | os.PathLike,
    labels: LabelSet,
    reduction: str = "mean",
    *,
    tokens: bool = False,
    keep_steps: bool = False,
) -> np.ndarray:
    """``[N, F]`` float32 features in the order of `labels`; with `tokens`, ``[N, L, D]`` tokens (features extracted
    with ``--keep-seq``) for the attentive probe, reduced over windows by :func:`reduce_tokens`; with `keep_steps` and
    ``concat``, time-kept ``[N, W, D]`` (the windows in order, not flattened: what probe centring reads)."""
    source = Path(source)
    rows, wheres = _gather_rows(source, labels)
    reduce = reduce_tokens if tokens else reduce_windows
    vecs = [reduce(r, reduction, w) for r, w in zip(rows, wheres, strict=True)]
    if keep_steps and reduction == "concat" and not tokens:
        vecs = [v.reshape(-1, np.shape(r)[-1]) for v, r in zip(vecs, rows, strict=True)]  # [W, D]
    sizes = {v.shape for v in vecs}
    if len(sizes) != 1:
        raise FeatureError(f"{source}: feature sizes differ after {reduction!r} reduction "
                           f"({sorted(sizes)[:4]}); 'concat' needs the same number of windows per video — use mean "
                           "or max")  # fmt: skip
    return np.stack(vecs).astype(np.float32)
