"""Should the linear probe fit with its own torch L-BFGS or with scikit-learn's LogisticRegression / Ridge (and PCA)?

Measured in one run, 2 CPU threads, on large feature sets: 1000 samples, a stratified 750 / 250 train / test split.

1. protocol: what ``marlin probe`` does per fold: standardise on the training part, choose the L2 strength from
   ``DEFAULT_L2_GRID`` by an inner 3-fold CV on it (the same folds for both; the grid walked from the strongest
   penalty down, each fit warm-started from the previous one), refit on the whole training part, score the test
   part once. ``marlin`` is :func:`~marlin.evaluate.linear.select_l2` + :class:`~marlin.evaluate.linear.LinearProbe`
   as they stand; ``sklearn`` is the same protocol with ``LogisticRegression(solver="lbfgs", warm_start=True)`` at
   its default tolerance. Seconds and test accuracy.
2. one fit: a single fit on the 750 training rows at a fixed L2 strength: the objective value each solver reaches
   (lower is better; the same objective for all), seconds, test score. ``torch`` is the probe's L-BFGS (tolerance
   1e-6 on the largest gradient entry); ``sklearn`` at its default ``tol=1e-4`` and at ``tol=1e-6`` (the same
   stopping rule as ours). Multilabel: one ``LogisticRegression`` per label (what scikit-learn offers) against our
   joint fit; regression: ``Ridge`` (closed form) against the L-BFGS on squared error.
3. the PCA step: the probe's standardise + PCA (eigendecomposition of the smaller Gram matrix) against
   ``StandardScaler`` + scikit-learn's ``PCA`` (exact ``full`` SVD, and ``randomized``), to 200 dims.

The penalties are one objective: the probe minimises ``mean loss + l2 / 2 * ||W||^2``, i.e. ``C = 1 / (l2 * n)``
for LogisticRegression (``1 / (l2 * n * L)`` per label for multilabel, as our loss is the mean over N x L) and
``alpha = l2 * n * L / 2`` for Ridge.

Data: synthetic features (a 32-dim latent decides the label; mixed into 6144 noisy dims with a strong label-free
low-rank nuisance, like pooled network features) and, when ``../shared/data/grid_s1`` exists, real GRID lip pixels
(every 3rd frame, 16x16 grey of a fixed mouth window, time kept: 25 x 256 = 6400 features, 1000 clips, ~40 s to
decode), labelled by the spoken command word (4 classes).

    python benchmarks/bench_probe.py            # ~5 minutes on 2 cores
    python benchmarks/bench_probe.py --no-grid  # synthetic only
    python benchmarks/bench_probe.py --full     # + more GRID words, matched-tolerance protocol column (~25 min)
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "2")

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

THREADS = 2
N_SAMPLES, N_FEATURES = 1000, 6144


# ---- data -----------------------------------------------------------------------------------------------------------
def synthetic(task: str, k: int, n: int = N_SAMPLES, f: int = N_FEATURES, rank: int = 32, seed: int = 0):
    """``x [n, f]`` float32 and targets for `task` with `k` classes / labels / outputs."""
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(n, rank))
    x = h @ rng.normal(size=(rank, f)) / math.sqrt(rank)
    x += rng.normal(size=(n, 16)) @ rng.normal(size=(16, f)) * 2.0  # label-free nuisance directions
    x += 3.0 * rng.normal(size=(n, f))
    if task == "multiclass":
        y = (h @ rng.normal(size=(rank, k)) + 2.0 * rng.gumbel(size=(n, k))).argmax(1)
    elif task == "multilabel":
        y = (h @ rng.normal(size=(rank, k)) / math.sqrt(rank) + 0.5 * rng.normal(size=(n, k)) > 0.3).astype(np.float32)
    else:
        y = (h @ rng.normal(size=(rank, k)) / math.sqrt(rank) + 0.5 * rng.normal(size=(n, k))).astype(np.float32)
    return x.astype(np.float32), y


def grid_lips(root: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """GRID s1 time-kept mouth pixels (the recipe of the slow GRID probe test) and the word labels per slot."""
    import csv

    from marlin.video.io import read_video

    with open(root / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    feats = []
    for r in rows:
        frames = read_video(root / "videos" / r["video"], step=3)[:25, 168:264, 112:208]  # [25, 96, 96, 3]
        grey = frames.astype(np.float32).mean(-1).reshape(len(frames), 16, 6, 16, 6).mean((2, 4))
        feats.append(grey.reshape(-1))
    slots = ("command", "digit", "letter")
    labels = {slot: np.unique([r[slot] for r in rows], return_inverse=True)[1] for slot in slots}
    return np.stack(feats), labels


def holdout(y: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    from marlin.evaluate.splits import split_indices

    parts = split_indices(len(y), (0.75, 0.0, 0.25), y=y if task == "multiclass" else None, seed=0)
    return parts["train"], parts["test"]


# ---- scikit-learn at the probe's objective --------------------------------------------------------------------------
class SkLinear:
    """LogisticRegression (one per label for multilabel) or Ridge at the probe's L2 strength, warm-startable."""

    def __init__(self, task: str, max_iter: int, tol: float = 1e-4) -> None:
        self.task, self.max_iter, self.tol = task, max_iter, tol
        self.models: list = []

    def fit(self, z: np.ndarray, y: np.ndarray, l2: float) -> SkLinear:
        from sklearn.linear_model import LogisticRegression, Ridge

        n = len(z)
        if self.task == "regression":
            y2 = y.reshape(n, -1)
            self.models = [Ridge(alpha=l2 * n * y2.shape[1] / 2).fit(z, y2)]
            return self
        cols = [y] if self.task in ("multiclass", "binary") else [y[:, j] for j in range(y.shape[1])]
        c = 1.0 / (l2 * n * (len(cols) if self.task == "multilabel" else 1))
        if not self.models:
            self.models = [LogisticRegression(max_iter=self.max_iter, tol=self.tol, warm_start=True) for _ in cols]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning: our L-BFGS also stops at max_iter without a word
            for m, t in zip(self.models, cols, strict=True):
                m.set_params(C=c).fit(z, t)
        return self

    def weights(self) -> tuple[np.ndarray, np.ndarray]:
        """``(W [P, K], b [K])`` in the probe's layout."""
        if self.task == "regression":
            m = self.models[0]
            return np.atleast_2d(m.coef_).T, np.atleast_1d(m.intercept_)
        w = np.concatenate([m.coef_ for m in self.models]).T
        return w, np.concatenate([m.intercept_ for m in self.models])

    def scores(self, z: np.ndarray) -> np.ndarray:
        w, b = self.weights()
        out = z @ w + b
        return out[:, 0] if self.task == "binary" else out


def protocol_sklearn(task, k, xtr, ytr, xte, grid, max_iter, tol=1e-4):  # noqa: ANN001, ANN201
    """select_l2 + refit, with StandardScaler + LogisticRegression / Ridge."""
    from sklearn.preprocessing import StandardScaler

    from marlin.evaluate.metrics import primary_value
    from marlin.evaluate.splits import kfold

    scaler = StandardScaler().fit(xtr.astype(np.float64))
    z, zte = scaler.transform(xtr.astype(np.float64)), scaler.transform(xte.astype(np.float64))
    per_l2: dict[float, list[float]] = {float(v): [] for v in grid}
    for tr, te in kfold(len(ytr), 3, y=ytr if task in ("multiclass", "binary") else None, seed=0):
        model = SkLinear(task, max_iter, tol)
        for l2 in sorted(per_l2, reverse=True):
            v = primary_value(task, ytr[te], model.fit(z[tr], ytr[tr], l2).scores(z[te]))
            if not math.isnan(v):
                per_l2[l2].append(v)
    table = {c: float(np.mean(v)) if v else -math.inf for c, v in per_l2.items()}
    best = max(table, key=lambda c: (table[c], c))
    return best, SkLinear(task, max_iter, tol).fit(z, ytr, best).scores(zte)


def protocol_marlin(task, k, xtr, ytr, xte, grid, max_iter):  # noqa: ANN001, ANN201
    from marlin.evaluate.linear import LinearProbe, select_l2

    best, _ = select_l2(xtr, ytr, task, k, grid=grid, folds=3, seed=0, max_iter=max_iter)
    return best, LinearProbe(task, k, l2=best, max_iter=max_iter).fit(xtr, ytr).scores(xte)


def objective(task: str, z: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray, l2: float) -> float:
    """The probe's training objective ``mean loss + l2 / 2 * ||W||^2`` at (w, b)."""
    import torch
    import torch.nn.functional as F

    out = torch.as_tensor(z @ w + b)
    if task == "multiclass":
        loss = F.cross_entropy(out, torch.as_tensor(y, dtype=torch.long))
    elif task == "regression":
        loss = F.mse_loss(out, torch.as_tensor(y, dtype=torch.float64).reshape(out.shape))
    else:
        loss = F.binary_cross_entropy_with_logits(out, torch.as_tensor(y, dtype=torch.float64).reshape(out.shape))
    return float(loss) + 0.5 * l2 * float((w * w).sum())


def fit_torch(task: str, k: int, z: np.ndarray, y: np.ndarray, l2: float, max_iter: int):
    """The probe's L-BFGS on any task (regression included: what the probe used before Ridge)."""
    import torch
    import torch.nn.functional as F

    from marlin.evaluate.linear import _LOSSES, _lbfgs_fit

    if task == "multiclass":
        return _lbfgs_fit(z, torch.as_tensor(y, dtype=torch.long), _LOSSES[task], k, l2, max_iter)
    t = torch.as_tensor(y, dtype=torch.float64).reshape(len(y), -1)
    if task == "regression":  # as the probe did: bias started at the target mean
        init = (np.zeros((z.shape[1], k)), t.mean(0).numpy())
        return _lbfgs_fit(z, t, F.mse_loss, k, l2, max_iter, init)
    return _lbfgs_fit(z, t, _LOSSES[task], k, l2, max_iter)


def pca_seconds(x: np.ndarray, solver: str | None, dims: int = 200, repeat: int = 3) -> float:
    """Seconds for the probe's standardise + PCA (`solver` None) or StandardScaler + sklearn PCA(svd_solver)."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    from marlin.evaluate.linear import LinearProbe

    def run() -> None:
        if solver is None:
            LinearProbe("multiclass", 2, pca=dims)._fit_inputs(x)
        else:
            z = StandardScaler().fit_transform(x.astype(np.float64))
            PCA(dims, svd_solver=solver, random_state=0).fit_transform(z)

    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


# ---- run ------------------------------------------------------------------------------------------------------------
SCORE = {"multiclass": "accuracy", "binary": "auc", "multilabel": "flat_auc", "regression": "r2"}


def score(task: str, y: np.ndarray, s: np.ndarray) -> float:
    from marlin.evaluate.metrics import compute_metrics

    return compute_metrics(task, y, s)[SCORE[task]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid-root", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/grid_s1")
    ap.add_argument("--no-grid", action="store_true", help="synthetic data only")
    ap.add_argument("--full", action="store_true", help="more rows and a matched-tolerance column (~25 minutes)")
    ap.add_argument("--max-iter", type=int, default=200, help="as ProbeConfig.max_iter")
    args = ap.parse_args()

    import torch
    from threadpoolctl import threadpool_limits

    from marlin.evaluate.linear import DEFAULT_L2_GRID, LinearProbe

    torch.set_num_threads(THREADS)
    threadpool_limits(THREADS)
    t_start = time.perf_counter()
    data = {
        "syn4": ("synthetic", "multiclass", 4, *synthetic("multiclass", 4)),
        "syn25": ("synthetic", "multiclass", 25, *synthetic("multiclass", 25)),
        "syn-ml40": ("synthetic", "multilabel", 40, *synthetic("multilabel", 40)),
        "syn-reg2": ("synthetic", "regression", 2, *synthetic("regression", 2)),
    }
    if not args.no_grid and (args.grid_root / "labels.csv").is_file():
        t0 = time.perf_counter()
        gx, gl = grid_lips(args.grid_root)
        print(f"GRID s1: {gx.shape[0]} clips x {gx.shape[1]} features, decoded in {time.perf_counter() - t0:.0f} s")
        for slot in ("command", "digit", "letter"):
            data[f"grid-{slot}"] = ("GRID " + slot, "multiclass", int(gl[slot].max()) + 1, gx, gl[slot])
    print(f"torch {torch.__version__}, {THREADS} threads, {N_SAMPLES} samples (750 train / 250 test)\n")

    # 1. the whole protocol
    rows = ["syn4", "syn25"] + [r for r in ("grid-command",) if r in data]
    if args.full:
        rows += [r for r in ("grid-digit", "grid-letter") if r in data]
    cols = [("marlin", protocol_marlin), ("sklearn", protocol_sklearn)]
    if args.full:
        cols.append(("sk tol 1e-6", lambda *a: protocol_sklearn(*a, tol=1e-6)))
    print("1. protocol (select_l2 over DEFAULT_L2_GRID by inner 3-fold CV, refit, test once): seconds, test accuracy")
    head = f"{'data':<14} {'K':>3} {'N x F':>10} | "
    head += " | ".join(f"{c:>11} {'s':>6} {'acc':>5} {'l2':>5}" for c, _ in cols)
    print(head + " | sklearn/marlin time\n" + "-" * (len(head) + 22))
    for r in rows:
        name, task, k, x, y = data[r]
        tr, te = holdout(y, task)
        cells, secs = [], []
        for _, fn in cols:
            t0 = time.perf_counter()
            l2, s = fn(task, k, x[tr], y[tr], x[te], DEFAULT_L2_GRID, args.max_iter)
            secs.append(time.perf_counter() - t0)
            cells.append(f"{'':>11} {secs[-1]:>6.1f} {score(task, y[te], s):>5.3f} {l2:>5.0e}")
        shape = f"{len(x)}x{x.shape[1]}"
        print(f"{name:<14} {k:>3} {shape:>10} | " + " | ".join(cells) + f" | {secs[1] / secs[0]:>6.2f}", flush=True)

    # 2. one fit at a fixed L2 strength
    print("\n2. one fit at a fixed l2 on the 750 training rows: objective reached, seconds, test score")
    fits = [("syn25", 1e-4), ("syn-ml40", 1e-4), ("syn-reg2", 1e-4)]
    fits += [("grid-command", 1e-5)] if "grid-command" in data else []
    print(f"{'data':<14} {'task':<10} {'K':>3} {'l2':>5} | {'solver':<26} {'objective':>10} {'s':>6} {'score':>6}")
    print("-" * 92)
    for r, l2 in fits:
        name, task, k, x, y = data[r]
        tr, te = holdout(y, task)
        prep = LinearProbe(task, k)
        z, zte = prep._fit_inputs(x[tr]), prep._transform(x[te])
        solvers = [("torch L-BFGS" + (" (joint)" if task == "multilabel" else ""), None)]
        if task == "regression":
            solvers.append(("sklearn Ridge (exact)", 0.0))
        elif task == "multilabel":
            solvers.append((f"sklearn LogReg x {k} labels", 1e-4))
        else:
            solvers += [("sklearn LogReg tol 1e-4", 1e-4), ("sklearn LogReg tol 1e-6", 1e-6)]
        for label, tol in solvers:
            t0 = time.perf_counter()
            if tol is None:
                w, b = fit_torch(task, k, z, y[tr], l2, args.max_iter)
            else:
                w, b = SkLinear(task, args.max_iter, tol).fit(z, y[tr], l2).weights()
            dt = time.perf_counter() - t0
            obj = objective(task, z, y[tr], w, b, l2)
            print(f"{name:<14} {task:<10} {k:>3} {l2:>5.0e} | {label:<26} {obj:>10.6f} {dt:>6.1f} "
                  f"{score(task, y[te], zte @ w + b):>6.3f}", flush=True)  # fmt: skip
    # 3. the PCA step
    print("\n3. standardise + PCA to 200 dims (the probe's preprocessing with --pca 200): best of 3, seconds")
    rng = np.random.default_rng(0)
    shapes = [
        ("synthetic 800x1536", rng.normal(size=(800, 1536))),
        ("synthetic 4000x768", rng.normal(size=(4000, 768))),
    ]
    if "grid-command" in data:
        shapes.insert(0, ("GRID 800x6400", data["grid-command"][3][:800]))
    print(f"{'data':<20} | {'ours (Gram eigh)':>16} | {'sklearn PCA full':>16} | {'sklearn randomized':>18}")
    for label, x in shapes:
        x = x.astype(np.float32)
        times = [pca_seconds(x, solver) for solver in (None, "full", "randomized")]
        print(f"{label:<20} | {times[0]:>16.2f} | {times[1]:>16.2f} | {times[2]:>18.2f}", flush=True)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
