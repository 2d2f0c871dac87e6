"""Batch feature extraction for whole datasets (`marlin extract`): resumable, atomic, failure-isolated.

Workers decode / detect / crop videos into temporary uint8 window files (memory-mapped, so long videos cost disk, not
RAM) while the main process batches windows *across videos* through the encoder. Each finished video is written as
one `.npy` mirroring the input tree (write-then-rename: a kill never leaves a partial output), and `index.csv` accounts
for every input: status, windows, frames, face-less frames, seconds, error. A bad video, or one whose worker process
dies (:func:`marlin.utils.pool.run_jobs`), fails alone.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
import shutil
import tempfile
import time
import traceback
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..utils.errors import one_line
from ..utils.fileio import atomic_write
from ..utils.pool import WorkerDied, run_jobs
from .pipeline import ClipStream, Timings, clip_windows, encode_windows, reduce_windows

log = logging.getLogger("marlin")

OUTPUT_SEP = ";"  # between the output files of one input in index.csv (--all-faces: one per face track)
INDEX_FIELDS = ["input", "output", "status", "windows", "frames", "faceless_frames", "seconds", "track", "error"]


# ---- outputs ------------------------------------------------------------------------------------------------------
def output_paths(inputs: Sequence[Path], out_dir: Path) -> dict[Path, Path]:
    """Map each input to `out_dir / <path relative to the inputs' common folder>.npy` (mirrors the input tree).

    Inputs of one folder that share a stem (``clip.avi`` and ``clip.mp4``) keep their extension instead, so no two
    inputs ever write one output: ``clip.avi.npy`` and ``clip.mp4.npy``.
    """
    if not inputs:
        return {}
    parents = [str(p.resolve().parent) for p in inputs]
    root = Path(os.path.commonpath(parents))
    rel = {p: p.resolve().relative_to(root) for p in inputs}
    stems: dict[Path, int] = {}
    for r in rel.values():
        stems[r.with_suffix("")] = stems.get(r.with_suffix(""), 0) + 1
    return {
        p: out_dir / (r.with_name(r.name + ".npy") if stems[r.with_suffix("")] > 1 else r.with_suffix(".npy"))
        for p, r in rel.items()
    }


# ---- options and results --------------------------------------------------------------------------------------------
@dataclass
class ExtractOptions:
    crop_face: bool = False
    sample_rate: int = 2
    stride: int = 16
    reduction: str = "none"  # over windows: none / mean / max
    keep_seq: bool = False  # keep the 1568 tokens per window instead of the pooled clip feature
    batch_size: int = 8  # windows per encoder call, across videos
    dtype: str = "fp32"
    workers: int = 1  # processes decoding / detecting / cropping beside the model (0: inline)
    all_faces: bool = False
    resize: bool = False
    overwrite: bool = False
    detector: str = "mediapipe"
    preview_dir: Path | None = None
    progress: bool = True


@dataclass
class VideoResult:
    input: str
    output: str = ""
    status: str = "pending"  # ok, skipped, failed, no_face
    windows: int = 0
    frames: int = 0
    faceless_frames: int = 0
    seconds: float = 0.0
    track: str = ""
    error: str = ""


@dataclass
class _Track:
    """One window file a worker wrote: the complete windows of one video (or of one face track in it)."""

    file: str  # uint8 [n_planned, T, S, S, 3] .npy in the temporary folder; the first `n` windows are complete
    n: int
    frames: int
    faceless: int
    track: int | None  # face-track number with all_faces, else None
    timings: Timings
    samples: list[np.ndarray] = field(default_factory=list)  # a few crops, for previews
    sample_frames: list[int] = field(default_factory=list)


@dataclass
class _Produced:
    """What a worker returns for one video: its tracks, or an error."""

    path: Path
    tracks: list[_Track] = field(default_factory=list)
    error: str = ""
    status: str = "ok"
    seconds: float = 0.0


# ---- worker side ----------------------------------------------------------------------------------------------------
_WORKER_DETECTOR: Any = None


def _get_detector(name: str) -> Any:
    global _WORKER_DETECTOR
    if _WORKER_DETECTOR is None:
        from ..face.detect import create_detector

        _WORKER_DETECTOR = create_detector(name)
    return _WORKER_DETECTOR


def produce(path: Path, tmp_dir: Path, opts: ExtractOptions, clip_frames: int, img_size: int) -> _Produced:
    """Decode (+ detect, crop) one video into uint8 window files; never raises (errors are returned)."""
    from ..face.track import NoFaceError

    t0 = time.perf_counter()
    result = _Produced(path)
    try:
        streams = clip_windows(
            path,
            clip_frames=clip_frames,
            img_size=img_size,
            sample_rate=opts.sample_rate,
            stride=opts.stride,
            crop_face=opts.crop_face,
            detector=_get_detector(opts.detector) if opts.crop_face else None,
            all_faces=opts.all_faces,
            resize=opts.resize,
        )
        result.tracks = [_write_track(s, tmp_dir, clip_frames, img_size) for s in streams]
    except NoFaceError as e:
        result.status, result.error = "no_face", str(e)
    except (ValueError, OSError, RuntimeError) as e:  # VideoError is a ValueError
        result.status, result.error = "failed", one_line(e)
    except Exception as e:  # noqa: BLE001 - one bad video must never stop the batch
        result.status, result.error = "failed", f"{type(e).__name__}: {one_line(e)}"
        log.debug("unexpected error on %s:\n%s", path, traceback.format_exc())
    result.seconds = time.perf_counter() - t0
    return result


def _write_track(stream: ClipStream, tmp_dir: Path, clip_frames: int, img_size: int) -> _Track:
    """Decode one stream's windows into a memory-mapped uint8 file (long videos cost disk, not RAM)."""
    fd, name = tempfile.mkstemp(suffix=".npy", dir=tmp_dir)
    os.close(fd)
    shape = (len(stream.window_frames), clip_frames, img_size, img_size, 3)
    arr = np.lib.format.open_memmap(name, mode="w+", dtype=np.uint8, shape=shape)
    n = 0
    for n, w in enumerate(stream.windows, start=1):
        arr[n - 1] = w
    arr.flush()
    del arr
    return _Track(name, n, stream.n_frames, stream.n_faceless, stream.track, stream.timings, stream.samples,
                  stream.sample_frames)  # fmt: skip


# ---- main side ------------------------------------------------------------------------------------------------------
def _save_npy(path: Path, array: np.ndarray) -> None:
    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, save)


def write_index(path: Path, results: Sequence[VideoResult]) -> None:
    def save(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=INDEX_FIELDS)
            w.writeheader()
            for r in results:
                w.writerow({**asdict(r), "seconds": f"{r.seconds:.3f}"})

    atomic_write(path, save)


def _track_output(out: Path, track: int | None) -> Path:
    return out if track is None else out.with_name(f"{out.stem}.face{track}.npy")


def _is_done(out: Path, all_faces: bool) -> bool:
    if not all_faces:
        return out.is_file()
    return any(out.parent.glob(f"{glob.escape(out.stem)}.face*.npy")) if out.parent.is_dir() else False


def _previous_rows(index_path: Path) -> dict[str, dict[str, str]]:
    """The rows of an earlier run's ``index.csv`` by input (empty when there is none or it cannot be read)."""
    try:
        with open(index_path, newline="") as f:
            return {row["input"]: row for row in csv.DictReader(f) if row.get("input")}
    except (OSError, csv.Error, KeyError):
        return {}


def _skipped(result: VideoResult, before: dict[str, str] | None) -> VideoResult:
    """A finished input's row of a resumed run: status ``skipped``, with the statistics the run that made it wrote."""
    result.status = "skipped"
    if before is not None and before.get("status") in ("ok", "skipped"):
        try:
            result.windows, result.frames = int(before["windows"]), int(before["frames"])
            result.faceless_frames, result.seconds = int(before["faceless_frames"]), float(before["seconds"])
            result.track = before.get("track", "")
        except (KeyError, ValueError):
            pass  # an index from another version: the row stays without statistics
    return result


@dataclass
class ExtractSummary:
    results: list[VideoResult]
    timings: Timings
    seconds: float
    index_path: Path

    @property
    def failed(self) -> list[VideoResult]:
        return [r for r in self.results if r.status in ("failed", "no_face")]

    def counts(self) -> dict[str, int]:
        c: dict[str, int] = {}
        for r in self.results:
            c[r.status] = c.get(r.status, 0) + 1
        return c


def extract_many(model: Any, inputs: Sequence[Path], out_dir: Path, opts: ExtractOptions) -> ExtractSummary:
    """Extract features for every input into `out_dir`; returns per-input results (also in `out_dir/index.csv`).

    Workers (:func:`produce` in :func:`marlin.utils.pool.run_jobs`, in input order) decode videos into window files;
    this process encodes their windows in batches that span videos and writes a video's output once its last window
    is encoded. A worker process that dies fails its video only.
    """
    t_start = time.perf_counter()
    tmp_dir = _fresh_tmp_dir(out_dir)
    run = _Extraction(model, inputs, out_dir, opts)
    cfg = model.config
    job = partial(produce, tmp_dir=tmp_dir, opts=opts, clip_frames=cfg.clip_frames, img_size=cfg.img_size)
    jobs = run_jobs(job, run.todo, workers=opts.workers, ordered=True)
    try:
        for path, prod in jobs:
            run.accept(prod if isinstance(prod, _Produced) else _died(path, prod))
        run.encode_ready(flush=True)
    finally:
        jobs.close()  # on an error: no worker writes into tmp_dir any more
        run.close()
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return ExtractSummary(list(run.results.values()), run.total, time.perf_counter() - t_start, run.index_path)


def _fresh_tmp_dir(out_dir: Path) -> Path:
    """Create `out_dir` and an empty window folder in it, removing what a killed run left behind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir / ".marlin-tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)  # leftovers of a killed run: window files...
    for stale in out_dir.rglob(".*.tmp"):  # ...and half-written outputs under their hidden temporary names
        stale.unlink(missing_ok=True)
    tmp_dir.mkdir()
    return tmp_dir


def _died(path: Path, died: WorkerDied) -> _Produced:
    return _Produced(path, status="failed", error=f"{path}: {died.message}")


@dataclass
class _Encoding:
    """A produced track on its way through the encoder: how many of its windows are batched, and their features."""

    video: Path
    track: _Track
    next: int = 0  # first window not yet put in a batch
    feats: list[torch.Tensor] = field(default_factory=list)  # per batch that held some of its windows

    @property
    def encoded(self) -> int:
        return sum(len(f) for f in self.feats)


class _Extraction:
    """The main side of one :func:`extract_many` run: results, windows awaiting the encoder, open tracks per video."""

    def __init__(self, model: Any, inputs: Sequence[Path], out_dir: Path, opts: ExtractOptions) -> None:
        from tqdm.auto import tqdm

        self.model, self.out_dir, self.opts = model, out_dir, opts
        self.outputs = output_paths(inputs, out_dir)
        self.results = {p: VideoResult(str(p), str(self.outputs[p])) for p in inputs}
        self.index_path = out_dir / "index.csv"
        self.todo: list[Path] = []  # what is not done yet (finished outputs are skipped unless overwriting)
        before = _previous_rows(self.index_path)
        for p in inputs:
            if not opts.overwrite and _is_done(self.outputs[p], opts.all_faces):
                self.results[p] = _skipped(self.results[p], before.get(str(p)))
            else:
                self.todo.append(p)
        self.pending: deque[_Encoding] = deque()  # tracks with windows not yet batched, in arrival order
        self.open_tracks: dict[Path, int] = {}  # video -> its tracks not finished yet
        self.total = Timings()
        self.n_windows = self.n_failed = 0
        self.bar = tqdm(total=len(self.todo), unit="video", desc="extract", disable=not opts.progress,
                        dynamic_ncols=True)  # fmt: skip

    def accept(self, prod: _Produced) -> None:
        """Take one produced video: record it, queue its windows, encode whatever fills a batch."""
        r = self.results[prod.path]
        r.seconds = prod.seconds
        if prod.error or not prod.tracks:
            r.status, r.error = (prod.status, prod.error) if prod.error else ("failed", "no complete window")
            log.warning("%s", r.error)
            self.complete(prod.path)
            return
        r.windows = sum(t.n for t in prod.tracks)
        r.frames = max(t.frames for t in prod.tracks)
        r.faceless_frames = sum(t.faceless for t in prod.tracks)
        r.track = ",".join(str(t.track) for t in prod.tracks if t.track is not None)
        if self.opts.all_faces:  # the files really written: one per face track
            r.output = OUTPUT_SEP.join(str(_track_output(self.outputs[prod.path], t.track)) for t in prod.tracks)
        self.open_tracks[prod.path] = len(prod.tracks)
        for t in prod.tracks:
            self.total.add(replace(t.timings, encode=0.0))  # encoding is timed here
            if t.n:
                self.pending.append(_Encoding(prod.path, t))
            else:
                self.finish_track(_Encoding(prod.path, t))
        self.encode_ready(flush=False)

    def encode_ready(self, flush: bool) -> None:
        """Encode full batches of pending windows (all of them when flushing)."""
        while self.pending and (flush or sum(e.track.n - e.next for e in self.pending) >= self.opts.batch_size):
            self._encode_batch()

    def _encode_batch(self) -> None:
        """Encode up to `batch_size` windows from the oldest pending tracks (a batch may span videos)."""
        batch: list[np.ndarray] = []
        owners: list[tuple[_Encoding, int]] = []  # (track, how many of the batch's windows are its)
        while self.pending and len(batch) < self.opts.batch_size:
            enc = self.pending[0]
            take = min(self.opts.batch_size - len(batch), enc.track.n - enc.next)
            windows = np.load(enc.track.file, mmap_mode="r")
            batch.extend(windows[enc.next : enc.next + take])
            del windows
            owners.append((enc, take))
            enc.next += take
            if enc.next >= enc.track.n:
                self.pending.popleft()
        t0 = time.perf_counter()
        opts = self.opts
        feats = encode_windows(self.model, batch, batch_size=len(batch), keep_seq=opts.keep_seq, dtype=opts.dtype)
        self.total.encode += time.perf_counter() - t0
        self.n_windows += len(batch)
        offset = 0
        for enc, take in owners:
            enc.feats.append(feats[offset : offset + take])
            offset += take
            if enc.encoded == enc.track.n:
                self.finish_track(enc)

    def finish_track(self, enc: _Encoding) -> None:
        """Write a fully encoded track (atomically) and its preview; complete the video after its last track."""
        track, video = enc.track, enc.video
        os.unlink(track.file)
        if track.n == 0:
            r = self.results[video]
            r.status, r.error = "failed", "no complete window"
        elif not all(bool(torch.isfinite(f).all()) for f in enc.feats):
            r = self.results[video]  # garbage must never be marked ok: the weights or the precision are broken
            r.status, r.error = "failed", f"{video}: the encoder gave NaN / inf features (check weights and --dtype)"
        else:
            out = _track_output(self.outputs[video], track.track)
            _save_npy(out, reduce_windows(torch.cat(enc.feats), self.opts.reduction).numpy())
            self._save_preview(out, track)
        self.open_tracks[video] -= 1
        if self.open_tracks[video] == 0:
            del self.open_tracks[video]
            self.complete(video)

    def _save_preview(self, out: Path, track: _Track) -> None:
        if self.opts.preview_dir is None or not track.samples:
            return
        from ..viz.preview import save_contact_sheet

        rel = out.relative_to(self.out_dir).with_suffix(".png")
        labels = [f"frame {i}" for i in track.sample_frames]
        save_contact_sheet(self.opts.preview_dir / rel, np.stack(track.samples), labels=labels)

    def complete(self, video: Path) -> None:
        """A video is done (written or failed): count it and rewrite `index.csv`."""
        r = self.results[video]
        if r.status == "pending":
            r.status = "ok"
        self.n_failed += r.status in ("failed", "no_face")
        self.bar.update(1)
        self.bar.set_postfix(windows=self.n_windows, failed=self.n_failed)
        write_index(self.index_path, list(self.results.values()))

    def close(self) -> None:
        self.bar.close()
        write_index(self.index_path, list(self.results.values()))


def write_combined(path: Path, summary: ExtractSummary, out_dir: Path) -> Path:
    """One `.npz` or `.safetensors` holding every successful output, keyed by its path relative to `out_dir`."""
    if path.suffix not in (".npz", ".safetensors"):
        raise ValueError(f"{path}: combined output must end in .npz or .safetensors")
    arrays: dict[str, np.ndarray] = {}
    for r in summary.results:
        if r.status not in ("ok", "skipped"):
            continue
        files = [Path(f) for f in r.output.split(OUTPUT_SEP)]
        if not all(f.is_file() for f in files):  # a skipped --all-faces input: its row names the planned output
            files = sorted(files[0].parent.glob(f"{glob.escape(files[0].stem)}.face*.npy"))
        for f in files:
            arrays[str(f.relative_to(out_dir).with_suffix(""))] = np.load(f)
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        atomic_write(path, lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, tmp))
    else:

        def save(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        atomic_write(path, save)
    return path
