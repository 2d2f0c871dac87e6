"""Batch feature extraction for whole datasets (`marlin extract`): resumable, atomic, failure-isolated.

Workers decode / detect / crop videos into temporary uint8 window files (memory-mapped, so long videos cost disk, not
RAM) while the main process batches windows *across videos* through the encoder. Each finished video is written as
one `.npy` mirroring the input tree (write-then-rename: a kill never leaves a partial output), and `index.csv` accounts
for every input: status, windows, frames, face-less frames, seconds, error.
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
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..utils.fileio import atomic_write
from .pipeline import Timings, clip_windows, encode_windows

log = logging.getLogger("marlin")

INDEX_FIELDS = ["input", "output", "status", "windows", "frames", "faceless_frames", "seconds", "track", "error"]


# ---- outputs ------------------------------------------------------------------------------------------------------
def output_paths(inputs: Sequence[Path], out_dir: Path) -> dict[Path, Path]:
    """Map each input to `out_dir / <path relative to the inputs' common folder>.npy` (mirrors the input tree)."""
    if not inputs:
        return {}
    parents = [str(p.resolve().parent) for p in inputs]
    root = Path(os.path.commonpath(parents))
    return {p: out_dir / p.resolve().relative_to(root).with_suffix(".npy") for p in inputs}


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
class _Produced:
    """What a worker returns for one video: window files per face track, or an error."""

    path: Path
    tracks: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""
    status: str = "ok"
    seconds: float = 0.0


# ---- worker side ----------------------------------------------------------------------------------------------------
_WORKER_DETECTOR: Any = None


def _worker_init(detector: str, threads: int = 1) -> None:
    torch.set_num_threads(threads)


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
        for s in streams:
            n_planned = len(s.window_frames)
            fd, name = tempfile.mkstemp(suffix=".npy", dir=tmp_dir)
            os.close(fd)
            shape = (n_planned, clip_frames, img_size, img_size, 3)
            arr = np.lib.format.open_memmap(name, mode="w+", dtype=np.uint8, shape=shape)
            n = 0
            for n, w in enumerate(s.windows, start=1):
                arr[n - 1] = w
            arr.flush()
            del arr
            result.tracks.append(
                dict(
                    file=name,
                    n=n,
                    frames=s.n_frames,
                    faceless=s.n_faceless,
                    track=s.track,
                    timings=asdict(s.timings),
                    samples=s.samples,
                    sample_frames=s.sample_frames,
                )  # fmt: skip
            )
    except NoFaceError as e:
        result.status, result.error = "no_face", str(e)
    except (ValueError, OSError, RuntimeError) as e:  # VideoError is a ValueError
        result.status, result.error = "failed", _one_line(e)
    except Exception as e:  # noqa: BLE001 - one bad video must never stop the batch
        result.status, result.error = "failed", f"{type(e).__name__}: {_one_line(e)}"
        log.debug("unexpected error on %s:\n%s", path, traceback.format_exc())
    result.seconds = time.perf_counter() - t0
    return result


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


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
    """Extract features for every input into `out_dir`; returns per-input results (also in `out_dir/index.csv`)."""
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir / ".marlin-tmp"
    shutil.rmtree(tmp_dir, ignore_errors=True)  # leftovers of a killed run: window files...
    for stale in out_dir.rglob(".*.tmp"):  # ...and half-written outputs under their hidden temporary names
        stale.unlink(missing_ok=True)
    tmp_dir.mkdir()
    outputs = output_paths(inputs, out_dir)
    results = {p: VideoResult(str(p), str(outputs[p])) for p in inputs}
    index_path = out_dir / "index.csv"
    todo = []
    for p in inputs:
        if not opts.overwrite and _is_done(outputs[p], opts.all_faces):
            results[p].status = "skipped"
        else:
            todo.append(p)
    cfg = model.config
    total = Timings()
    bar = tqdm(total=len(todo), unit="video", desc="extract", disable=not opts.progress, dynamic_ncols=True)
    pending: deque[tuple[Path, dict[str, Any], int]] = deque()  # (video, track info, next window) awaiting encoding
    done_windows: dict[tuple[Path, int], list[torch.Tensor]] = {}
    n_windows_done = 0

    def finish_track(p: Path, info: dict[str, Any]) -> None:
        key = (p, id(info))
        feats = torch.cat(done_windows.pop(key)) if info["n"] else torch.empty(0)
        os.unlink(info["file"])
        r = results[p]
        out = _track_output(outputs[p], info["track"])
        if info["n"] == 0:
            r.status, r.error = "failed", "no complete window"
            return
        arr = _reduce(feats, opts.reduction).numpy()
        _save_npy(out, arr)
        if opts.preview_dir is not None and info["samples"]:
            from ..viz.preview import save_contact_sheet

            rel = out.relative_to(out_dir).with_suffix(".png")
            labels = [f"frame {i}" for i in info["sample_frames"]]
            save_contact_sheet(opts.preview_dir / rel, np.stack(info["samples"]), labels=labels)

    def encode_ready(flush: bool) -> None:
        """Encode full batches of pending windows (all of them when flushing)."""
        nonlocal n_windows_done
        while pending and (flush or sum(i["n"] - k for _, i, k in pending) >= opts.batch_size):
            batch, owners = [], []
            while pending and len(batch) < opts.batch_size:
                p, info, k = pending[0]
                arr = np.load(info["file"], mmap_mode="r")
                take = min(opts.batch_size - len(batch), info["n"] - k)
                batch.extend(arr[k : k + take])
                owners.append((p, info, take))
                if k + take >= info["n"]:
                    pending.popleft()
                else:
                    pending[0] = (p, info, k + take)
                del arr
            t0 = time.perf_counter()
            feats = encode_windows(model, batch, batch_size=len(batch), keep_seq=opts.keep_seq, dtype=opts.dtype)
            total.encode += time.perf_counter() - t0
            n_windows_done += len(batch)
            offset = 0
            for p, info, take in owners:
                done_windows.setdefault((p, id(info)), []).append(feats[offset : offset + take])
                offset += take
                if sum(len(f) for f in done_windows[(p, id(info))]) == info["n"]:
                    finish_track(p, info)
                    info["finished"] = True
                    _maybe_complete(p)

    track_infos: dict[Path, list[dict[str, Any]]] = {}

    def _maybe_complete(p: Path) -> None:
        infos = track_infos.get(p, [])
        if all(i.get("finished") for i in infos):
            r = results[p]
            if r.status == "pending":
                r.status = "ok"
            bar.update(1)
            bar.set_postfix(windows=n_windows_done, failed=sum(x.status in ("failed", "no_face") for x in
                                                               results.values()))  # fmt: skip
            write_index(index_path, list(results.values()))

    def accept(prod: _Produced) -> None:
        r = results[prod.path]
        r.seconds = prod.seconds
        if prod.error:
            r.status, r.error = prod.status, prod.error
            log.warning("%s", prod.error)
            bar.update(1)
            write_index(index_path, list(results.values()))
            return
        track_infos[prod.path] = prod.tracks
        r.windows = sum(t["n"] for t in prod.tracks)
        r.frames = max(t["frames"] for t in prod.tracks)
        r.faceless_frames = sum(t["faceless"] for t in prod.tracks)
        r.track = ",".join(str(t["track"]) for t in prod.tracks if t["track"] is not None)
        for t in prod.tracks:
            total.add(Timings(**{k: v for k, v in t["timings"].items() if k != "encode"}))
            done_windows[(prod.path, id(t))] = []
            if t["n"] == 0:
                finish_track(prod.path, t)
                t["finished"] = True
            else:
                pending.append((prod.path, t, 0))
        _maybe_complete(prod.path)
        encode_ready(flush=False)

    try:
        for prod in _produce_all(todo, tmp_dir, opts, cfg.clip_frames, cfg.img_size):
            accept(prod)
        encode_ready(flush=True)
    finally:
        bar.close()
        write_index(index_path, list(results.values()))
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return ExtractSummary(list(results.values()), total, time.perf_counter() - t_start, index_path)


def _reduce(feats: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return feats
    if reduction == "mean":
        return feats.mean(0)
    if reduction == "max":
        return feats.max(0).values
    raise ValueError(f"reduction must be none, mean or max, got {reduction!r}")


def _produce_all(todo: list[Path], tmp_dir: Path, opts: ExtractOptions, clip_frames: int, img_size: int
                 ) -> Iterator[_Produced]:  # fmt: skip
    """Yield produced videos in input order, keeping at most 2 x workers in flight (bounded temp disk)."""
    if opts.workers <= 0:
        for p in todo:
            yield produce(p, tmp_dir, opts, clip_frames, img_size)
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # no fork of a process holding torch / mediapipe threads
    with ProcessPoolExecutor(opts.workers, mp_context=ctx, initializer=_worker_init, initargs=(opts.detector,)) as ex:
        queue: deque[Future] = deque()
        it = iter(todo)
        for p in it:
            queue.append(ex.submit(produce, p, tmp_dir, opts, clip_frames, img_size))
            if len(queue) >= 2 * opts.workers:
                break
        while queue:
            prod = queue.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                queue.append(ex.submit(produce, nxt, tmp_dir, opts, clip_frames, img_size))
            yield prod


def write_combined(path: Path, summary: ExtractSummary, out_dir: Path) -> Path:
    """One `.npz` or `.safetensors` holding every successful output, keyed by its path relative to `out_dir`."""
    if path.suffix not in (".npz", ".safetensors"):
        raise ValueError(f"{path}: combined output must end in .npz or .safetensors")
    arrays: dict[str, np.ndarray] = {}
    for r in summary.results:
        if r.status not in ("ok", "skipped"):
            continue
        out = Path(r.output)
        files = [out] if out.is_file() else sorted(out.parent.glob(f"{glob.escape(out.stem)}.face*.npy"))
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
