"""Deterministic, group-aware data splits: k-fold, train / val / test, and low-data subsampling.

Every function is a pure function of its inputs and ``seed`` (numpy ``default_rng``), returns sorted int64 index
arrays, and never lets one group (e.g. an identity or a source video) appear on both sides of a split.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["SplitError", "kfold", "split_indices", "subsample"]


class SplitError(ValueError):
    """The data cannot be split as asked (too few groups or samples)."""


def _group_ids(groups: Sequence[str] | None, n: int) -> np.ndarray | None:
    if groups is None:
        return None
    if len(groups) != n:
        raise SplitError(f"{len(groups)} groups for {n} samples")
    _, ids = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    return ids


def kfold(
    n: int,
    k: int,
    *,
    y: np.ndarray | None = None,
    groups: Sequence[str] | None = None,
    seed: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` (train, test) index pairs whose test parts partition ``range(n)``.

    With `groups`, whole groups go to folds (largest first, each to the currently smallest fold, ties broken by a
    seeded shuffle), so no group leaks across folds. Otherwise with class labels `y` the folds are stratified: each
    class's shuffled samples are dealt round-robin, starting where the previous class stopped, so fold sizes differ
    by at most one. Without either, a seeded shuffle dealt round-robin.
    """
    if k < 2:
        raise SplitError(f"k-fold needs k >= 2, got {k}")
    if n < k:
        raise SplitError(f"cannot make {k} folds from {n} samples")
    rng = np.random.default_rng(seed)
    fold = np.empty(n, dtype=np.int64)
    gid = _group_ids(groups, n)
    if gid is not None:
        n_groups = int(gid.max()) + 1
        if n_groups < k:
            raise SplitError(f"cannot make {k} group folds from {n_groups} groups")
        sizes = np.bincount(gid, minlength=n_groups)
        order = rng.permutation(n_groups)
        order = order[np.argsort(-sizes[order], kind="stable")]  # largest first, shuffled among equals
        load = np.zeros(k, dtype=np.int64)
        group_fold = np.empty(n_groups, dtype=np.int64)
        for g in order:
            f = int(np.argmin(load))
            group_fold[g] = f
            load[f] += sizes[g]
        fold = group_fold[gid]
    elif y is not None:
        y = np.asarray(y)
        if len(y) != n:
            raise SplitError(f"{len(y)} labels for {n} samples")
        offset = 0
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            fold[idx] = (offset + np.arange(len(idx))) % k
            offset = (offset + len(idx)) % k
    else:
        fold[rng.permutation(n)] = np.arange(n) % k
    out = []
    for f in range(k):
        test = np.flatnonzero(fold == f)
        out.append((np.flatnonzero(fold != f), test))
    return out


def split_indices(
    n: int,
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    *,
    y: np.ndarray | None = None,
    groups: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """``{"train", "val", "test"}`` index arrays in the given proportions (stratified by `y`, whole `groups`)."""
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.shape != (3,) or (fr < 0).any() or fr.sum() <= 0:
        raise SplitError(f"fractions must be three non-negative numbers, got {fractions}")
    fr = fr / fr.sum()
    rng = np.random.default_rng(seed)
    part = np.empty(n, dtype=np.int64)

    def deal(m: int) -> np.ndarray:
        """Parts for m shuffled items: largest-remainder rounding of m * fractions."""
        counts = np.floor(fr * m).astype(np.int64)
        rest = m - counts.sum()
        counts[np.argsort(-(fr * m - counts), kind="stable")[:rest]] += 1
        return np.repeat(np.arange(3), counts)

    gid = _group_ids(groups, n)
    if gid is not None:
        n_groups = int(gid.max()) + 1
        group_part = np.empty(n_groups, dtype=np.int64)
        group_part[rng.permutation(n_groups)] = deal(n_groups)
        part = group_part[gid]
    elif y is not None:
        y = np.asarray(y)
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            part[idx] = deal(len(idx))
    else:
        part[rng.permutation(n)] = deal(n)
    return {name: np.flatnonzero(part == i) for i, name in enumerate(("train", "val", "test"))}


def subsample(index: np.ndarray, fraction: float, *, y: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """A `fraction` of `index` for the low-data regime; with labels `y` (indexed like the full data) stratified and
    keeping at least one sample of every class present. ``fraction >= 1`` returns `index` unchanged."""
    index = np.asarray(index, dtype=np.int64)
    if not 0 < fraction:
        raise SplitError(f"train fraction must be > 0, got {fraction}")
    if fraction >= 1:
        return index
    rng = np.random.default_rng(seed)
    if y is None:
        m = max(1, int(round(fraction * len(index))))
        return np.sort(rng.choice(index, size=m, replace=False))
    y = np.asarray(y)
    keep = []
    for c in np.unique(y[index]):
        idx = index[y[index] == c]
        m = max(1, int(round(fraction * len(idx))))
        keep.append(rng.choice(idx, size=m, replace=False))
    return np.sort(np.concatenate(keep))
