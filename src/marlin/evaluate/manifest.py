"""Labelled video sets for evaluation: a generic CSV manifest, CelebV-HQ and GRID, all read into one :class:`LabelSet`.

Target conventions (every evaluator relies on them):

- ``multiclass`` / ``binary``: ``targets`` int64 ``[N]`` of class ids into ``names`` (binary has exactly 2 names);
- ``multilabel``: ``targets`` float32 ``[N, L]`` of 0 / 1, one column per name in ``names``;
- ``regression``: ``targets`` float32 ``[N, L]``, one column per name in ``names``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

__all__ = [
    "GRID_SLOTS",
    "LabelSet",
    "ManifestError",
    "TASKS",
    "hash_split",
    "read_celebvhq",
    "read_csv_manifest",
    "grid_protocol_splits",
    "read_grid",
    "read_labels",
]

TASKS = ("multiclass", "binary", "multilabel", "regression")
GRID_SLOTS = ("command", "color", "preposition", "letter", "digit", "adverb")
SPLITS = ("train", "val", "test")
MISSING_VALUES = ("", "nan", "na", "n/a", "none", "null")  # label cells that mean "no label", refused by name


class ManifestError(ValueError):
    """A manifest that cannot be read as asked; the message names the file and the problem."""


@dataclass
class LabelSet:
    """Videos with labels. ``paths[i]`` is the video, ``ids[i]`` its short name (for feature lookup by stem)."""

    paths: list[Path]
    targets: np.ndarray  # see the module docstring for the shape / dtype per task
    task: str
    names: list[str]  # class names (multiclass, binary) or label names (multilabel, regression)
    groups: list[str] | None = None  # e.g. identity: no group is split across folds / splits
    splits: list[str] | None = None  # fixed "train" / "val" / "test" per item, when the dataset defines one
    label: str = "label"  # what is predicted, for reports
    ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ManifestError(f"task must be one of {', '.join(TASKS)}, found {self.task!r}")
        if not self.ids:
            self.ids = [p.stem for p in self.paths]
        n = len(self.paths)
        columns = {"targets": self.targets, "ids": self.ids, "groups": self.groups, "splits": self.splits}
        for name, col in columns.items():
            if col is not None and len(col) != n:
                raise ManifestError(f"LabelSet: {name} has {len(col)} entries for {n} videos")
        if self.splits is not None and not set(self.splits) <= set(SPLITS):
            raise ManifestError(f"LabelSet: splits must be train / val / test, found {sorted(set(self.splits))}")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_outputs(self) -> int:
        """Width of a linear head for this task."""
        if self.task == "binary":
            return 1
        return len(self.names) if self.task != "regression" else self.targets.shape[1]

    def subset(self, index: Sequence[int] | np.ndarray) -> LabelSet:
        idx = np.asarray(index, dtype=np.int64)
        pick = lambda seq: None if seq is None else [seq[i] for i in idx]  # noqa: E731
        return replace(self, paths=pick(self.paths), targets=self.targets[idx], groups=pick(self.groups),
                       splits=pick(self.splits), ids=pick(self.ids))  # fmt: skip

    def stratify_labels(self) -> np.ndarray | None:
        """Class ids to stratify folds by (single-label classification), else None."""
        return self.targets if self.task in ("multiclass", "binary") else None


# ---- generic CSV ----------------------------------------------------------------------------------------------------
def _read_rows(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise ManifestError(f"{path}: not a readable CSV ({e})") from None
    if not rows:
        raise ManifestError(f"{path}: no rows")
    return rows


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _sort_classes(values: set[str]) -> list[str]:
    if all(_is_number(v) for v in values):
        return sorted(values, key=float)
    return sorted(values)


def build_targets(columns: dict[str, list[str]], task: str | None, where: str) -> tuple[np.ndarray, str, list[str]]:
    """Targets, task and names from label columns of strings (``task=None``: infer it, see :func:`read_labels`)."""
    names = list(columns)
    for name, vals in columns.items():
        for i, v in enumerate(vals):
            if v.strip().lower() in MISSING_VALUES:
                raise ManifestError(f"{where}: row {i + 1}: missing value {v.strip()!r} in label column {name!r}; "
                                    "give every video a label or leave it out of the manifest")  # fmt: skip
    if task is None:
        if len(names) > 1:
            binary = all(set(v.strip() for v in vals) <= {"0", "1", "0.0", "1.0"} for vals in columns.values())
            task = "multilabel" if binary else "regression"
        else:
            vals = columns[names[0]]
            numeric = all(_is_number(v) for v in vals)
            fractional = numeric and any(float(v) != int(float(v)) for v in vals)
            n_classes = len(set(vals))
            task = "regression" if fractional else ("binary" if n_classes == 2 else "multiclass")
    if task in ("multiclass", "binary"):
        if len(names) != 1:
            raise ManifestError(f"{where}: {task} takes one label column, got {names}")
        vals = [v.strip() for v in columns[names[0]]]
        classes = _sort_classes(set(vals))
        if task == "binary" and len(classes) != 2:
            raise ManifestError(f"{where}: binary task needs 2 classes in {names[0]!r}, found {len(classes)}: "
                                f"{classes[:5]}")  # fmt: skip
        if len(classes) < 2:
            raise ManifestError(f"{where}: label column {names[0]!r} has one class ({classes[0]!r}) in all "
                                f"{len(vals)} rows: there is nothing to learn or measure")  # fmt: skip
        lookup = {c: i for i, c in enumerate(classes)}
        return np.array([lookup[v] for v in vals], dtype=np.int64), task, classes
    try:
        mat = np.array([[float(columns[n][i]) for n in names] for i in range(len(columns[names[0]]))], np.float32)
    except ValueError as e:
        raise ManifestError(f"{where}: {task} labels must be numbers ({e})") from None
    if not np.isfinite(mat).all():
        row = int(np.flatnonzero(~np.isfinite(mat).all(1))[0])
        raise ManifestError(f"{where}: row {row + 1}: {task} labels must be finite numbers, found "
                            f"{[columns[n][row] for n in names]}")  # fmt: skip
    if task == "multilabel" and not np.isin(mat, (0.0, 1.0)).all():
        raise ManifestError(f"{where}: multilabel columns must hold 0 / 1")
    if task not in TASKS:
        raise ManifestError(f"task must be one of {', '.join(TASKS)}, found {task!r}")
    return mat, task, names


def read_csv_manifest(
    path: str | os.PathLike,
    labels: Sequence[str],
    *,
    task: str | None = None,
    path_col: str = "path",
    group_col: str | None = None,
    split_col: str | None = None,
    root: str | os.PathLike | None = None,
) -> LabelSet:
    """A CSV with a video path column, label column(s) and optional group / split columns.

    Relative video paths are taken from `root` (default: the CSV's folder). ``task=None`` infers it: one column of
    two values -> binary, of integers or strings -> multiclass, of fractions -> regression; several 0/1 columns ->
    multilabel, other numbers -> regression.
    """
    path = Path(path)
    rows = _read_rows(path)
    header = list(rows[0])
    wanted = [path_col, *labels, *(c for c in (group_col, split_col) if c)]
    missing = [c for c in wanted if c not in header]
    if missing:
        raise ManifestError(f"{path}: no column {', '.join(map(repr, missing))} (columns: {', '.join(header)})")
    if not labels:
        raise ManifestError(f"{path}: name at least one label column (columns: {', '.join(header)})")
    base = Path(root) if root is not None else path.parent
    targets, task, names = build_targets({c: [r[c] for r in rows] for c in labels}, task, str(path))
    splits = None
    if split_col:
        splits = [r[split_col].strip().lower() for r in rows]
        bad = sorted(set(splits) - set(SPLITS))
        if bad:
            raise ManifestError(f"{path}: split column {split_col!r} must hold train / val / test, found {bad}")
    return LabelSet(
        paths=[base / r[path_col] for r in rows],
        targets=targets,
        task=task,
        names=names,
        groups=[r[group_col] for r in rows] if group_col else None,
        splits=splits,
        label=",".join(labels),
    )


# ---- CelebV-HQ ------------------------------------------------------------------------------------------------------
def hash_split(key: str, fractions: tuple[float, float, float] = (0.7, 0.1, 0.2), salt: str = "marlin") -> str:
    """A deterministic train / val / test assignment from a string (same key -> same split, on any machine)."""
    h = int.from_bytes(hashlib.sha256(f"{salt}:{key}".encode()).digest()[:8], "big") / 2**64
    if h < fractions[0]:
        return "train"
    return "val" if h < fractions[0] + fractions[1] else "test"


def read_celebvhq(root: str | os.PathLike, task: str = "appearance", *, video_dir: str = "cropped") -> LabelSet:
    """CelebV-HQ multilabel attributes (``appearance``: 40 labels, ``action``: 35) from ``root/celebvhq_info.json``.

    Split: the official ``root/{train,val,test}.txt`` name lists when present; otherwise a deterministic 70/10/20
    split hashed from each clip's YouTube id, so clips cut from one source video never straddle splits (the official
    preprocessing shuffles at random, which no one can reproduce). Videos: ``root/<video_dir>/<clip>.mp4``; the
    YouTube id is also the group for k-fold.
    """
    root = Path(root)
    if task not in ("appearance", "action"):
        raise ManifestError(f"CelebV-HQ task must be 'appearance' or 'action', found {task!r}")
    info_path = root / "celebvhq_info.json"
    try:
        info = json.loads(info_path.read_text())
        clips = info["clips"]
    except FileNotFoundError:
        raise ManifestError(f"{info_path}: not found (CelebV-HQ root must hold celebvhq_info.json)") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ManifestError(f"{info_path}: not CelebV-HQ metadata ({e!r})") from None
    names = list(info.get("meta_info", {}).get(f"{task}_mapping", []))
    split_files = [root / f"{s}.txt" for s in SPLITS]
    if all(f.is_file() for f in split_files):
        order = [
            (n.strip(), s)
            for s, f in zip(SPLITS, split_files, strict=True)
            for n in f.read_text().splitlines()
            if n.strip()
        ]
        unknown = [n for n, _ in order if n not in clips]
        if unknown:
            raise ManifestError(f"{root}: {len(unknown)} names in the split files are not in celebvhq_info.json, "
                                f"e.g. {unknown[0]!r}")  # fmt: skip
    else:
        order = [(n, hash_split(str(c.get("ytb_id", n)))) for n, c in sorted(clips.items())]
    rows, bad = [], []
    for name, split in order:
        attrs = clips[name].get("attributes", {}).get(task)
        if attrs is None:
            bad.append(name)
            continue
        rows.append((name, split, [float(a) for a in attrs]))
    if bad:
        raise ManifestError(f"{info_path}: {len(bad)} clips have no {task!r} attributes, e.g. {bad[0]!r}")
    width = {len(r[2]) for r in rows}
    if len(width) != 1:
        raise ManifestError(f"{info_path}: {task} attribute lists differ in length: {sorted(width)}")
    n_labels = width.pop()
    names = names if len(names) == n_labels else [f"{task}_{i}" for i in range(n_labels)]
    return LabelSet(
        paths=[root / video_dir / f"{n}.mp4" for n, _, _ in rows],
        targets=np.array([r[2] for r in rows], dtype=np.float32),
        task="multilabel",
        names=names,
        groups=[str(clips[n].get("ytb_id", n)) for n, _, _ in rows],
        splits=[s for _, s, _ in rows],
        label=task,
        ids=[n for n, _, _ in rows],
    )


# ---- GRID -----------------------------------------------------------------------------------------------------------
GRID_TEST_FRACTION = 0.2  # the GRID protocol's held-out sentences (200 of GRID s1's 1000)
GRID_STRATIFY = "letter"  # the slot with most classes (25): each keeps its share in train and test


def grid_protocol_splits(root: str | os.PathLike, seed: int = 0) -> list[str]:
    """The clean GRID protocol: ``"train"`` / ``"test"`` per row of ``labels.csv``, fixed by `seed`.

    A stratified (by the letter slot) seeded 80 / 20 split of the sentences. The test sentences are meant to be kept
    out of everything: pretraining stores, probe training and every choice (hyper-parameters are chosen on parts of
    the training sentences only), so that test accuracy is an unbiased estimate.
    """
    from .splits import split_indices

    rows = _read_rows(Path(root) / "labels.csv")
    if GRID_STRATIFY not in rows[0]:
        raise ManifestError(f"{Path(root) / 'labels.csv'}: needs the column {GRID_STRATIFY}")
    _, y = np.unique([r[GRID_STRATIFY] for r in rows], return_inverse=True)
    parts = split_indices(len(rows), (1 - GRID_TEST_FRACTION, 0.0, GRID_TEST_FRACTION), y=y, seed=seed)
    out = ["train"] * len(rows)
    for i in parts["test"]:
        out[i] = "test"
    return out


def read_grid(root: str | os.PathLike, slot: str, *, protocol: bool = False, seed: int = 0) -> LabelSet:
    """One GRID word slot (command / color / preposition / letter / digit / adverb) as a multiclass task.

    `root` holds ``labels.csv`` (video + one column per slot) and ``videos/``: one speaker, so no groups (for
    several speakers, list them in a CSV manifest with a speaker column as the group). With `protocol` the rows carry
    the fixed train / test split of :func:`grid_protocol_splits`.
    """
    root = Path(root)
    if slot not in GRID_SLOTS:
        raise ManifestError(f"GRID slot must be one of {', '.join(GRID_SLOTS)}, found {slot!r}")
    rows = _read_rows(root / "labels.csv")
    if "video" not in rows[0] or slot not in rows[0]:
        raise ManifestError(f"{root / 'labels.csv'}: needs columns video and {slot}")
    targets, task, names = build_targets({slot: [r[slot] for r in rows]}, "multiclass", str(root / "labels.csv"))
    return LabelSet(
        paths=[root / "videos" / r["video"] for r in rows],
        targets=targets,
        task=task,
        names=names,
        label=slot,
        splits=grid_protocol_splits(root, seed) if protocol else None,
    )


def read_labels(
    source: str | os.PathLike,
    labels: Sequence[str] = (),
    *,
    task: str | None = None,
    path_col: str = "path",
    group_col: str | None = None,
    split_col: str | None = None,
) -> LabelSet:
    """Dispatch on the source: a CelebV-HQ root (has celebvhq_info.json; labels = [appearance | action]), a GRID
    folder (has labels.csv and videos/; labels = [slot]), or a CSV manifest."""
    p = Path(source)
    if p.is_dir() and (p / "celebvhq_info.json").is_file():
        if len(labels) > 1:
            raise ManifestError(f"{p}: CelebV-HQ takes one task, appearance or action; got {list(labels)}")
        return read_celebvhq(p, labels[0] if labels else "appearance")
    if p.is_dir() and (p / "labels.csv").is_file() and (p / "videos").is_dir():
        if len(labels) != 1:
            raise ManifestError(f"{p}: GRID takes one word slot ({', '.join(GRID_SLOTS)}); got {list(labels)}")
        return read_grid(p, labels[0], protocol=True)  # a fixed split (`--split fixed`) is the GRID protocol's
    if p.is_dir():
        raise ManifestError(f"{p}: a folder that is neither CelebV-HQ (celebvhq_info.json) nor GRID (labels.csv + "
                            "videos/); pass a CSV manifest")  # fmt: skip
    return read_csv_manifest(p, labels, task=task, path_col=path_col, group_col=group_col, split_col=split_col)
