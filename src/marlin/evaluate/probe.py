"""Probing protocol: k-fold or fixed split, group-aware, low-data train fractions, metrics, JSON + pictures.

Two heads on frozen features: ``linear`` on vectors ``[N, F]`` (:mod:`marlin.evaluate.linear`) and ``attentive`` on
tokens ``[N, L, D]`` (:mod:`marlin.evaluate.attentive`). Nothing is chosen on test data: standardisation, PCA and the L2
strength (linear), the learning rate and the epoch count (attentive) are learnt on each training part (by an inner
k-fold or a held-out part of it, or on the split's val part), then the probe is refit on the whole training part and
scored once on its test part. Every result carries a 95% bootstrap interval of the primary metric over the pooled test
predictions.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..utils.fileio import atomic_write_text, json_safe
from .attentive import AttentiveConfig, AttentiveProbe
from .linear import DEFAULT_L2_GRID, LinearProbe, centre_steps, select_l2
from .manifest import LabelSet
from .metrics import binary_auc, bootstrap_interval, compute_metrics, confusion_matrix, primary_metric, primary_value
from .splits import kfold, split_indices, subsample

__all__ = ["ProbeConfig", "plot_probe", "run_probe", "write_probe"]

log = logging.getLogger("marlin")


HEADS = ("linear", "attentive")
CENTRING = {"off": (False,), "on": (True,), "auto": (False, True)}  # ProbeConfig.centre -> the candidates tried


@dataclass
class ProbeConfig:
    head: str = "linear"  # "linear" on feature vectors [N, F]; "attentive" on tokens [N, L, D]
    folds: int | None = 5  # k-fold cross-validation; None: the fixed train / val / test split
    split: tuple[float, float, float] = (0.7, 0.1, 0.2)  # used when folds is None and the data has no split
    train_fractions: tuple[float, ...] = (1.0,)  # low-data regime: fractions of each training part
    pca: int | None = None  # PCA dimensions learnt on the training part (None: none)
    standardize: bool = True  # zero mean / unit variance per feature, from the training part
    l2: float | None = None  # fixed L2 strength; None: choose from l2_grid by inner CV on the training part
    l2_grid: tuple[float, ...] = DEFAULT_L2_GRID
    inner_folds: int = 3
    max_iter: int = 200  # L-BFGS iterations per fit
    # linear head on time-kept features [N, S, D]: "on" subtracts each clip's mean over its time steps (what a clip
    # holds constant: who, light, session; see linear.centre_steps), "auto" tries both and keeps the better one by
    # the same inner CV / validation part as the L2 strength; "off" flattens them as they are. Attentive head (with
    # attentive.time_steps > 1): the same per token place (attentive.centre_tokens), auto choosing on validation
    centre: str = "off"
    clip_steps: int | None = None  # time steps per clip for centring (None: all steps of a sample are one clip)
    seed: int = 0
    attentive: AttentiveConfig = field(default_factory=AttentiveConfig)  # the attentive head's training
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes stored with the results


def _summary(values: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = values[0].keys() if values else []
    out = {}
    for k in keys:
        v = [d[k] for d in values if not math.isnan(d[k])]
        out[k] = {"mean": float(np.mean(v)) if v else math.nan, "std": float(np.std(v)) if v else math.nan}
    return out


def _parts(labels: LabelSet, cfg: ProbeConfig) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(train, val, test) index triples: k folds (val empty; the inner CV works inside train) or one fixed split."""
    n = len(labels)
    if cfg.folds is not None:
        return [
            (tr, np.empty(0, np.int64), te)
            for tr, te in kfold(n, cfg.folds, y=labels.stratify_labels(), groups=labels.groups, seed=cfg.seed)
        ]
    if labels.splits is not None:
        s = np.asarray(labels.splits)
        parts = {k: np.flatnonzero(s == k) for k in ("train", "val", "test")}
    else:
        parts = split_indices(n, cfg.split, y=labels.stratify_labels(), groups=labels.groups, seed=cfg.seed)
    if len(parts["train"]) == 0 or len(parts["test"]) == 0:
        raise ValueError(f"the split leaves {len(parts['train'])} training and {len(parts['test'])} test videos")
    return [(parts["train"], parts["val"], parts["test"])]


def _fit_part(x: np.ndarray, y: np.ndarray, tr: np.ndarray, va: np.ndarray, labels: LabelSet,
              cfg: ProbeConfig) -> tuple[Any, Any, np.ndarray]:  # fmt: skip
    """A probe fitted on the rows `tr`, hyper-parameters chosen on `va` or inside `tr`: (probe, what was chosen, the
    inputs of every row as the probe reads them)."""
    task, k = labels.task, labels.num_outputs
    if cfg.head == "attentive":
        return _fit_attentive(x, y, tr, va, labels, cfg)
    kw = {"pca": cfg.pca, "standardize": cfg.standardize, "max_iter": cfg.max_iter}
    inputs = _linear_inputs(x, cfg)
    best: tuple[float, bool, float] | None = None  # (score, centred, l2)
    for centred, z in inputs.items():
        l2, score = _choose_l2(z, y, tr, va, labels, cfg, kw)
        score = -math.inf if math.isnan(score) else score
        if best is None or score > best[0]:  # ties keep the earlier candidate: uncentred first
            best = (score, centred, l2)
    _, centred, l2 = best
    z = inputs[centred]
    probe = LinearProbe(task, k, l2=l2, **kw).fit(z[tr], y[tr])
    return probe, ({"l2": l2, "centred": centred} if len(inputs) > 1 else l2), z


def _fit_attentive(x: np.ndarray, y: np.ndarray, tr: np.ndarray, va: np.ndarray, labels: LabelSet,
                   cfg: ProbeConfig) -> tuple[Any, Any, np.ndarray]:  # fmt: skip
    """The attentive head of :func:`_fit_part`; with ``centre="auto"`` one pooler per candidate, the better by its
    validation score kept (ties: uncentred)."""
    best = None
    for centred in CENTRING[cfg.centre]:
        acfg = replace(cfg.attentive, seed=cfg.seed, centre=centred, clip_steps=cfg.clip_steps)
        probe = AttentiveProbe(labels.task, labels.num_outputs, acfg)
        probe.fit(x[tr], y[tr], val=(x[va], y[va]) if len(va) else None)
        score = probe.chosen.get("val_score", -math.inf)
        if best is None or score > best[0]:
            best = (score, probe)
    probe = best[1]
    return probe, ({**probe.chosen, "centred": probe.cfg.centre} if cfg.centre != "off" else probe.chosen), x


def _linear_inputs(x: np.ndarray, cfg: ProbeConfig) -> dict[bool, np.ndarray]:
    """The linear head's candidate inputs ``[N, F]`` keyed by whether they are centred in time (one unless
    ``centre="auto"``); time-kept features ``[N, S, D]`` are flattened, the steps in order."""
    if x.ndim == 2:
        return {False: x}
    return {c: (centre_steps(x, cfg.clip_steps) if c else x).reshape(len(x), -1) for c in CENTRING[cfg.centre]}


def _choose_l2(z: np.ndarray, y: np.ndarray, tr: np.ndarray, va: np.ndarray, labels: LabelSet, cfg: ProbeConfig,
               kw: dict[str, Any]) -> tuple[float, float]:  # fmt: skip
    """(L2 strength, its score) on training data only: the validation part when there is one, else the inner CV;
    a fixed ``cfg.l2`` scores nan (nothing to choose)."""
    task, k = labels.task, labels.num_outputs
    if cfg.l2 is not None:
        return cfg.l2, math.nan
    if len(va):
        table = {}
        for cand in cfg.l2_grid:
            p = LinearProbe(task, k, l2=cand, **kw).fit(z[tr], y[tr])
            table[cand] = primary_value(task, y[va], p.scores(z[va]))
    else:
        l2, table = select_l2(z[tr], y[tr], task, k, grid=cfg.l2_grid, folds=cfg.inner_folds, seed=cfg.seed, **kw)
        return l2, table.get(l2, math.nan)  # empty table: a one-value grid or too few samples, nothing compared
    l2 = max(table, key=lambda c: (-math.inf if math.isnan(table[c]) else table[c], c))
    return l2, table[l2]


def _check_inputs(x: np.ndarray, labels: LabelSet, cfg: ProbeConfig) -> np.ndarray:
    if cfg.head not in HEADS:
        raise ValueError(f"probe head must be one of {', '.join(HEADS)}, found {cfg.head!r}")
    if cfg.centre not in CENTRING:
        raise ValueError(f"centre must be one of {', '.join(CENTRING)}, found {cfg.centre!r}")
    if cfg.head == "attentive":
        x = np.asarray(x)
        if x.ndim != 3:
            raise ValueError(f"the attentive probe needs tokens [N, L, D], got features of shape {tuple(x.shape)}")
        _check_token_centring(x, cfg)
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32)
    else:
        x = np.asarray(x, dtype=np.float32)
        _check_centring(x, cfg)
    if len(x) != len(labels):
        raise ValueError(f"{len(x)} feature rows for {len(labels)} labelled videos")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf")
    return x


def _check_centring(x: np.ndarray, cfg: ProbeConfig) -> None:
    """The linear head reads ``[N, F]``, or time-kept ``[N, S, D]`` (needed by, and only useful with, centring)."""
    if x.ndim not in (2, 3):
        raise ValueError(f"the linear probe needs features [N, F] or time-kept [N, S, D], got shape {tuple(x.shape)}")
    if cfg.centre != "off" and x.ndim != 3:
        raise ValueError(f"centre={cfg.centre!r} needs time-kept features [N, S, D], got shape {tuple(x.shape)}")
    if cfg.centre == "auto" and cfg.l2 is not None:
        raise ValueError("centre='auto' is chosen with the L2 strength on training data: leave l2 unset")
    if x.ndim == 3 and cfg.clip_steps is not None and (cfg.clip_steps < 1 or x.shape[1] % cfg.clip_steps):
        raise ValueError(f"{x.shape[1]} time steps do not split into clips of {cfg.clip_steps}")


def _check_token_centring(x: np.ndarray, cfg: ProbeConfig) -> None:
    """Centring tokens needs their time steps (``attentive.time_steps`` > 1) and clips that split them."""
    steps = cfg.attentive.time_steps
    if cfg.centre != "off" and steps < 2:
        raise ValueError("centring tokens needs their time steps: set attentive.time_steps (> 1)")
    if x.shape[1] % steps:
        raise ValueError(f"{x.shape[1]} tokens do not divide into {steps} time steps")
    if cfg.centre != "off" and cfg.clip_steps is not None and (cfg.clip_steps < 1 or steps % cfg.clip_steps):
        raise ValueError(f"{steps} time steps do not split into clips of {cfg.clip_steps}")


def _pooled_entry(labels: LabelSet, scores: np.ndarray, tested: np.ndarray, seed: int) -> dict[str, Any]:
    """Metrics of all test predictions together, their bootstrap interval and the confusion / per-label details."""
    task, y = labels.task, labels.targets
    st, yt = scores[tested], y[tested]
    entry: dict[str, Any] = {"pooled": compute_metrics(task, yt, st)}
    lo, hi = bootstrap_interval(task, yt, st, seed=seed)
    entry["ci95"] = {"metric": primary_metric(task), "low": lo, "high": hi, "n_test": int(tested.sum())}
    if task in ("multiclass", "binary"):
        pred = st.argmax(1) if task == "multiclass" else (st > 0).astype(int)
        entry["confusion"] = confusion_matrix(yt, pred, len(labels.names)).tolist()
    elif task == "multilabel":
        entry["per_label"] = {
            name: {"auc": binary_auc(yt[:, j], st[:, j]), "accuracy": float(((st[:, j] > 0) == (yt[:, j] > 0.5))
                   .mean()), "positives": float(yt[:, j].mean())}
            for j, name in enumerate(labels.names)
        }  # fmt: skip
    else:
        entry["predictions"] = {"target": yt.tolist(), "predicted": st.tolist()}
    return entry


def run_probe(x: np.ndarray, labels: LabelSet, cfg: ProbeConfig | None = None) -> dict[str, Any]:
    """Probe features `x` (``[N, F]``; tokens ``[N, L, D]`` for the attentive head) against `labels`; returns a
    JSON-ready result dict (see :func:`write_probe`).

    With a fixed split that has a validation part, the hyper-parameters are chosen on it (train -> val) instead of
    inside the training part, then the probe is refit on train and scored on test.
    """
    cfg = cfg or ProbeConfig()
    x = _check_inputs(x, labels, cfg)
    task, k, y, strat = labels.task, labels.num_outputs, labels.targets, labels.stratify_labels()
    t0 = time.perf_counter()
    parts = _parts(labels, cfg)
    results: dict[str, Any] = {
        "task": task, "label": labels.label, "n": len(labels), "features": int(np.prod(x.shape[1:])),
        "head": cfg.head, "names": labels.names, "config": asdict(cfg), "by_fraction": {},
        "protocol": f"{cfg.folds}-fold" if cfg.folds is not None else "split",
    }  # fmt: skip
    for frac in cfg.train_fractions:
        fold_metrics, chosen = [], []
        scores_all = np.zeros((len(labels), *((k,) if task != "binary" else ())), dtype=np.float64)
        tested = np.zeros(len(labels), dtype=bool)
        for i, (tr, va, te) in enumerate(parts):
            tr = subsample(tr, frac, y=strat, seed=cfg.seed + i)
            probe, choice, z = _fit_part(x, y, tr, va, labels, cfg)
            s = probe.scores(z[te])
            scores_all[te], tested[te] = s, True
            m = compute_metrics(task, y[te], s)
            m.update(n_train=float(len(tr)), n_test=float(len(te)))
            fold_metrics.append(m)
            chosen.append(choice)
        entry: dict[str, Any] = {"metrics": _summary(fold_metrics), "folds": fold_metrics,
                                 "l2" if cfg.head == "linear" else "chosen": chosen}  # fmt: skip
        entry.update(_pooled_entry(labels, scores_all, tested, cfg.seed))
        results["by_fraction"][f"{frac:g}"] = entry
        log.info(
            "probe %s, train fraction %g: %s",
            labels.label,
            frac,
            ", ".join(f"{k} {v['mean']:.3f}" for k, v in entry["metrics"].items() if not k.startswith("n_")),
        )
    results["seconds"] = time.perf_counter() - t0
    return results


def write_probe(results: dict[str, Any], out_dir: str | os.PathLike, *, plot: bool = True) -> list[Path]:
    """``results.json`` (NaN -> null) and, when matplotlib is available, a picture per train fraction."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json"]
    atomic_write_text(paths[0], json.dumps(json_safe(results), indent=1) + "\n")
    if plot:
        paths += plot_probe(results, out)
    return paths


def plot_probe(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Confusion matrix (classification), per-label AUC bars (multilabel) or predicted-vs-true scatter (regression)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no probe pictures (pip install matplotlib)")
        return []
    written = []
    names: Sequence[str] = results["names"]
    for frac, entry in results["by_fraction"].items():
        title = f"{results['label']} ({results['task']}, {results['protocol']}, train fraction {frac})"
        if "confusion" in entry:
            cm = np.asarray(entry["confusion"], dtype=np.float64)
            norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
            side = max(4.0, 0.35 * len(names) + 2)
            fig, ax = plt.subplots(figsize=(side + 1, side))
            im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
            ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
            ax.set_yticks(range(len(names)), names, fontsize=7)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            if len(names) <= 12:
                for i in range(len(names)):
                    for j in range(len(names)):
                        ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                                color="white" if norm[i, j] > 0.5 else "black")  # fmt: skip
            fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
            acc = entry["metrics"]["accuracy"]["mean"]
            ax.set_title(f"{title}\naccuracy {acc:.3f}", fontsize=9)
        elif "per_label" in entry:
            per = entry["per_label"]
            fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(per) + 2), 4))
            aucs = [np.nan if v["auc"] is None else v["auc"] for v in per.values()]
            ax.bar(range(len(per)), aucs, color="tab:blue")
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
            ax.set_xticks(range(len(per)), list(per), rotation=90, fontsize=7)
            ax.set_ylim(0, 1)
            ax.set_ylabel("AUC")
            ax.set_title(title, fontsize=9)
        else:
            pr = entry["predictions"]
            t, p = np.asarray(pr["target"]).reshape(-1), np.asarray(pr["predicted"]).reshape(-1)
            fig, ax = plt.subplots(figsize=(4.5, 4.5))
            ax.scatter(t, p, s=8, alpha=0.6)
            lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
            ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
            ax.set_xlabel("target")
            ax.set_ylabel("predicted")
            ax.set_title(title, fontsize=9)
        fig.tight_layout()
        path = out_dir / f"probe_{results['label'].replace(',', '+')}_frac{frac}.png"
        tmp = path.with_name(path.name + ".part")
        fig.savefig(tmp, dpi=110, format="png")  # write then rename: never a half-written picture
        plt.close(fig)
        os.replace(tmp, path)
        written.append(path)
    return written
