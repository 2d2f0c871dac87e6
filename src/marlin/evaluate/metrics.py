"""Evaluation metrics: thin wrappers over ``sklearn.metrics`` that fix the edge cases the probe needs.

``scores`` are what a linear head outputs: multiclass logits ``[N, K]``; binary logits ``[N]`` (or ``[N, 1]``);
multilabel logits ``[N, L]``; regression predictions ``[N, L]``. Targets follow :mod:`marlin.evaluate.manifest`.

The wrappers return NaN where a metric is undefined (AUC with a single class present, F1 of a label never seen nor
predicted, R2 of a constant target, anything on no samples), and the means skip NaNs. scikit-learn is imported on
first use (``pip install 'marlin[eval]'``).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "bootstrap_interval",
    "PRIMARY",
    "accuracy",
    "binary_auc",
    "compute_metrics",
    "confusion_matrix",
    "macro_f1",
    "primary_metric",
    "primary_value",
]

# the metric model selection (early stopping, best checkpoint) maximises, per task
PRIMARY = {"multiclass": "accuracy", "binary": "auc", "multilabel": "flat_auc", "regression": "neg_mse"}


def primary_metric(task: str) -> str:
    return PRIMARY[task]


def _sk():  # noqa: ANN202
    try:
        from sklearn import metrics
    except ImportError:
        raise ImportError("evaluation metrics need scikit-learn: pip install 'marlin[eval]'") from None
    return metrics


def accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    return float(_sk().accuracy_score(np.asarray(y), np.asarray(pred))) if len(y) else math.nan


def confusion_matrix(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``[n_classes, n_classes]`` counts, rows = true class, columns = predicted class."""
    cm = _sk().confusion_matrix(np.asarray(y, np.int64), np.asarray(pred, np.int64), labels=np.arange(n_classes))
    return cm.astype(np.int64)


def macro_f1(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Mean F1 over the classes present in `y` or `pred` (a class never seen nor predicted is left out)."""
    y, pred = np.asarray(y, np.int64), np.asarray(pred, np.int64)
    present = np.union1d(y, pred)
    if len(present) == 0:
        return math.nan
    if present.min() < 0 or present.max() >= n_classes:
        raise ValueError(f"class ids must lie in [0, {n_classes}), found {present.min()}..{present.max()}")
    return float(_sk().f1_score(y, pred, labels=present, average="macro", zero_division=0.0))


def binary_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC (ties count half); NaN when `y` has a single class."""
    y = np.asarray(y).astype(bool).ravel()
    if y.all() or not y.any():
        return math.nan
    return float(_sk().roc_auc_score(y, np.asarray(score, dtype=np.float64).ravel()))


def _nanmean(values: list[float] | np.ndarray) -> float:
    vals = [float(v) for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


_KEYS = {
    "multiclass": ("accuracy", "macro_f1", "auc"),
    "binary": ("accuracy", "macro_f1", "auc"),
    "multilabel": ("accuracy", "macro_f1", "auc", "flat_accuracy", "flat_auc"),
    "regression": ("mse", "mae", "r2", "neg_mse"),
}


def primary_value(task: str, targets: np.ndarray, scores: np.ndarray) -> float:
    """``compute_metrics(task, targets, scores)[primary_metric(task)]`` without computing the other metrics (model
    selection calls this once per candidate fit)."""
    targets, scores = np.asarray(targets), np.asarray(scores, dtype=np.float64)
    if len(targets) == 0:
        return math.nan
    if task == "multiclass":
        return accuracy(targets, scores.argmax(1))
    if task == "binary":
        return binary_auc(targets, scores.reshape(-1))
    if task == "multilabel":
        return binary_auc(targets.astype(bool).ravel(), scores.ravel())
    if task == "regression":
        return -float(_sk().mean_squared_error(targets.reshape(len(targets), -1), scores.reshape(len(scores), -1)))
    raise ValueError(f"unknown task {task!r}")


def compute_metrics(task: str, targets: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Every metric of the task.

    - multiclass: accuracy, macro_f1, auc (one-vs-rest macro over classes present in `targets`);
    - binary: accuracy (logit > 0), macro_f1, auc;
    - multilabel: per-label mean accuracy / macro-F1 / AUC, and the official MARLIN flattened ``flat_accuracy`` /
      ``flat_auc`` (all N x L decisions pooled);
    - regression: mse, mae, r2 (mean over outputs), and ``neg_mse`` for model selection.
    """
    targets, scores = np.asarray(targets), np.asarray(scores, dtype=np.float64)
    if task not in _KEYS:
        raise ValueError(f"unknown task {task!r}")
    if len(targets) == 0:
        return dict.fromkeys(_KEYS[task], math.nan)
    sk = _sk()
    if task == "multiclass":
        from scipy.special import softmax  # a scikit-learn dependency

        k = scores.shape[1]
        pred = scores.argmax(1)
        prob = softmax(scores, axis=1)
        aucs = [binary_auc(targets == c, prob[:, c]) for c in range(k) if (targets == c).any()]
        return {"accuracy": accuracy(targets, pred), "macro_f1": macro_f1(targets, pred, k), "auc": _nanmean(aucs)}
    if task == "binary":
        s = scores.reshape(-1)
        pred = (s > 0).astype(np.int64)
        return {"accuracy": accuracy(targets, pred), "macro_f1": macro_f1(targets, pred, 2),
                "auc": binary_auc(targets, s)}  # fmt: skip
    if task == "multilabel":
        y = targets.astype(bool)
        pred = scores > 0
        per_acc = (pred == y).mean(0)
        f1s = sk.f1_score(y, pred, average=None, zero_division=np.nan)  # NaN: label never present nor predicted
        return {
            "accuracy": float(per_acc.mean()),
            "macro_f1": _nanmean(f1s),
            "auc": _nanmean([binary_auc(y[:, j], scores[:, j]) for j in range(y.shape[1])]),
            "flat_accuracy": float((pred == y).mean()),
            "flat_auc": binary_auc(y.ravel(), scores.ravel()),
        }
    # regression
    y = targets.reshape(len(targets), -1).astype(np.float64)
    p = scores.reshape(len(scores), -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = sk.r2_score(y, p, multioutput="raw_values", force_finite=False)
    r2[~np.isfinite(r2)] = np.nan  # a constant target has no R2 (not sklearn's forced 0 or 1)
    mse = float(sk.mean_squared_error(y, p))
    return {"mse": mse, "mae": float(sk.mean_absolute_error(y, p)), "r2": _nanmean(r2), "neg_mse": -mse}


def bootstrap_interval(
    task: str, targets: np.ndarray, scores: np.ndarray, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the task's primary metric: test samples redrawn with replacement `n_boot`
    times (seeded), the metric recomputed on each draw. Says how much a test score could move with another test set
    of the same size from the same population; it does not cover the variance of training."""
    targets, scores = np.asarray(targets), np.asarray(scores, dtype=np.float64)
    n = len(targets)
    if n == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    values = np.array([primary_value(task, targets[i], scores[i]) for i in rng.integers(0, n, size=(n_boot, n))])
    values = values[np.isfinite(values)]  # e.g. an AUC draw with a single class
    if not len(values):
        return math.nan, math.nan
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
