"""Build a pretraining store (`marlin prepare`): face crops and parse maps per video, resumable and failure-isolated.

Sources are video files, folders of videos (recursive), CSV manifests, or folders of frame images in the YouTube
Faces layout ``frame_images_DB/<person>/<n>/*.jpg`` (each leaf folder is one video). Per item a worker decodes the
frames it keeps (every ``frame_step``-th, at most ``max_frames``), detects, tracks and crops the face
(:mod:`marlin.video.faces`), parses every crop (:class:`marlin.face.parse.FaceParser`) and writes them in the format of
:mod:`marlin.data.store`.

Guarantees:

* **Atomic items.** An item is written into ``items/.tmp-<id>-<pid>/`` and renamed to ``items/<id>/`` only when
  complete, so a killed run (even ``kill -9``) loses at most the items in flight and never leaves a partial one;
  leftovers are removed by the next run. (Atomic against process death, not power loss: nothing is fsynced.)
* **Resumable.** A finished item whose source is unchanged (same size and modification time) is skipped. Settings
  that change the content (size, frame step, codecs, ...) are fixed in ``store.json``; a run with other settings is
  refused rather than mixing two kinds of item in one store.
* **Isolated failures.** An unreadable video, a video with no face, or a crashed worker fails that item only; failures
  are listed in ``errors.csv`` and the run's exit status says whether there were any.

The split is made *by identity*: every item has a group key (by default the first folder below the source root,
e.g. the person in ``<person>/<clip>.mp4``, or the file stem for a flat folder; or what ``group_regex`` captures) and
whole groups go to ``val`` until it holds ``val_fraction`` of the items. One group (one speaker, like GRID s1) cannot
be split by identity: everything goes to ``train`` and a warning says so.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import shutil
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..utils.errors import one_line
from ..utils.fileio import atomic_write_text
from ..utils.pool import WorkerDied, run_jobs
from ..video.io import VIDEO_EXTENSIONS
from .sources import IMAGE_EXTENSIONS, list_files, read_path_csv
from .store import CODECS, MANIFEST_FIELDS, STORE_VERSION, FrameWriter, StoreError

log = logging.getLogger("marlin")

__all__ = [
    "ItemResult",
    "PrepareSettings",
    "PrepareSummary",
    "Source",
    "assign_splits",
    "collect_sources",
    "prepare_item",
    "prepare_store",
    "write_manifest",
]

ERROR_FIELDS = ("id", "status", "source", "error")


# ---- settings and sources --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PrepareSettings:
    """What an item holds; fixed per store (saved in ``store.json``) so that every item is alike."""

    size: int = 224  # side of the square crops (MarlinConfig.img_size)
    crop_face: bool = True  # detect/track/crop; False for inputs that are already face crops
    parse: bool = True  # store LaPa parse maps (needed by the face-guided masks)
    frame_step: int = 1  # keep source frames 0, step, 2 * step, ...
    max_frames: int | None = None  # keep at most this many frames per video (None: all)
    video_codec: str = "jpeg"  # "jpeg" or "raw"
    parse_codec: str = "zlib"  # "zlib" or "raw"
    jpeg_quality: int = 95
    detector: str = "mediapipe"  # face detector backend (marlin.face.detect.create_detector)

    def __post_init__(self) -> None:
        checks = [
            (self.size >= 16, f"size must be >= 16, found {self.size}"),
            (self.frame_step >= 1, f"frame_step must be >= 1, found {self.frame_step}"),
            (self.max_frames is None or self.max_frames >= 1, f"max_frames must be >= 1, found {self.max_frames}"),
            (
                self.video_codec in CODECS["video"],
                f"video_codec must be one of {CODECS['video']}, found {self.video_codec!r}",
            ),
            (
                self.parse_codec in CODECS["parse"],
                f"parse_codec must be in {CODECS['parse']}, found {self.parse_codec!r}",
            ),
            (1 <= self.jpeg_quality <= 100, f"jpeg_quality must be in [1, 100], found {self.jpeg_quality}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"PrepareSettings: {msg}")


@dataclass(frozen=True)
class Source:
    """One item to prepare."""

    id: str  # folder name under items/; unique in the store
    path: Path  # a video file, or a folder of frame images
    kind: str  # "video" or "frames"
    group: str  # identity key for the split
    split: str | None = None  # forced by a CSV "split" column, else assigned by group


def _natural_key(name: str) -> list[Any]:
    """Sort key that orders ``frame2.jpg`` before ``frame10.jpg`` (YouTube Faces names frames ``0.<n>.jpg``)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _frame_files(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
        key=lambda p: _natural_key(p.name),
    )


def _sanitize(rel: str) -> str:
    """A flat folder name from a relative path: separators become ``__``, odd characters ``_``."""
    parts = [re.sub(r"[^A-Za-z0-9._-]+", "_", part) for part in Path(rel).parts]
    return "__".join(p.strip(".") or "_" for p in parts)


def _default_group(rel: Path) -> str:
    """First folder below the root (the person), or the file stem for an item directly in the root."""
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _group_from_regex(pattern: re.Pattern[str], path: Path) -> str:
    m = pattern.search(path.as_posix())
    if m is None:
        raise ValueError(f"{path}: --group-regex {pattern.pattern!r} does not match; expected it to match every source")
    if "group" in pattern.groupindex:
        return m.group("group")
    return m.group(1) if pattern.groups else m.group(0)


def collect_sources(
    specs: Sequence[str | os.PathLike], *, layout: str = "auto", group_regex: str | None = None
) -> list[Source]:
    """Expand inputs into the items to prepare.

    Args:
        specs: video files, folders, or CSV manifests (a ``path`` or ``video`` column, relative to the CSV's folder;
            optional ``group`` and ``split`` columns).
        layout: for folders: ``"videos"`` (video files, recursive), ``"frames"`` (every folder holding images is one
            video, e.g. YouTube Faces ``frame_images_DB``), or ``"auto"``: videos if the folder holds any, else frames.
        group_regex: identity key from the source path (named group ``group``, else group 1, else the whole match);
            default: see :func:`_default_group`.

    Raises:
        ValueError: a spec that does not exist or holds nothing, a regex that misses a path, or a CSV without a path
            column.
    """
    if layout not in ("auto", "videos", "frames"):
        raise ValueError(f"layout must be 'auto', 'videos' or 'frames', found {layout!r}")
    pattern = re.compile(group_regex) if group_regex else None
    rows: list[tuple[Path, str, Path, str | None, str | None]] = []  # (path, kind, rel, group, split)
    for spec in map(Path, specs):
        spec = spec.expanduser()
        if spec.is_file() and spec.suffix.lower() == ".csv":
            rows += _csv_rows(spec)
        elif spec.is_file():
            rows.append((spec, "video", Path(spec.name), None, None))
        elif spec.is_dir():
            found = _folder_rows(spec, layout)
            if not found:
                raise ValueError(f"{spec}: no video file or frame folder found (layout {layout!r})")
            rows += found
        else:
            raise ValueError(f"{spec}: no such file or folder")
    sources, seen = [], set()
    for path, kind, rel, group, split in rows:
        key = path.resolve()
        if key in seen:
            continue
        seen.add(key)
        if pattern is not None:
            group = _group_from_regex(pattern, path)
        if split not in (None, "", "train", "val"):
            raise ValueError(f"{path}: split must be 'train' or 'val', found {split!r}")
        rel_id = rel.with_suffix("") if kind == "video" else rel
        sources.append(Source(_sanitize(str(rel_id)), path, kind, group or _default_group(rel), split or None))
    return _dedupe_ids(sources)


def _folder_rows(root: Path, layout: str) -> list[tuple[Path, str, Path, None, None]]:
    files = list_files(root)  # dangling links listed (then failed), unlistable folders warned about
    videos = []
    if layout in ("auto", "videos"):
        videos = [p for p in files if p.suffix.lower() in VIDEO_EXTENSIONS]
    if videos or layout == "videos":
        return [(p, "video", p.relative_to(root), None, None) for p in videos]
    folders = sorted({p.parent for p in files if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS})
    return [(f, "frames", f.relative_to(root) if f != root else Path(root.name), None, None) for f in folders]


def _csv_rows(path: Path) -> list[tuple[Path, str, Path, str | None, str | None]]:
    out = []
    for row in read_path_csv(path):
        p = Path(row["path"])
        try:
            rel = p.relative_to(path.parent)
        except ValueError:
            rel = Path(p.name)
        out.append((p, "frames" if p.is_dir() else "video", rel, row.get("group") or None, row.get("split") or None))
    return out


def _dedupe_ids(sources: list[Source]) -> list[Source]:
    """Give every colliding id a short hash of its path (deterministic for the same inputs)."""
    counts: dict[str, int] = {}
    for s in sources:
        counts[s.id] = counts.get(s.id, 0) + 1
    out = []
    for s in sources:
        if counts[s.id] > 1:
            digest = hashlib.sha1(str(s.path.resolve()).encode()).hexdigest()[:8]
            s = Source(f"{s.id}-{digest}", s.path, s.kind, s.group, s.split)
        out.append(s)
    return out


def assign_splits(groups: Mapping[str, str], val_fraction: float, seed: int = 0) -> dict[str, str]:
    """Split items by group: whole groups go to ``"val"`` until it holds ``val_fraction`` of the items.

    Groups are taken in an order fixed by a hash of ``(seed, group)``, so the split depends only on the set of items,
    not on the order they were prepared in. At least one group always stays in ``train``; with a single group
    everything is ``train`` (a warning is logged).

    Args:
        groups: item id -> group key.
        val_fraction: target fraction of items in ``val``, in ``[0, 1)``.
        seed: changes which groups are drawn.

    Returns:
        item id -> ``"train"`` or ``"val"``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), found {val_fraction}")
    members: dict[str, list[str]] = {}
    for item, group in groups.items():
        members.setdefault(group, []).append(item)
    split = dict.fromkeys(groups, "train")
    if val_fraction == 0 or not groups:
        return split
    if len(members) < 2:
        log.warning("split by identity: all %d items share the group %r, so val is empty; pass --group-regex to "
                    "group them otherwise", len(groups), next(iter(members)))  # fmt: skip
        return split
    order = sorted(members, key=lambda g: hashlib.sha1(f"{seed}:{g}".encode()).hexdigest())
    target = val_fraction * len(groups)
    n_val = 0
    for group in order[:-1]:  # never all groups
        if n_val >= target:
            break
        for item in members[group]:
            split[item] = "val"
        n_val += len(members[group])
    return split


# ---- worker side -----------------------------------------------------------------------------------------------------
@dataclass
class ItemResult:
    """What happened to one source."""

    id: str
    source: str
    status: str  # "ok", "skipped", "failed", "no_face"
    error: str = ""
    seconds: float = 0.0
    n_frames: int = 0


_TOOLS: dict[str, Any] = {}  # per process: the detector and the parser, built on first use


def _detector(name: str) -> Any:
    if "detector" not in _TOOLS:
        from ..face.detect import create_detector

        _TOOLS["detector"] = create_detector(name)
    return _TOOLS["detector"]


def _parser() -> Any:
    if "parser" not in _TOOLS:
        from ..face.parse import FaceParser

        _TOOLS["parser"] = FaceParser()
    return _TOOLS["parser"]


def _close_tools() -> None:
    for tool in _TOOLS.values():
        tool.close()
    _TOOLS.clear()


def source_signature(path: Path) -> dict[str, int]:
    """What identifies a source's content cheaply: size and mtime of a file, image count and mtime of a folder."""
    st = path.stat()
    if path.is_dir():
        return {"frames": len(_frame_files(path)), "mtime_ns": st.st_mtime_ns}
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _central_square(width: int, height: int) -> tuple[float, float, float, float]:
    side = min(width, height)
    x1, y1 = (width - side) / 2, (height - side) / 2
    return (x1, y1, x1 + side, y1 + side)


def _iter_crops(source: Source, settings: PrepareSettings, info: dict[str, Any]) -> Iterator[np.ndarray]:
    """Yield the ``[S, S, 3]`` crops of the frames kept from ``source``; fills ``info`` with counts."""
    from ..face.crop import MEDIAPIPE_OFFICIAL_FRAMING, crop_face

    step, cap, size = settings.frame_step, settings.max_frames, settings.size
    stop = None if cap is None else cap * step

    def keep(i: int) -> bool:
        return i % step == 0 and (stop is None or i < stop)

    if source.kind == "video":
        from ..video.io import iter_frames, probe_video

        if settings.crop_face:
            from ..video.faces import iter_face_crops, plan_face_crops

            plan = plan_face_crops(source.path, _detector(settings.detector), select=keep)[0]
            info["source_frames"], info["faceless"] = plan.n_frames, plan.n_faceless
            for _, crop in iter_face_crops(plan, None, size=size):
                yield crop
        else:
            info["source_frames"], info["faceless"] = probe_video(source.path).n_frames, 0
            for frame in iter_frames(source.path, step=step, stop=stop):
                yield crop_face(frame, _central_square(frame.shape[1], frame.shape[0]), size=size)
        return

    from PIL import Image

    files = _frame_files(source.path)
    if not files:
        raise ValueError(f"{source.path}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    info["source_frames"] = len(files)
    kept = [f for i, f in enumerate(files) if keep(i)]

    def load(f: Path) -> np.ndarray:
        with Image.open(f) as im:
            return np.asarray(im.convert("RGB"))

    if not settings.crop_face:
        info["faceless"] = 0
        for f in kept:
            frame = load(f)
            yield crop_face(frame, _central_square(frame.shape[1], frame.shape[0]), size=size)
        return
    from ..face.track import track_face

    detector = _detector(settings.detector)
    track = track_face([detector.detect(load(f)) for f in kept], name=source.path)
    info["faceless"] = track.n_missing
    for f, box in zip(kept, track.boxes, strict=True):
        yield crop_face(load(f), box, size=size, **MEDIAPIPE_OFFICIAL_FRAMING)


def prepare_item(source: Source, settings: PrepareSettings, root: str | os.PathLike) -> ItemResult:
    """Prepare one source into ``root/items/<id>/``; never raises (a failure is returned in the result)."""
    from ..face.track import NoFaceError

    t0 = time.perf_counter()
    root = Path(root)
    result = ItemResult(source.id, str(source.path), "ok")
    items = root / "items"
    tmp = items / f".tmp-{source.id}-{os.getpid()}"
    writers: list[FrameWriter] = []
    try:
        signature = source_signature(source.path)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        s = settings.size
        video = FrameWriter(tmp, "video", settings.video_codec, (s, s, 3), quality=settings.jpeg_quality)
        writers.append(video)
        parse = FrameWriter(tmp, "parse", settings.parse_codec, (s, s)) if settings.parse else None
        if parse is not None:
            writers.append(parse)
            parser = _parser()
            parser.reset()  # a new video: do not track the previous face into it
        info: dict[str, Any] = {}
        parse_missing = 0
        for crop in _iter_crops(source, settings, info):
            video.append(crop)
            if parse is not None:
                parse.append(parser.parse(crop))
                parse_missing += int(not parser.last_found[0])
        if video.n == 0:
            raise ValueError(f"{source.path}: no frame kept (frame_step {settings.frame_step})")
        streams = {w.name: w.close() for w in writers}
        meta = {
            "id": source.id,
            "source": str(source.path),
            "kind": source.kind,
            "group": source.group,
            "split": source.split,
            "signature": signature,
            "n_frames": video.n,
            "frame_step": settings.frame_step,
            "source_frames": info.get("source_frames", 0),
            "faceless": info.get("faceless", 0),
            "has_parse": parse is not None,
            "parse_missing": parse_missing,
            "streams": streams,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _publish(tmp, items / source.id)
        result.n_frames = video.n
    except NoFaceError as e:
        result.status, result.error = "no_face", one_line(e)
    except Exception as e:  # noqa: BLE001 - one bad source must never stop the run
        result.status, result.error = "failed", one_line(e)
        if isinstance(e, OSError) and e.filename is None:  # a failed write (e.g. a full disk) names no file itself
            result.error = f"{result.error} (writing {items})"
        if not isinstance(e, (ValueError, OSError)):
            result.error = f"{type(e).__name__}: {result.error}"
            log.debug("unexpected error on %s:\n%s", source.path, traceback.format_exc())
    finally:
        for w in writers:
            w.abort()
        shutil.rmtree(tmp, ignore_errors=True)
    result.seconds = time.perf_counter() - t0
    return result


def _work_estimate(source: Source) -> int:
    """Rough cost of a source for scheduling: its size in bytes (a frame folder: its image count x 20 KB)."""
    try:
        return len(_frame_files(source.path)) * 20_000 if source.kind == "frames" else source.path.stat().st_size
    except OSError:
        return 0


def _publish(tmp: Path, final: Path) -> None:
    """Rename a finished item folder into place, replacing an older version of it."""
    if final.exists():  # a source that changed: swap the old version out first, then delete it
        trash = final.with_name(f".trash-{final.name}-{os.getpid()}")
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)


# ---- main side -------------------------------------------------------------------------------------------------------
@dataclass
class PrepareSummary:
    """Outcome of one :func:`prepare_store` run."""

    root: Path
    results: list[ItemResult]
    seconds: float
    n_train: int = 0
    n_val: int = 0
    n_items: int = 0  # finished items in the store (all runs)
    bytes: int = 0  # size of the store's item folders
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def failed(self) -> list[ItemResult]:
        return [r for r in self.results if r.status in ("failed", "no_face")]


def _csv_text(fields: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> str:
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _check_settings(root: Path, settings: PrepareSettings) -> None:
    """Write ``store.json``, or check that the existing one was made with the same settings."""
    path = root / "store.json"
    wanted = {"version": STORE_VERSION, **asdict(settings)}
    if path.is_file():
        found = json.loads(path.read_text())
        diff = {k: (found.get(k), v) for k, v in wanted.items() if found.get(k) != v}
        if diff:
            changes = ", ".join(f"{k}: store has {a!r}, asked {b!r}" for k, (a, b) in diff.items())
            raise StoreError(f"{path}: store was built with other settings ({changes}); use another --out")
        return
    atomic_write_text(path, json.dumps(wanted, indent=1))


class _StoreLock:
    """An exclusive lock on ``root/.lock`` so that two runs never write one store at once (POSIX only)."""

    def __init__(self, root: Path) -> None:
        self.path = root / ".lock"
        self._f: Any = None

    def __enter__(self) -> _StoreLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            return self
        self._f = open(self.path, "w")  # noqa: SIM115 - closed in __exit__
        try:
            fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            self._f.close()
            raise StoreError(f"{self.path}: another `marlin prepare` is writing this store") from e
        return self

    def __exit__(self, *exc: object) -> None:
        if self._f is not None:
            self._f.close()


def _finished_meta(root: Path) -> dict[str, dict[str, Any]]:
    out = {}
    items = root / "items"
    if not items.is_dir():
        return out
    for d in sorted(items.iterdir()):
        meta = d / "meta.json"
        if d.name.startswith(".") or not meta.is_file():
            continue
        try:
            out[d.name] = json.loads(meta.read_text())
        except json.JSONDecodeError:
            log.warning("%s: unreadable, the item will be redone", meta)
    return out


def write_manifest(
    root: str | os.PathLike,
    *,
    val_fraction: float = 0.0,
    seed: int = 0,
    groups: Mapping[str, str] | None = None,
    splits: Mapping[str, str | None] | None = None,
) -> tuple[int, int]:
    """Write ``manifest.csv`` for every finished item in the store; return (train, val) item counts.

    ``groups`` / ``splits`` override what each item's ``meta.json`` says (the current run's sources win, so a new
    ``--group-regex`` re-splits a store without recomputing it).
    """
    root = Path(root)
    metas = _finished_meta(root)
    groups = dict(groups or {})
    splits = dict(splits or {})
    group_of = {i: groups.get(i, m.get("group", i)) for i, m in metas.items()}
    forced = {i: splits.get(i, m.get("split")) for i, m in metas.items()}
    free = {i: g for i, g in group_of.items() if not forced[i]}
    split = {**assign_splits(free, val_fraction, seed), **{i: s for i, s in forced.items() if s}}
    rows = [
        {
            **{k: m.get(k, "") for k in MANIFEST_FIELDS},
            "id": i,
            "split": split[i],
            "group": group_of[i],
            "has_parse": int(bool(m.get("has_parse"))),
        }
        for i, m in metas.items()
    ]
    atomic_write_text(root / "manifest.csv", _csv_text(MANIFEST_FIELDS, rows))
    n_val = sum(s == "val" for s in split.values())
    return len(rows) - n_val, n_val


def prepare_store(
    sources: Sequence[Source],
    out: str | os.PathLike,
    settings: PrepareSettings | None = None,
    *,
    workers: int = 1,
    val_fraction: float = 0.0,
    seed: int = 0,
    progress: bool = True,
    on_result: Callable[[ItemResult], None] | None = None,
) -> PrepareSummary:
    """Prepare every source into the store at ``out`` (created if needed), skipping finished ones.

    Args:
        sources: from :func:`collect_sources`.
        out: store folder.
        settings: content settings; must match the store's if it exists.
        workers: processes (0: in this process).
        val_fraction: fraction of items (whole groups) put in ``val``.
        seed: seed of the split.
        progress: show a progress bar.
        on_result: called with every item's result as it finishes.

    Returns:
        The summary; ``manifest.csv`` and ``errors.csv`` are written in ``out``.
    """
    t0 = time.perf_counter()
    settings = settings or PrepareSettings()
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    ids = [s.id for s in sources]
    if len(set(ids)) != len(ids):
        raise ValueError("prepare_store: source ids must be unique (collect_sources makes them so)")
    with _StoreLock(root):
        _check_settings(root, settings)
        results, todo = _plan(root, sources)
        try:
            _run(todo, settings, root, workers, results, progress=progress, on_result=on_result)
        finally:  # the manifest first: what was done stays listed even if the disk fills before errors.csv
            groups = {s.id: s.group for s in sources}
            splits = {s.id: s.split for s in sources}
            n_train, n_val = write_manifest(root, val_fraction=val_fraction, seed=seed, groups=groups, splits=splits)
            failed = [asdict(r) for r in results if r.status in ("failed", "no_face")]
            atomic_write_text(root / "errors.csv", _csv_text(ERROR_FIELDS, failed))
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    size = sum(f.stat().st_size for f in (root / "items").rglob("*") if f.is_file())
    return PrepareSummary(root, results, time.perf_counter() - t0, n_train, n_val, n_train + n_val, size, counts)


def _plan(root: Path, sources: Sequence[Source]) -> tuple[list[ItemResult], list[Source]]:
    """Clear what a killed run left in ``items/``; return the skipped results and the sources to do, longest first.

    A source is skipped when its finished item was made from the same content (see :func:`source_signature`).
    """
    items = root / "items"
    items.mkdir(exist_ok=True)
    for leftover in items.glob(".*-*"):  # .tmp-* / .trash-* of a killed run
        shutil.rmtree(leftover, ignore_errors=True)
    finished = _finished_meta(root)
    skipped: list[ItemResult] = []
    todo = []
    for s in sources:
        meta = finished.get(s.id)
        try:
            same = meta is not None and meta.get("signature") == source_signature(s.path)
        except OSError:
            same = False  # missing source: let the item fail with the reason
        if same:
            skipped.append(ItemResult(s.id, str(s.path), "skipped", n_frames=int(meta["n_frames"])))
        else:
            todo.append(s)
    if skipped:
        log.info("%d of %d sources already prepared, skipped", len(skipped), len(sources))
    todo.sort(key=_work_estimate, reverse=True)  # longest first: the last item finishing alone is a short one
    return skipped, todo


def _run(
    todo: Sequence[Source], settings: PrepareSettings, root: Path, workers: int, results: list[ItemResult], *,
    progress: bool, on_result: Callable[[ItemResult], None] | None,
) -> None:  # fmt: skip
    """Prepare ``todo`` in the job pool, appending each result to ``results`` as it finishes (with a progress bar).

    A worker process that dies fails the item it was preparing only (see :func:`marlin.utils.pool.run_jobs`).
    """
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), unit="video", desc="prepare", disable=not progress, dynamic_ncols=True,
               mininterval=1.0)  # fmt: skip
    n_failed = sum(r.status in ("failed", "no_face") for r in results)
    jobs = run_jobs(partial(prepare_item, settings=settings, root=root), todo, workers=workers)
    try:
        for s, r in jobs:
            if isinstance(r, WorkerDied):
                r = ItemResult(s.id, str(s.path), "failed", f"{r.message} while preparing it")
            results.append(r)
            if r.status != "ok":
                n_failed += r.status in ("failed", "no_face")
                log.warning("%s: %s", r.status, r.error if r.source in r.error else f"{r.source}: {r.error}")
            if on_result is not None:
                on_result(r)
            bar.update(1)
            bar.set_postfix(failed=n_failed, refresh=False)
    finally:
        jobs.close()  # on an error: no worker writes into the store once its lock is released
        bar.close()
        if workers <= 0:
            _close_tools()  # inline: this process built the detector / parser
