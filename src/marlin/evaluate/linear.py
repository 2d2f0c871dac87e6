"""Linear probe: standardise -> optional PCA -> a linear model fitted by full-batch L-BFGS (float64, deterministic).

One model for every task: softmax cross-entropy (multiclass), logistic (binary, multilabel: one sigmoid per label),
least squares (regression). The L2 penalty is ``l2 / 2 * ||W||^2`` added to the mean loss, so its strength does not
depend on the number of samples; :func:`select_l2` picks it by an inner k-fold on training data only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import compute_metrics, primary_metric
from .splits import kfold

__all__ = ["DEFAULT_L2_GRID", "LinearProbe", "select_l2"]

DEFAULT_L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # 1e-6: almost unregularised, for PCA-reduced inputs


class LinearProbe:
    """Fit on ``X [N, F]`` and targets (see :mod:`marlin.evaluate.manifest`); :meth:`scores` gives head outputs."""

    def __init__(
        self,
        task: str,
        n_outputs: int,
        *,
        l2: float = 1e-2,
        pca: int | None = None,
        standardize: bool = True,
        max_iter: int = 300,
    ) -> None:
        self.task, self.n_outputs, self.l2, self.pca = task, n_outputs, float(l2), pca
        self.standardize, self.max_iter = standardize, max_iter
        self.mean: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.components: torch.Tensor | None = None  # [F, P]
        self.weight: torch.Tensor | None = None  # [P, K]
        self.bias: torch.Tensor | None = None  # [K]

    # ---- preprocessing -------------------------------------------------------------------------------------------
    def _fit_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Learn standardisation (and PCA) on training features; returns the transformed training features."""
        self.mean = x.mean(0)
        std = x.std(0, unbiased=False)
        self.scale = torch.where(std > 1e-8, std, torch.ones_like(std)) if self.standardize else torch.ones_like(std)
        z = (x - self.mean) / self.scale  # [N, F]
        self.components, self._lead_std = None, 1.0
        if self.pca is not None and self.pca < min(z.shape):
            comp = _principal_axes(z - z.mean(0), self.pca)  # [F, P]
            comp = comp * torch.sign(comp[comp.abs().argmax(0), torch.arange(comp.shape[1])])  # reproducible signs
            self.components = comp
            z = z @ comp  # [N, P]
            self._lead_std = float(z[:, 0].std().clamp_min(1e-8))
            z = z / self._lead_std  # leading component at unit scale: conditions L-BFGS, keeps relative variances
        return z

    def _transform(self, x: torch.Tensor) -> torch.Tensor:
        z = (x - self.mean) / self.scale
        if self.components is not None:
            z = z @ self.components
            z = z / self._lead_std
        return z

    # ---- fitting -------------------------------------------------------------------------------------------------
    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.task == "multiclass":
            return F.cross_entropy(out, y)
        if self.task == "binary":
            return F.binary_cross_entropy_with_logits(out[:, 0], y)
        if self.task == "multilabel":
            return F.binary_cross_entropy_with_logits(out, y)
        return F.mse_loss(out, y)

    def _targets(self, y: np.ndarray) -> torch.Tensor:
        if self.task == "multiclass":
            return torch.as_tensor(np.asarray(y), dtype=torch.long)
        t = torch.as_tensor(np.asarray(y), dtype=torch.float64)
        return t.reshape(len(t), -1) if self.task in ("multilabel", "regression") else t.reshape(-1)

    def fit(self, x: np.ndarray, y: np.ndarray) -> LinearProbe:
        z = self._fit_inputs(torch.as_tensor(np.asarray(x), dtype=torch.float64))
        return self._fit_linear(z, y)

    def _fit_linear(self, z: torch.Tensor, y: np.ndarray, init: tuple[torch.Tensor, torch.Tensor] | None = None
                    ) -> LinearProbe:  # fmt: skip
        """Fit the weights on already transformed features `z` [N, P], optionally warm-started."""
        t = self._targets(y)
        k = self.n_outputs
        if init is not None:
            w, b = init[0].clone().requires_grad_(True), init[1].clone().requires_grad_(True)
        else:
            w = torch.zeros(z.shape[1], k, dtype=torch.float64, requires_grad=True)
            b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
            if self.task == "regression":
                with torch.no_grad():
                    b.copy_(t.mean(0))
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=self.max_iter, tolerance_grad=1e-6, tolerance_change=1e-9,
                                history_size=20, line_search_fn="strong_wolfe")  # fmt: skip

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = self._loss(z @ w + b, t) + 0.5 * self.l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.weight, self.bias = w.detach(), b.detach()
        return self

    def scores(self, x: np.ndarray) -> np.ndarray:
        """Head outputs: logits (classification) or predictions (regression); binary -> ``[N]``."""
        if self.weight is None:
            raise RuntimeError("LinearProbe.scores before fit")
        z = self._transform(torch.as_tensor(np.asarray(x), dtype=torch.float64))
        out = (z @ self.weight + self.bias).numpy()
        return out[:, 0] if self.task == "binary" else out


def select_l2(
    x: np.ndarray,
    y: np.ndarray,
    task: str,
    n_outputs: int,
    *,
    grid: Sequence[float] = DEFAULT_L2_GRID,
    folds: int = 3,
    seed: int = 0,
    **probe_kwargs,
) -> tuple[float, dict[float, float]]:
    """The L2 strength with the best mean inner-CV primary metric on (x, y) — training data only — and all scores.

    Standardisation / PCA are learnt once on all of (x, y) and shared by the inner folds (they see no labels, and
    the outer test fold is never part of x); each inner fold then walks the grid from the strongest penalty down,
    warm-starting every fit from the previous one.
    """
    if len(grid) == 1:
        return float(grid[0]), {}
    strat = y if task in ("multiclass", "binary") else None
    n_folds = min(folds, _max_stratified_folds(strat) if strat is not None else len(y))
    if n_folds < 2:
        return float(grid[len(grid) // 2]), {}
    base = LinearProbe(task, n_outputs, **probe_kwargs)
    z = base._fit_inputs(torch.as_tensor(np.asarray(x), dtype=torch.float64))
    metric = primary_metric(task)
    per_l2: dict[float, list[float]] = {float(v): [] for v in grid}
    for tr, te in kfold(len(y), n_folds, y=strat, seed=seed):
        init = None
        for l2 in sorted(per_l2, reverse=True):
            probe = LinearProbe(task, n_outputs, l2=l2, max_iter=base.max_iter)
            probe._fit_linear(z[tr], y[tr], init=init)
            init = (probe.weight, probe.bias)
            out = (z[te] @ probe.weight + probe.bias).numpy()
            v = compute_metrics(task, y[te], out[:, 0] if task == "binary" else out)[metric]
            if not math.isnan(v):
                per_l2[l2].append(v)
    table = {k: float(np.mean(v)) if v else -math.inf for k, v in per_l2.items()}
    best = max(table, key=lambda k: (table[k], k))  # ties: the stronger penalty
    return best, table


def _principal_axes(z: torch.Tensor, k: int) -> torch.Tensor:
    """Top-`k` principal axes ``[F, k]`` of centred rows `z` [N, F], from the smaller of the two Gram matrices
    (N x N when there are fewer samples than features: ~10x faster than an SVD of a wide matrix)."""
    n, f = z.shape
    if n < f:
        vals, vecs = torch.linalg.eigh(z @ z.T)  # ascending
        vals, vecs = vals.flip(0)[:k], vecs.flip(1)[:, :k]
        return (z.T @ vecs) / vals.clamp_min(1e-12).sqrt()  # unit-norm axes: z^T u / sigma
    _, vecs = torch.linalg.eigh(z.T @ z)
    return vecs.flip(1)[:, :k]


def _max_stratified_folds(y: np.ndarray) -> int:
    """Most folds such that every fold can hold a sample of the most common class (at least 2)."""
    _, counts = np.unique(y, return_counts=True)
    return int(max(2, counts.max()))
