"""Deterministic, group-aware data splits: k-fold (scikit-learn), train / val / test, and low-data subsampling.

Every function is a pure function of its inputs and ``seed``, returns sorted int64 index arrays, and never lets one
group (e.g. an identity or a source video) appear on both sides of a split. :func:`kfold` needs scikit-learn
(``pip install 'marlin[eval]'``); :func:`split_indices` and :func:`subsample` are plain numpy (see their docstrings).
"""

from __future__ import annotations

import warnings
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


def _model_selection():  # noqa: ANN202
    try:
        from sklearn import model_selection
    except ImportError:
        raise ImportError("k-fold splits need scikit-learn: pip install 'marlin[eval]'") from None
    return model_selection


def kfold(
    n: int,
    k: int,
    *,
    y: np.ndarray | None = None,
    groups: Sequence[str] | None = None,
    seed: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` (train, test) index pairs whose test parts partition ``range(n)``, from scikit-learn's splitters.

    - `groups` and class labels `y`: ``StratifiedGroupKFold(shuffle=True)``: whole groups go to folds, chosen to keep
      every fold's class mix close to the whole's;
    - `groups` only: ``GroupKFold``: whole groups, largest first, each to the currently smallest fold (balanced
      sizes); the group labels are shuffled by `seed` first, so the seed breaks ties between equal-sized groups;
    - `y` only: ``StratifiedKFold(shuffle=True)``: every class split as evenly as its size allows;
    - neither: ``KFold(shuffle=True)``.

    When every class has fewer than `k` samples stratification is impossible and the folds fall back to the
    unstratified splitter (classes smaller than `k` are otherwise fine: they just miss some folds).
    """
    if k < 2:
        raise SplitError(f"k-fold needs k >= 2, got {k}")
    if n < k:
        raise SplitError(f"cannot make {k} folds from {n} samples")
    ms = _model_selection()
    gid = _group_ids(groups, n)
    if y is not None:
        y = np.asarray(y)
        if len(y) != n:
            raise SplitError(f"{len(y)} labels for {n} samples")
        if np.unique(y, return_counts=True)[1].max() < k:
            y = None  # no class can reach every fold: StratifiedKFold refuses, stratifying means nothing here
    x = np.zeros((n, 1))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class in y", category=UserWarning)
        if gid is not None:
            n_groups = int(gid.max()) + 1
            if n_groups < k:
                raise SplitError(f"cannot make {k} group folds from {n_groups} groups")
            if y is not None:
                splits = ms.StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(x, y, gid)
            else:
                shuffled = np.random.default_rng(seed).permutation(n_groups)[gid]
                splits = ms.GroupKFold(k).split(x, groups=shuffled)
        elif y is not None:
            splits = ms.StratifiedKFold(k, shuffle=True, random_state=seed).split(x, y)
        else:
            splits = ms.KFold(k, shuffle=True, random_state=seed).split(x)
        out = [(np.sort(tr).astype(np.int64), np.sort(te).astype(np.int64)) for tr, te in splits]
    if any(len(te) == 0 for _, te in out):
        raise SplitError(f"cannot make {k} non-empty folds from {n} samples with these groups / labels")
    return out


def split_indices(
    n: int,
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    *,
    y: np.ndarray | None = None,
    groups: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """``{"train", "val", "test"}`` index arrays in the given proportions (stratified by `y`, whole `groups`).

    Kept in numpy: scikit-learn has no three-way splitter, and chaining ``train_test_split`` /
    ``GroupShuffleSplit`` twice neither keeps the exact fractions (each call rounds on its own) nor accepts a zero
    fraction (``(0.9, 0.1, 0.0)`` is a valid request here) nor stratifies classes with a single sample. Here each
    class (or the set of groups) is shuffled by `seed` and dealt by largest-remainder rounding of ``m * fractions``.
    """
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
    keeping at least one sample of every class present. ``fraction >= 1`` returns `index` unchanged.

    Kept in numpy: ``sklearn.utils.resample(stratify=...)`` does not promise a sample of every class.
    """
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
