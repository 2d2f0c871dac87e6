"""Evaluation metrics as pure numpy functions (no scikit-learn needed).

``scores`` are what a linear head outputs: multiclass logits ``[N, K]``; binary logits ``[N]`` (or ``[N, 1]``);
multilabel logits ``[N, L]``; regression predictions ``[N, L]``. Targets follow :mod:`marlin.evaluate.manifest`.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "PRIMARY",
    "accuracy",
    "binary_auc",
    "compute_metrics",
    "confusion_matrix",
    "macro_f1",
    "primary_metric",
]

# the metric model selection (early stopping, best checkpoint) maximises, per task
PRIMARY = {"multiclass": "accuracy", "binary": "auc", "multilabel": "flat_auc", "regression": "neg_mse"}


def primary_metric(task: str) -> str:
    return PRIMARY[task]


def accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean(np.asarray(y) == np.asarray(pred))) if len(y) else math.nan


def confusion_matrix(y: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``[n_classes, n_classes]`` counts, rows = true class, columns = predicted class."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y, np.int64), np.asarray(pred, np.int64)), 1)
    return cm


def macro_f1(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    """Mean F1 over the classes present in `y` or `pred` (a class never seen nor predicted is left out)."""
    cm = confusion_matrix(y, pred, n_classes)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1), cm.sum(0)
    present = (support + predicted) > 0
    if not present.any():
        return math.nan
    f1 = 2 * tp[present] / (support[present] + predicted[present])
    return float(f1.mean())


def binary_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC by the rank statistic (ties count half); NaN when `y` has a single class."""
    y = np.asarray(y).astype(bool).ravel()
    score = np.asarray(score, dtype=np.float64).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), dtype=np.float64)
    sorted_scores = score[order]
    # average ranks over ties
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(score)]
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2.0  # 1-based mean rank of the tie block
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def compute_metrics(task: str, targets: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Every metric of the task.

    - multiclass: accuracy, macro_f1, auc (one-vs-rest macro over classes present in `targets`);
    - binary: accuracy (logit > 0), macro_f1, auc;
    - multilabel: per-label mean accuracy / macro-F1 / AUC, and the official MARLIN flattened ``flat_accuracy`` /
      ``flat_auc`` (all N x L decisions pooled);
    - regression: mse, mae, r2 (mean over outputs), and ``neg_mse`` for model selection.
    """
    targets, scores = np.asarray(targets), np.asarray(scores, dtype=np.float64)
    if task == "multiclass":
        k = scores.shape[1]
        pred = scores.argmax(1)
        prob = _softmax(scores)
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
        f1s = []
        for j in range(y.shape[1]):
            tp = float((pred[:, j] & y[:, j]).sum())
            denom = float(pred[:, j].sum() + y[:, j].sum())
            f1s.append(2 * tp / denom if denom else math.nan)
        return {
            "accuracy": float(per_acc.mean()),
            "macro_f1": _nanmean(f1s),
            "auc": _nanmean([binary_auc(y[:, j], scores[:, j]) for j in range(y.shape[1])]),
            "flat_accuracy": float((pred == y).mean()),
            "flat_auc": binary_auc(y.ravel(), scores.ravel()),
        }
    if task == "regression":
        y = targets.reshape(len(targets), -1).astype(np.float64)
        p = scores.reshape(len(scores), -1)
        err = p - y
        var = ((y - y.mean(0)) ** 2).sum(0)
        r2 = [1 - float((err[:, j] ** 2).sum() / var[j]) if var[j] > 0 else math.nan for j in range(y.shape[1])]
        mse = float((err**2).mean())
        return {"mse": mse, "mae": float(np.abs(err).mean()), "r2": _nanmean(r2), "neg_mse": -mse}
    raise ValueError(f"unknown task {task!r}")
