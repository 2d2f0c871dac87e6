"""Batch feature extraction for whole datasets (`marlin extract`): resumable, atomic, failure-isolated, streamed.

Workers decode / detect / crop videos and hand their windows to the main process in small chunk files (plain
writes, ``CHUNK_WINDOWS`` windows each), never more than ``CHUNKS_AHEAD`` chunks ahead of the encoder: memory and
temporary disk stay flat however long a video is, and a long video is encoded while it is still being cropped. The
main process reads the chunks in input order and batches windows *across videos* through the encoder. Each finished
video is written as one `.npy` mirroring the input tree (write-then-rename: a kill never leaves a partial output),
and `index.csv` accounts for every input: status, windows, frames, face-less frames, seconds, error. A bad video,
or one whose worker process dies (:func:`marlin.utils.pool.run_jobs`), fails alone. With ``ExtractOptions.shard``
the run extracts one shard of the inputs (:mod:`marlin.video.shard`) and writes that shard's index instead.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
import queue
import re
import shutil
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..utils.errors import one_line
from ..utils.fileio import atomic_write
from ..utils.pool import WorkerDied, run_jobs
from .io import probe_video
from .pipeline import ClipStream, Timings, clip_windows, encode_windows, reduce_windows

if TYPE_CHECKING:
    from .shard import Shard

log = logging.getLogger("marlin")

OUTPUT_SEP = ";"  # between the output files of one input in index.csv (--all-faces: one per face track)
INDEX_FIELDS = ["input", "output", "status", "windows", "frames", "faceless_frames", "seconds", "track", "error",
                "face_coverage"]  # fmt: skip
CHUNK_WINDOWS = 4  # windows per chunk file a worker hands to the encoder (4 x 2.4 MB at 224 px, 16 frames)
CHUNKS_AHEAD = 4  # chunk files of a video the encoder has not read yet before its worker waits
PROGRESS_EVERY_S = 0.5  # how often a worker records its progress (and checks that it should go on)
LONG_VIDEO_S = 3.0  # a video that takes longer than this gets its own progress bar (frames decoded, ETA)
_STOP = "STOP"  # a file in the window folder: the main process stopped, workers give up their videos


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
    workers: int = 1  # processes decoding / detecting / cropping beside the model (0: a thread of this process)
    all_faces: bool = False
    resize: bool = False
    overwrite: bool = False
    detector: str = "mediapipe"
    preview_dir: Path | None = None
    progress: bool = True
    shard: Shard | None = None  # extract only this shard of the inputs (marlin.video.shard), into its own index
    face_checks: Any = None  # with crop_face: a marlin.video.faces.FaceChecks (None: its defaults)


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
    face_coverage: str = ""  # with --crop-face: mean fraction of the kept windows' frames where the face was detected


@dataclass
class _Track:
    """One stream a worker wrote: the windows of one video (or of one face track in it), as chunk files."""

    stream: int  # position among the video's streams: its chunks are <attempt>.t<stream>.c<k>.win
    n: int  # windows written
    frames: int
    faceless: int
    track: int | None  # face-track number with all_faces, else None
    timings: Timings
    samples: list[np.ndarray] = field(default_factory=list)  # a few crops, for previews
    sample_frames: list[int] = field(default_factory=list)
    coverage: list[float] = field(default_factory=list)  # with crop_face: face coverage of each window


@dataclass
class _Produced:
    """What a worker returns for one video: its tracks (their windows went to chunk files), or an error."""

    path: Path
    attempt: str = ""  # the chunk-file prefix of this try (a rerun after a worker died writes under a new one)
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


class _Stopped(RuntimeError):
    """The main process stopped (an error or Ctrl-C): this worker gives its video up."""


def _chunk_path(tmp_dir: Path, attempt: str, stream: int, chunk: int) -> Path:
    return tmp_dir / f"{attempt}.t{stream}.c{chunk:06d}.win"


_LIBC_TRIM: Any = None  # glibc's malloc_trim once looked up; False where there is none


def release_free_heap() -> None:
    """Hand the allocator's free heap pages back to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    The encoder's temporaries (windows, activations: 2-32 MB each) come from the heap once glibc's dynamic mmap
    threshold has risen, and a heap fragmented by them never shrinks: without trimming, the encoder process grew by
    ~3 MB per batch with ViT-Ti (300 batches: 306 MB -> 1.2 GB, flat at 307 MB with a trim after each batch).
    """
    global _LIBC_TRIM
    if _LIBC_TRIM is None:
        try:
            import ctypes

            _LIBC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _LIBC_TRIM = False
    if _LIBC_TRIM:
        _LIBC_TRIM(0)


_CHUNK_NAME = re.compile(r"(v(\d+)\.[0-9a-f]+)\.t(\d+)\.c(\d+)\.win")


class _Progress:
    """A worker's progress on one video, in frames decoded over both passes, written to ``v<position>.progress``
    at most every PROGRESS_EVERY_S (the main process shows it); also where a worker notices that it should stop."""

    def __init__(self, tmp_dir: Path, position: int, total: int, write: bool = True) -> None:
        self.tmp_dir, self.file, self.write = tmp_dir, tmp_dir / f"v{position:07d}.progress", write
        self.total, self.done, self.last = total, 0, time.monotonic()

    def advance(self, done: int, total: int | None = None) -> None:
        self.done, self.total = done, self.total if total is None else total
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        if (self.tmp_dir / _STOP).exists():
            raise _Stopped("extraction stopped")
        if not self.write:
            return
        tmp = self.file.with_suffix(".part")
        tmp.write_text(f"{self.done} {self.total}\n")
        os.replace(tmp, self.file)


class _ProgressDetector:
    """Counts the detector's calls as frames of pass 1 (one call per used frame: every `step`-th frame)."""

    def __init__(self, detector: Any, progress: _Progress, step: int) -> None:
        self.detector, self.progress, self.step, self.calls = detector, progress, step, 0

    def detect(self, frame: np.ndarray) -> list:
        self.calls += 1
        self.progress.advance(min(self.calls * self.step, self.progress.total // 2))
        return self.detector.detect(frame)


def produce(item: tuple[int, Path], tmp_dir: Path, opts: ExtractOptions, clip_frames: int, img_size: int) -> _Produced:
    """Decode (+ detect, crop) video ``item = (position, path)`` into chunk files; never raises (returns errors)."""
    from ..face.track import NoFaceError

    position, path = item
    t0 = time.perf_counter()
    result = _Produced(path, attempt=f"v{position:07d}.{time.time_ns():016x}{os.getpid():08x}")
    try:
        n = probe_video(path).n_frames if opts.progress else 0  # for the bar; clip_windows probes (and fails) alike
        progress = _Progress(tmp_dir, position, 2 * n if opts.crop_face else n, write=opts.progress)
        detector = None
        if opts.crop_face:
            detector = _ProgressDetector(_get_detector(opts.detector), progress, opts.sample_rate)
        streams = clip_windows(
            path,
            clip_frames=clip_frames,
            img_size=img_size,
            sample_rate=opts.sample_rate,
            stride=opts.stride,
            crop_face=opts.crop_face,
            detector=detector,
            all_faces=opts.all_faces,
            resize=opts.resize,
            checks=opts.face_checks,
        )
        base = n if opts.crop_face else 0  # pass 1 read the whole file; each stream's pass 2 reads it again
        result.tracks = []
        for k, s in enumerate(streams):
            result.tracks.append(_write_track(s, k, tmp_dir, result.attempt, progress, base + k * n))
    except NoFaceError as e:
        result.status, result.error = "no_face", str(e)
    except (ValueError, OSError, RuntimeError) as e:  # VideoError is a ValueError; _Stopped a RuntimeError
        result.status, result.error = "failed", one_line(e)
    except Exception as e:  # noqa: BLE001 - one bad video must never stop the batch
        result.status, result.error = "failed", f"{type(e).__name__}: {one_line(e)}"
        log.debug("unexpected error on %s:\n%s", path, traceback.format_exc())
    result.seconds = time.perf_counter() - t0
    return result


def _write_track(stream: ClipStream, k: int, tmp_dir: Path, attempt: str, progress: _Progress, base: int) -> _Track:
    """Hand one stream's windows to the encoder in chunk files, waiting while CHUNKS_AHEAD of them are unread."""
    chunk: list[np.ndarray] = []
    n = written = 0
    total = max(progress.total, base + stream.n_frames)
    for n, w in enumerate(stream.windows, start=1):
        chunk.append(w)
        if len(chunk) == CHUNK_WINDOWS:
            _write_chunk(tmp_dir, attempt, k, written, chunk)
            written += 1
        last = stream.window_frames[n - 1][-1] if n <= len(stream.window_frames) else 0
        progress.advance(base + last + 1, total)
    if chunk:
        _write_chunk(tmp_dir, attempt, k, written, chunk)
    return _Track(k, n, stream.n_frames, stream.n_faceless, stream.track, stream.timings, stream.samples,
                  stream.sample_frames, stream.window_coverage[:n])  # fmt: skip


def _write_chunk(tmp_dir: Path, attempt: str, stream: int, k: int, windows: list[np.ndarray]) -> None:
    """Write chunk ``k`` (plain writes, then a rename: the reader never sees half a chunk) once chunk
    ``k - CHUNKS_AHEAD`` was read (the reader deletes what it read)."""
    behind = _chunk_path(tmp_dir, attempt, stream, k - CHUNKS_AHEAD)
    while k >= CHUNKS_AHEAD and behind.exists():
        if (tmp_dir / _STOP).exists():
            raise _Stopped("extraction stopped")
        time.sleep(0.005)
    path = _chunk_path(tmp_dir, attempt, stream, k)
    tmp = path.with_suffix(".part")
    with open(tmp, "wb") as f:
        np.save(f, np.stack(windows))
    os.replace(tmp, path)
    windows.clear()
    release_free_heap()  # the frames and crops of pass 2 fragment the worker's heap the same way


# ---- main side ------------------------------------------------------------------------------------------------------
def _save_npy(path: Path, array: np.ndarray) -> None:
    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)

    atomic_write(path, save)


def index_row(r: VideoResult) -> dict[str, str]:
    """A result as the strings of its ``index.csv`` row."""
    return {k: str(v) for k, v in asdict(r).items()} | {"seconds": f"{r.seconds:.3f}"}


def write_index(path: Path, results: Sequence[VideoResult]) -> None:
    def save(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=INDEX_FIELDS)
            w.writeheader()
            for r in results:
                w.writerow(index_row(r))

    atomic_write(path, save)


def _track_output(out: Path, track: int | None) -> Path:
    return out if track is None else out.with_name(f"{out.stem}.face{track}.npy")


def _is_done(out: Path, all_faces: bool) -> bool:
    if not all_faces:
        return out.is_file()
    return any(out.parent.glob(f"{glob.escape(out.stem)}.face*.npy")) if out.parent.is_dir() else False


def _previous_rows(index_paths: Sequence[Path]) -> dict[str, dict[str, str]]:
    """The rows of earlier runs' index files by input, later files first (empty when none can be read)."""
    rows: dict[str, dict[str, str]] = {}
    for index_path in index_paths:
        try:
            with open(index_path, newline="") as f:
                rows.update({row["input"]: row for row in csv.DictReader(f) if row.get("input")})
        except (OSError, csv.Error, KeyError):
            pass
    return rows


def _skipped(result: VideoResult, before: dict[str, str] | None) -> VideoResult:
    """A finished input's row of a resumed run: status ``skipped``, with the statistics the run that made it wrote."""
    result.status = "skipped"
    if before is not None and before.get("status") in ("ok", "skipped"):
        try:
            result.windows, result.frames = int(before["windows"]), int(before["frames"])
            result.faceless_frames, result.seconds = int(before["faceless_frames"]), float(before["seconds"])
            result.track, result.face_coverage = before.get("track", ""), before.get("face_coverage") or ""
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

    Workers (:func:`produce` in :func:`marlin.utils.pool.run_jobs`) decode videos into chunk files of windows; this
    process reads them in input order and encodes them in batches that span videos, writing a video's output once
    its last window is encoded. A worker process that dies fails its video only. With ``opts.shard``, only that
    shard's inputs are extracted (outputs planned from all ``inputs``) and the index is the shard's.
    """
    t_start = time.perf_counter()
    run = _Extraction(model, inputs, out_dir, opts)
    tmp_dir = _fresh_tmp_dir(out_dir, opts.shard, run.stale_temp)
    cfg = model.config
    job = partial(produce, tmp_dir=tmp_dir, opts=opts, clip_frames=cfg.clip_frames, img_size=cfg.img_size)
    jobs = run_jobs(job, list(enumerate(run.todo)), workers=opts.workers, ordered=True)
    try:
        run.consume(jobs, tmp_dir)
    finally:
        run.close()
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return ExtractSummary(list(run.results.values()), run.total, time.perf_counter() - t_start, run.index_path)


def _fresh_tmp_dir(out_dir: Path, shard: Shard | None, stale: Any) -> Path:
    """Create `out_dir` and an empty window folder in it, removing what a killed run left behind.

    A shard has its own window folder and removes only its own half-written outputs (``stale(path)``): the other
    shards may be writing theirs into the same folder at this moment.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir / (".marlin-tmp" if shard is None else f".marlin-tmp.{shard.tag}")
    shutil.rmtree(tmp_dir, ignore_errors=True)  # leftovers of a killed run: window files...
    for leftover in out_dir.rglob(".*.tmp"):  # ...and half-written outputs under their hidden temporary names
        if shard is None or stale(leftover):
            leftover.unlink(missing_ok=True)
    tmp_dir.mkdir()
    return tmp_dir


def _died(path: Path, died: WorkerDied) -> _Produced:
    return _Produced(path, status="failed", error=f"{path}: {died.message}")


@dataclass
class _Encoding:
    """A stream of a video on its way through the encoder: windows received, their features, and (once the video's
    result is in) what its worker said about it."""

    video: Path
    track: _Track | None = None
    received: int = 0
    feats: list[torch.Tensor] = field(default_factory=list)  # per batch that held some of its windows
    dead: bool = False  # the try that wrote it died (a rerun wrote the video again) or failed: its features go

    @property
    def encoded(self) -> int:
        return sum(len(f) for f in self.feats)


@dataclass
class _Feeding:
    """The video whose chunks are read now (videos are read in input order, so batches are as without streaming)."""

    position: int
    video: Path
    attempt: str | None = None
    stream: int = 0
    chunk: int = 0  # the next chunk of `stream`
    encodings: dict[int, _Encoding] = field(default_factory=dict)  # by stream
    started: float = field(default_factory=time.monotonic)


_EMPTY = object()


class _Jobs:
    """:func:`run_jobs` iterated in a thread of its own, its results handed over through a queue.

    The main thread must go on reading a video's chunks while its worker still runs (the worker waits for it), so it
    cannot block on the job's result; waiting for results is this thread's job. ``stop`` makes the workers give up
    (the STOP file), waits for the jobs still running, and cancels the rest.
    """

    def __init__(self, jobs: Iterator[tuple[tuple[int, Path], Any]], tmp_dir: Path) -> None:
        self.jobs, self.tmp_dir = jobs, tmp_dir
        self.queue: queue.Queue[Any] = queue.Queue()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="marlin-extract-jobs", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for item, result in self.jobs:
                self.queue.put((item, result))
                if self.stopping.is_set():
                    break
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, which raises it
            self.queue.put(e)
        finally:
            self.jobs.close()  # type: ignore[attr-defined]  # a generator: cancels what has not started
            self.queue.put(None)

    def get(self, timeout: float) -> Any:
        try:
            return self.queue.get(timeout=timeout) if timeout > 0 else self.queue.get_nowait()
        except queue.Empty:
            return _EMPTY

    def stop(self) -> None:
        self.stopping.set()
        try:
            (self.tmp_dir / _STOP).touch()
        except OSError:
            pass
        self.thread.join()


class _Extraction:
    """The main side of one :func:`extract_many` run: results, the video being read, windows awaiting the encoder."""

    def __init__(self, model: Any, inputs: Sequence[Path], out_dir: Path, opts: ExtractOptions) -> None:
        from tqdm.auto import tqdm

        self.model, self.out_dir, self.opts = model, out_dir, opts
        self.outputs = output_paths(inputs, out_dir)  # planned from every input: a shard writes what one run would
        mine = list(inputs) if opts.shard is None else opts.shard.select(inputs)
        self.results = {p: VideoResult(str(p), str(self.outputs[p])) for p in mine}
        self.index_path = out_dir / "index.csv" if opts.shard is None else opts.shard.index_path(out_dir)
        before = _previous_rows(list(dict.fromkeys([out_dir / "index.csv", self.index_path])))
        self.todo: list[Path] = []  # what is not done yet (finished outputs are skipped unless overwriting)
        for p in mine:
            if not opts.overwrite and _is_done(self.outputs[p], opts.all_faces):
                self.results[p] = _skipped(self.results[p], before.get(str(p)))
            else:
                self.todo.append(p)
        self.tmp_dir = out_dir
        self.position = 0  # the video of `todo` whose windows are read now
        self.feeding: _Feeding | None = None
        self.arrived: dict[int, _Produced] = {}  # results of the workers, by position
        self.jobs_over = False
        self.windows: deque[tuple[_Encoding, np.ndarray]] = deque()  # read, not encoded yet, in input order
        self.open_tracks: dict[Path, int] = {}  # video -> its tracks not finished yet
        self.total = Timings()
        self.n_windows = self.n_failed = 0
        desc = "extract" if opts.shard is None else f"extract {opts.shard}"
        self.bar = tqdm(total=len(self.todo), unit="video", desc=desc, disable=not opts.progress,
                        dynamic_ncols=True)  # fmt: skip
        self.video_bar: Any = None
        self.progress_read = 0.0

    def stale_temp(self, leftover: Path) -> bool:
        """Whether a hidden ``.<name>.XXXX.tmp`` is a half-written file of this run's (its index or an output)."""
        target = leftover.with_name(leftover.name[1:].rsplit(".", 2)[0])
        m = re.fullmatch(r"(.*)\.face\d+\.npy", target.name) if self.opts.all_faces else None
        if m is not None:
            target = target.with_name(f"{m[1]}.npy")
        return target == self.index_path or target in {self.outputs[p] for p in self.results}

    def consume(self, jobs: Iterator[tuple[tuple[int, Path], Any]], tmp_dir: Path) -> None:
        """Read the workers' chunks in input order and encode them in batches until every video is done."""
        self.tmp_dir = tmp_dir
        if self.opts.shard is not None:  # a shard killed before its first video still says which inputs it had
            write_index(self.index_path, list(self.results.values()))
        feeder = _Jobs(jobs, tmp_dir)
        try:
            while self.position < len(self.todo) or self.windows:
                self._take(feeder, 0.0)
                if len(self.windows) >= self.opts.batch_size or (self.position == len(self.todo) and self.windows):
                    self._encode_batch()
                elif not self._feed():
                    self._take(feeder, 0.02)  # nothing to read or encode: wait for a worker
                self._show_progress()
        finally:
            feeder.stop()

    def _take(self, feeder: _Jobs, wait: float) -> None:
        """Collect the results the jobs thread handed over (waiting up to `wait` s for the first)."""
        msg = feeder.get(wait)
        while msg is not _EMPTY:
            if msg is None:
                self.jobs_over = True
            elif isinstance(msg, BaseException):
                raise msg
            else:
                (position, path), prod = msg
                self.arrived[position] = prod if isinstance(prod, _Produced) else _died(path, prod)
            msg = feeder.get(0.0)

    def _feed(self) -> bool:
        """Read the next chunk of the current video, or close its reading once its result is in; False: wait."""
        if self.position >= len(self.todo):
            return False
        if self.feeding is None:
            self.feeding = _Feeding(self.position, self.todo[self.position])
        f = self.feeding
        arrived = f.position in self.arrived or self.jobs_over  # before looking: a result means all chunks are there
        chunk = self._next_chunk(f)
        if chunk is not None:
            self._read_chunk(f, *chunk)
            return True
        if not arrived:
            return False
        no_result = _Produced(f.video, status="failed", error=f"{f.video}: its worker returned no result")
        self._fed(f, self.arrived.pop(f.position, no_result))
        (self.tmp_dir / f"v{f.position:07d}.progress").unlink(missing_ok=True)  # the folder stays small
        self.feeding, self.position = None, self.position + 1
        if self.video_bar is not None:
            self.video_bar.close()
            self.video_bar = None
        return True

    def _next_chunk(self, f: _Feeding) -> tuple[str, int, int] | None:
        """(attempt, stream, chunk) of the next chunk file of the video being read, if it is there yet.

        The files present are the ones not read yet (reading deletes them) and a worker writes them in order, so the
        next one is the first present; files of a newer try (its worker died and the video is run again) replace
        those of the older one.
        """
        if f.attempt is not None and _chunk_path(self.tmp_dir, f.attempt, f.stream, f.chunk).exists():
            return f.attempt, f.stream, f.chunk
        present = [m for m in (_CHUNK_NAME.fullmatch(e.name) for e in os.scandir(self.tmp_dir))
                   if m is not None and int(m[2]) == f.position]  # fmt: skip
        if not present:
            return None
        newest = max(m[1] for m in present)
        if newest != f.attempt:
            self._drop(f, keep=newest)
            f.attempt, f.stream, f.chunk = newest, 0, 0
        stream, chunk = min((int(m[3]), int(m[4])) for m in present if m[1] == newest)
        return newest, stream, chunk

    def _read_chunk(self, f: _Feeding, attempt: str, stream: int, chunk: int) -> None:
        path = _chunk_path(self.tmp_dir, attempt, stream, chunk)
        windows = np.load(path)
        path.unlink()  # room for the worker's next chunk
        enc = f.encodings.setdefault(stream, _Encoding(f.video))
        self.windows.extend((enc, w) for w in windows)
        enc.received += len(windows)
        f.stream, f.chunk = stream, chunk + 1

    def _drop(self, f: _Feeding, keep: str | None = None) -> None:
        """Forget what was read of the video being read (a failed or superseded try): its windows, features and the
        chunk files of its other tries."""
        for enc in f.encodings.values():
            enc.dead = True
        f.encodings = {}
        self.windows = deque((e, w) for e, w in self.windows if not e.dead)
        for entry in os.scandir(self.tmp_dir):
            m = _CHUNK_NAME.fullmatch(entry.name)
            if m is not None and int(m[2]) == f.position and m[1] != keep:
                Path(entry.path).unlink(missing_ok=True)

    def _fed(self, f: _Feeding, prod: _Produced) -> None:
        """All windows of a video are read: record it, and write its tracks whose windows are all encoded."""
        r = self.results[f.video]
        r.seconds = prod.seconds
        if not prod.error and prod.attempt != f.attempt:
            self._drop(f, keep=prod.attempt)  # an older try's windows were read; this one wrote none
        lost = [t for t in prod.tracks if t.n != f.encodings.get(t.stream, _Encoding(f.video)).received]
        if prod.error or not prod.tracks or lost:
            self._drop(f)
            if prod.error:
                r.status, r.error = prod.status, prod.error
            else:
                r.status, r.error = "failed", f"{f.video}: windows lost on the way to the encoder" if lost else (
                    "no complete window")  # fmt: skip
            log.warning("%s", r.error)
            self.complete(f.video)
            return
        r.windows = sum(t.n for t in prod.tracks)
        r.frames = max(t.frames for t in prod.tracks)
        r.faceless_frames = sum(t.faceless for t in prod.tracks)
        r.track = ",".join(str(t.track) for t in prod.tracks if t.track is not None)
        coverage = [c for t in prod.tracks for c in t.coverage]
        r.face_coverage = f"{np.mean(coverage):.3f}" if coverage else ""
        if self.opts.all_faces:  # the files really written: one per face track
            r.output = OUTPUT_SEP.join(str(_track_output(self.outputs[f.video], t.track)) for t in prod.tracks)
        self.open_tracks[f.video] = len(prod.tracks)
        for t in prod.tracks:
            self.total.add(replace(t.timings, encode=0.0))  # encoding is timed here
            enc = f.encodings.setdefault(t.stream, _Encoding(f.video))
            enc.track = t
            if enc.encoded == t.n:  # every window encoded already (or none: fails)
                self.finish_track(enc)

    def _encode_batch(self) -> None:
        """Encode up to `batch_size` windows, oldest first (a batch may span videos)."""
        batch: list[np.ndarray] = []
        owners: list[_Encoding] = []
        while self.windows and len(batch) < self.opts.batch_size:
            enc, w = self.windows.popleft()
            batch.append(w)
            owners.append(enc)
        t0 = time.perf_counter()
        opts = self.opts
        feats = encode_windows(self.model, batch, batch_size=len(batch), keep_seq=opts.keep_seq, dtype=opts.dtype)
        self.total.encode += time.perf_counter() - t0
        self.n_windows += len(batch)
        del batch
        release_free_heap()  # or a long run's encoder process keeps growing (see release_free_heap)
        start = 0
        for end in [i for i in range(1, len(owners)) if owners[i] is not owners[i - 1]] + [len(owners)]:
            enc = owners[start]  # the windows of one stream are consecutive
            enc.feats.append(feats[start:end])
            start = end
            if not enc.dead and enc.track is not None and enc.encoded == enc.track.n:
                self.finish_track(enc)

    def finish_track(self, enc: _Encoding) -> None:
        """Write a fully encoded track (atomically) and its preview; complete the video after its last track."""
        track, video = enc.track, enc.video
        assert track is not None
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
        enc.feats = []
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

    def _show_progress(self) -> None:
        """The progress bar of a long video (frames decoded over both passes, with an ETA), from its worker's file."""
        f = self.feeding
        now = time.monotonic()
        if (
            f is None
            or self.bar.disable
            or now - f.started < LONG_VIDEO_S
            or now - self.progress_read < PROGRESS_EVERY_S
        ):
            return
        self.progress_read = now
        try:
            done, total = (int(v) for v in (self.tmp_dir / f"v{f.position:07d}.progress").read_text().split())
        except (OSError, ValueError):
            return
        if self.video_bar is None:
            from tqdm.auto import tqdm

            self.video_bar = tqdm(total=total, unit="frame", desc=f.video.name, position=1, leave=False,
                                  dynamic_ncols=True, mininterval=1.0)  # fmt: skip
        self.video_bar.total = total
        self.video_bar.update(max(done - self.video_bar.n, 0))

    def complete(self, video: Path) -> None:
        """A video is done (written or failed): count it and rewrite the index."""
        r = self.results[video]
        if r.status == "pending":
            r.status = "ok"
        self.n_failed += r.status in ("failed", "no_face")
        self.bar.update(1)
        self.bar.set_postfix(windows=self.n_windows, failed=self.n_failed)
        write_index(self.index_path, list(self.results.values()))

    def close(self) -> None:
        if self.video_bar is not None:
            self.video_bar.close()
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
