"""Linear probe: standardise -> optional PCA -> a linear model.

One objective for every task: the mean loss plus ``l2 / 2 * ||W||^2`` (intercepts free), so the penalty's strength does
not depend on the number of samples; :func:`select_l2` picks it by an inner k-fold on training data only. The losses:
softmax cross-entropy (multiclass), logistic (binary; multilabel: one sigmoid per label, all fitted together), least
squares (regression).

Who fits what, and why (measured by ``benchmarks/bench_probe.py``; its tables below):

- standardisation is scikit-learn's ``StandardScaler``;
- PCA stays our own eigendecomposition of the smaller Gram matrix (:func:`_principal_axes`, a few lines of numpy,
  the same axes and signs as scikit-learn's ``PCA`` to 1e-13), because it is 2.5-4x faster (table 3);
- regression is scikit-learn's ``Ridge``: the same objective (``alpha = l2 * N * L / 2``) solved exactly in closed
  form, 25x faster than an L-BFGS to the same optimum (table 2);
- classification keeps its own full-batch L-BFGS in torch (float64, deterministic, tolerance 1e-6 on the largest
  gradient entry). scikit-learn's ``LogisticRegression(solver="lbfgs")`` solves the same problem
  (``C = 1 / (l2 * N)``), but at its default ``tol=1e-4`` it stops early on these wide, nearly separable problems
  (objective 2.5x ours on GRID) and scores worse on real data (GRID: 0.544 against 0.600 over the whole protocol,
  0.512 against 0.600 for one fit at the same l2); at ``tol=1e-6`` it reaches our optimum, 1.3-1.6x more slowly; and
  multilabel needs one ``LogisticRegression`` per label, 5x slower than our one joint fit (table 2).

  ==========================================  ===============  ================  ================
  1. whole protocol (select_l2 + refit)       ours (torch)     sklearn tol 1e-4
  ==========================================  ===============  ================  ================
  synthetic 1000 x 6144, 4 classes            17.4 s, 0.668    8.7 s, 0.668
  synthetic 1000 x 6144, 25 classes           50.3 s, 0.222    27.5 s, 0.206
  GRID s1 lip pixels 1000 x 6400, 4 words     31.5 s, 0.600    24.5 s, 0.544
  2. one fit on 750 rows, same l2             ours (torch)     sklearn tol 1e-4  sklearn tol 1e-6
  synthetic 25 classes, l2 1e-4               4.2 s, 0.222     0.7 s, 0.206      6.9 s, 0.218
  GRID 4 words, l2 1e-5                       3.2 s, 0.600     1.4 s, 0.512      4.3 s, 0.596
  synthetic multilabel 40 labels, l2 1e-4     4.4 s, 0.870     23.1 s, 0.870     (one model per label)
  synthetic regression 2 outputs, l2 1e-4     2.5 s, 0.664     Ridge 0.1 s, 0.664
  3. standardise + PCA to 200 dims            ours             sklearn full      sklearn randomized
  GRID 800 x 6400                             0.27 s           1.08 s            0.88 s
  synthetic 800 x 1536 / 4000 x 768           0.11 / 0.17 s    0.30 / 0.51 s     0.28 / 0.65 s
  ==========================================  ===============  ================  ================

  (Test accuracy; multilabel: flattened AUC; regression: R2. 2 CPU threads, 1000 samples split 750 / 250. In an
  earlier run with the former hand-written folds the GRID protocol gave 34 s / 0.600 for ours, 45 s / 0.508 for
  sklearn at tol 1e-4 and 140 s / 0.596 at tol 1e-6.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import primary_value
from .splits import kfold

__all__ = ["DEFAULT_L2_GRID", "LinearProbe", "centre_steps", "select_l2"]

DEFAULT_L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # 1e-6: almost unregularised, for PCA-reduced inputs

# classification losses for the torch L-BFGS fit: (logits [N, K], targets) -> mean loss
_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "multiclass": F.cross_entropy,
    "binary": lambda out, t: F.binary_cross_entropy_with_logits(out[:, 0], t),
    "multilabel": F.binary_cross_entropy_with_logits,
}


def _sklearn(what: str):  # noqa: ANN202
    """``sklearn.preprocessing`` / ``sklearn.linear_model``, with an install hint."""
    import importlib

    try:
        return importlib.import_module(f"sklearn.{what}")
    except ImportError:
        raise ImportError("the linear probe needs scikit-learn: pip install 'marlin[eval]'") from None


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
        self.scaler = None  # fitted sklearn StandardScaler (centres always, scales when `standardize`)
        self.components: np.ndarray | None = None  # PCA axes [F, P]
        self._lead_std = 1.0
        self.weight: np.ndarray | None = None  # [P, K]
        self.bias: np.ndarray | None = None  # [K]

    # ---- preprocessing -------------------------------------------------------------------------------------------
    def _fit_inputs(self, x: np.ndarray) -> np.ndarray:
        """Learn standardisation (and PCA) on training features; returns the transformed training features."""
        z = np.asarray(x, dtype=np.float64)
        self.scaler = _sklearn("preprocessing").StandardScaler(with_std=self.standardize)
        z = self.scaler.fit_transform(z)  # [N, F]
        self.components, self._lead_std = None, 1.0
        if self.pca is not None and self.pca < min(z.shape):
            self.components = _principal_axes(z, self.pca)  # z is centred by the scaler
            z = z @ self.components  # [N, P]
            self._lead_std = float(max(z[:, 0].std(ddof=1), 1e-8))
            z = z / self._lead_std  # leading component at unit scale: conditions L-BFGS, keeps relative variances
        return z

    def _transform(self, x: np.ndarray) -> np.ndarray:
        z = self.scaler.transform(np.asarray(x, dtype=np.float64))
        if self.components is not None:
            z = (z @ self.components) / self._lead_std
        return z

    # ---- fitting -------------------------------------------------------------------------------------------------
    def fit(self, x: np.ndarray, y: np.ndarray) -> LinearProbe:
        return self._fit_linear(self._fit_inputs(x), y)

    def _fit_linear(self, z: np.ndarray, y: np.ndarray, init: tuple[np.ndarray, np.ndarray] | None = None
                    ) -> LinearProbe:  # fmt: skip
        """Fit the weights on already transformed features `z` [N, P], optionally warm-started (classification)."""
        if self.task == "regression":
            t = np.asarray(y, dtype=np.float64).reshape(len(z), -1)
            # mean over the N x L squared errors + l2 / 2 ||W||^2  ==  (||T - ZW||^2 + alpha ||W||^2) / (N L)
            ridge = _sklearn("linear_model").Ridge(alpha=self.l2 * t.size / 2).fit(z, t)
            coef = np.reshape(ridge.coef_, (t.shape[1], -1))  # [L, P]; sklearn gives [P] for a single output
            self.weight = np.ascontiguousarray(coef.T)
            self.bias = np.atleast_1d(ridge.intercept_).astype(np.float64)
            return self
        if self.task not in _LOSSES:
            raise ValueError(f"unknown task {self.task!r}")
        if self.task == "multiclass":
            t = torch.as_tensor(np.asarray(y), dtype=torch.long)
        else:
            t = torch.as_tensor(np.asarray(y), dtype=torch.float64)
            t = t.reshape(len(t), -1) if self.task == "multilabel" else t.reshape(-1)
        self.weight, self.bias = _lbfgs_fit(z, t, _LOSSES[self.task], self.n_outputs, self.l2, self.max_iter, init)
        return self

    def scores(self, x: np.ndarray) -> np.ndarray:
        """Head outputs: logits (classification) or predictions (regression); binary -> ``[N]``."""
        if self.weight is None:
            raise RuntimeError("LinearProbe.scores before fit")
        out = self._transform(x) @ self.weight + self.bias
        return out[:, 0] if self.task == "binary" else out


def _lbfgs_fit(
    z: np.ndarray,
    t: torch.Tensor,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    n_outputs: int,
    l2: float,
    max_iter: int,
    init: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(W [P, K], b [K])`` minimising ``loss(z @ W + b, t) + l2 / 2 * ||W||^2`` by full-batch L-BFGS in float64,
    from zeros or from `init`."""
    zt = torch.as_tensor(np.ascontiguousarray(z), dtype=torch.float64)
    if init is not None:
        w = torch.tensor(init[0], dtype=torch.float64, requires_grad=True)
        b = torch.tensor(init[1], dtype=torch.float64, requires_grad=True)
    else:
        w = torch.zeros(zt.shape[1], n_outputs, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(n_outputs, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-6, tolerance_change=1e-9,
                            history_size=20, line_search_fn="strong_wolfe")  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = loss(zt @ w + b, t) + 0.5 * l2 * (w * w).sum()
        value.backward()
        return value

    opt.step(closure)
    return w.detach().numpy(), b.detach().numpy()


def centre_steps(x: np.ndarray, clip_steps: int | None = None) -> np.ndarray:
    """Time-kept features minus each clip's mean over its time steps: ``[N, S, D] -> [N, S, D]``, the S steps taken
    in runs of `clip_steps` consecutive ones (one clip each; None: all S are one clip).

    What a clip holds constant (who is in it, the light, the session) goes and what changes within it (the mouth over
    a sentence) stays. A per-sample operation, no statistics learnt: it cannot leak between training and test rows.
    Why it is offered: the time-kept features of MAE-pretrained encoders are dominated by such per-clip constants
    (GRID mouth features after 1000 pretraining steps: 98.4-99.8% of the variance, 91% at random init), which a PCA
    keeps first and a penalised probe prefers.
    """
    x = np.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"centring needs time-kept features [N, S, D], got shape {tuple(x.shape)}")
    n, s, d = x.shape
    c = s if clip_steps is None else int(clip_steps)
    if c < 1 or s % c:
        raise ValueError(f"{s} time steps do not split into clips of {c}")
    runs = x.reshape(n, s // c, c, d)  # [N, clips, steps per clip, D]
    return (runs - runs.mean(2, keepdims=True)).reshape(n, s, d)


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
    warm-starting every L-BFGS fit from the previous one (regression is solved exactly, no warm start needed).
    """
    if len(grid) == 1:
        return float(grid[0]), {}
    strat = y if task in ("multiclass", "binary") else None
    n_folds = min(folds, _max_stratified_folds(strat) if strat is not None else len(y))
    if n_folds < 2:
        return float(grid[len(grid) // 2]), {}
    base = LinearProbe(task, n_outputs, **probe_kwargs)
    z = base._fit_inputs(x)
    per_l2: dict[float, list[float]] = {float(v): [] for v in grid}
    for tr, te in kfold(len(y), n_folds, y=strat, seed=seed):
        init = None
        for l2 in sorted(per_l2, reverse=True):
            probe = LinearProbe(task, n_outputs, l2=l2, max_iter=base.max_iter)
            probe._fit_linear(z[tr], y[tr], init=init)
            init = (probe.weight, probe.bias)
            out = z[te] @ probe.weight + probe.bias
            v = primary_value(task, y[te], out[:, 0] if task == "binary" else out)
            if not math.isnan(v):
                per_l2[l2].append(v)
    table = {k: float(np.mean(v)) if v else -math.inf for k, v in per_l2.items()}
    best = max(table, key=lambda k: (table[k], k))  # ties: the stronger penalty
    return best, table


def _principal_axes(z: np.ndarray, k: int) -> np.ndarray:
    """Top-`k` principal axes ``[F, k]`` of centred rows `z` [N, F] (unit norm, the largest entry of each positive),
    from the eigendecomposition of the smaller of the two Gram matrices (N x N when there are fewer samples than
    features: ~3x faster than scikit-learn's full SVD there, see the module docstring)."""
    n, f = z.shape
    if n < f:
        vals, vecs = np.linalg.eigh(z @ z.T)  # ascending
        vals, vecs = vals[::-1][:k], np.ascontiguousarray(vecs[:, ::-1][:, :k])  # contiguous: BLAS matmul below
        axes = (z.T @ vecs) / np.sqrt(np.maximum(vals, 1e-12))  # unit-norm axes: z^T u / sigma
    else:
        axes = np.ascontiguousarray(np.linalg.eigh(z.T @ z)[1][:, ::-1][:, :k])
    return axes * np.sign(axes[np.abs(axes).argmax(0), np.arange(k)])


def _max_stratified_folds(y: np.ndarray) -> int:
    """Most folds such that every fold can hold a sample of the most common class (at least 2)."""
    _, counts = np.unique(y, return_counts=True)
    return int(max(2, counts.max()))
