"""Video in, features out: decode -> (detect -> track -> crop) -> 16-frame windows -> encoder.

`clip_windows` streams the windows of one video (one stream per face track) at flat memory; `encode_windows` runs the
encoder over them in batches; `extract_video` ties both together for `Marlin.extract_video`. The batch CLI
(`marlin extract`) reuses the same two halves, running `clip_windows` in worker processes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..utils.precision import autocast
from .io import VideoError, iter_frames, probe_video
from .windows import iter_windows, window_indices

REDUCTIONS = ("none", "mean", "max")


@dataclass
class Timings:
    """Seconds spent per stage (decode includes colour conversion; detect and crop are timed around their calls)."""

    decode: float = 0.0
    detect: float = 0.0
    crop: float = 0.0
    encode: float = 0.0

    def add(self, other: Timings) -> None:
        for k in ("decode", "detect", "crop", "encode"):
            setattr(self, k, getattr(self, k) + getattr(other, k))


@dataclass
class ClipStream:
    """The windows of one video (or of one face track in it) and what is known about them."""

    path: Path
    windows: Iterator[np.ndarray]  # each uint8 [T, S, S, 3]
    n_frames: int  # frames that decoded (with crop_face; without it once the windows are consumed, before: declared)
    window_frames: list[list[int]]  # frame indices of every window
    track: int | None = None  # face-track number with all_faces, else None
    n_faceless: int = 0  # used frames without a detected face (their box came from the nearest detection)
    timings: Timings = field(default_factory=Timings)
    samples: list[np.ndarray] = field(default_factory=list)  # a few crops spread over the video, for previews
    sample_frames: list[int] = field(default_factory=list)  # their frame indices
    window_coverage: list[float] = field(default_factory=list)  # with crop_face: face-detected fraction per window


class _TimedDetector:
    """Wraps a detector to add the time of its calls to a Timings."""

    def __init__(self, detector: Any, timings: Timings) -> None:
        self.detector, self.timings = detector, timings

    def detect(self, frame: np.ndarray) -> list:
        t0 = time.perf_counter()
        try:
            return self.detector.detect(frame)
        finally:
            self.timings.detect += time.perf_counter() - t0


def clip_windows(
    path: str | os.PathLike,
    *,
    clip_frames: int = 16,
    img_size: int = 224,
    sample_rate: int = 2,
    stride: int = 16,
    crop_face: bool = False,
    detector: Any = None,
    all_faces: bool = False,
    resize: bool = False,
    max_samples: int = 16,
    checks: Any = None,
) -> list[ClipStream]:
    """Plan the windows of a video; each returned stream decodes lazily when iterated.

    Without `crop_face` the frames must already be `img_size` square face crops (or pass `resize=True` to squash
    them). With `crop_face`, faces are detected on every frame a window uses, confirmed and tracked inside each shot
    (`checks`: a :class:`marlin.video.faces.FaceChecks`), and cropped; windows where the face covers less than
    ``checks.min_face_fraction`` of the frames are dropped, and a video left without any window raises
    `marlin.face.NoFaceError`. `all_faces` gives one stream per confirmed face track.
    """
    path = Path(path)
    if not crop_face:
        info = probe_video(path)
        if (info.width, info.height) != (img_size, img_size) and not resize:
            raise VideoError(
                f"{path}: frames are {info.width}x{info.height}, expected {img_size}x{img_size} face crops; "
                f"use crop_face=True (--crop-face) for uncropped video, or resize=True to squash the frames"
            )
        timings = Timings()
        frames = _Counted(_timed(iter_frames(path, size=img_size if resize else None), timings, "decode"))
        windows = window_indices(info.n_frames, clip_frames, sample_rate, stride)
        stream = ClipStream(path, iter([]), info.n_frames, windows, timings=timings)
        planned = iter_windows(frames, info.n_frames, clip_frames, sample_rate, stride)
        stream.windows = _sampled(_then_count(planned, frames, stream), stream, max_samples)
        return [stream]

    return _face_streams(path, clip_frames, img_size, sample_rate, stride, detector, all_faces, checks, max_samples)


def _face_streams(
    path: Path,
    clip_frames: int,
    img_size: int,
    sample_rate: int,
    stride: int,
    detector: Any,
    all_faces: bool,
    checks: Any,
    max_samples: int,
) -> list[ClipStream]:
    """The ``crop_face`` half of :func:`clip_windows`: confirmed face tracks -> windows with enough face in them."""
    from ..face.detect import create_detector
    from ..face.track import NoFaceError
    from .faces import FaceChecks, plan_face_crops

    checks = checks or FaceChecks()
    timings = Timings()
    own = detector is None or isinstance(detector, str)
    det = create_detector(detector or "mediapipe") if own else detector
    try:
        # detect on the frames any window could use: every sample_rate-th frame of a shot, or all of a short video
        dense = probe_video(path).n_frames <= clip_frames * sample_rate + 1
        t0 = time.perf_counter()
        plans = plan_face_crops(path, _TimedDetector(det, timings), every=1 if dense else sample_rate,
                                all_faces=all_faces, checks=checks)  # fmt: skip
        timings.decode += time.perf_counter() - t0 - timings.detect
    finally:
        if own:
            det.close()
    streams, best = [], 0.0
    for plan in plans:
        windows, coverage = face_windows(plan, clip_frames, sample_rate, stride, whole_shots=not all_faces)
        best = max([best, *coverage])
        kept = [k for k, c in enumerate(coverage) if c >= checks.min_face_fraction]
        if not kept:
            continue
        windows = [windows[k] for k in kept]
        s = ClipStream(path, iter([]), plan.n_frames, windows, len(streams) if all_faces else None,
                       _faceless(plan, windows), timings if not streams else Timings(),
                       window_coverage=[coverage[k] for k in kept])  # fmt: skip
        s.windows = _sampled(_crop_windows(plan, windows, img_size, s.timings), s, max_samples)
        streams.append(s)
    if not streams:
        raise NoFaceError(
            f"{path}: a face was found, but no window of {clip_frames} frames has it in at least "
            f"{checks.min_face_fraction:.0%} of its frames (best {best:.0%}); lower --min-face-fraction to keep them"
        )
    return streams


def face_windows(
    plan: Any, clip_frames: int, sample_rate: int, stride: int, whole_shots: bool = True
) -> tuple[list[list[int]], list[float]]:
    """Windows of a face plan and the fraction of each window's examined frames where the face was detected.

    ``whole_shots``: windows tile every shot that has the face (the main face); else they tile the plan's own span
    (one face track). No window crosses a shot cut; in a video of several shots, a shot shorter than ``clip_frames``
    gives no window (a window is never padded with another scene's frames).
    """
    from .shots import shot_spans

    frames = plan.frames  # [K] ascending
    shots = shot_spans(plan.n_frames, list(plan.cuts))
    if whole_shots:
        spans = [(lo, hi) for lo, hi in shots if np.searchsorted(frames, lo) < np.searchsorted(frames, hi)]
    else:
        spans = [(int(frames[0]), int(frames[-1]) + 1)]
    windows, coverage = [], []
    for lo, hi in spans:
        if len(shots) > 1 and hi - lo < clip_frames:
            continue
        for w in window_indices(hi - lo, clip_frames, sample_rate, stride):
            w = [lo + i for i in w]
            windows.append(w)
            coverage.append(_coverage(plan, w))
    return windows, coverage


def _coverage(plan: Any, window: list[int]) -> float:
    """Fraction of the window's distinct frames that pass 1 examined where the face was detected (0 if none)."""
    wanted = np.unique(np.asarray(window, dtype=np.int64))
    pos = np.searchsorted(plan.frames, wanted)
    hit = (pos < len(plan.frames)) & (plan.frames[np.minimum(pos, len(plan.frames) - 1)] == wanted)
    return float(plan.track.detected[pos[hit]].mean()) if hit.any() else 0.0


def _faceless(plan: Any, windows: list[list[int]]) -> int:
    """Distinct examined frames of the windows where no face was detected (their box came from a neighbour)."""
    used = np.unique(np.asarray(windows, dtype=np.int64))
    pos = np.searchsorted(plan.frames, used)
    hit = (pos < len(plan.frames)) & (plan.frames[np.minimum(pos, len(plan.frames) - 1)] == used)
    return int((~plan.track.detected[pos[hit]]).sum())


class _Counted:
    """An iterator of frames that counts what it handed out (the frames that really decoded)."""

    def __init__(self, frames: Iterable[np.ndarray]) -> None:
        self.frames, self.n = iter(frames), 0

    def __iter__(self) -> Iterator[np.ndarray]:
        return self

    def __next__(self) -> np.ndarray:
        frame = next(self.frames)
        self.n += 1
        return frame


def _then_count(windows: Iterator[np.ndarray], frames: _Counted, stream: ClipStream) -> Iterator[np.ndarray]:
    """Pass the windows through, then decode the few frames after the last one, so that ``stream.n_frames`` is the
    number of frames that decoded rather than the count the container declares (truncated and damaged files)."""
    yield from windows
    for _ in frames:
        pass
    stream.n_frames = frames.n


def _timed(it: Iterable[np.ndarray], timings: Timings, stage: str) -> Iterator[np.ndarray]:
    it = iter(it)
    while True:
        t0 = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        finally:
            setattr(timings, stage, getattr(timings, stage) + time.perf_counter() - t0)
        yield item


def _sampled(windows: Iterator[np.ndarray], stream: ClipStream, max_samples: int) -> Iterator[np.ndarray]:
    """Pass windows through, keeping about `max_samples` frames spread over the video for previews."""
    n = max(len(stream.window_frames), 1)
    every = -(-n // max_samples)  # sample from every `every`-th window...
    per_window = max(1, min(max_samples // n, 4))  # ...and this many frames of it, evenly spaced
    for k, w in enumerate(windows):
        if k % every == 0 and len(stream.samples) < max_samples:
            for j in np.linspace(0, len(w) - 1, per_window).round().astype(int):
                stream.samples.append(w[j].copy())
                stream.sample_frames.append(stream.window_frames[k][j] if k < len(stream.window_frames) else -1)
        yield w


def _crop_windows(plan: Any, windows: list[list[int]], size: int, timings: Timings) -> Iterator[np.ndarray]:
    """Pass 2 over the file: crop the frames the windows use and assemble the windows in order, at flat memory."""
    from ..face.crop import crop_face

    wanted = {i for w in windows for i in w}
    last = max(wanted)
    crops: dict[int, np.ndarray] = {}
    next_w = 0
    t_dec = time.perf_counter()
    for i, frame in enumerate(iter_frames(plan.path, stop=last + 1)):
        if i in wanted:
            t0 = time.perf_counter()
            crops[i] = crop_face(frame, plan.box(i), size=size, **plan.framing)
            timings.crop += time.perf_counter() - t0
        while next_w < len(windows) and windows[next_w][-1] <= i:
            timings.decode += time.perf_counter() - t_dec
            yield np.stack([crops[j] for j in windows[next_w]])  # [T, S, S, 3]
            t_dec = time.perf_counter()
            next_w += 1
            keep_from = windows[next_w][0] if next_w < len(windows) else last + 1
            crops = {j: c for j, c in crops.items() if j >= keep_from}
    timings.decode += time.perf_counter() - t_dec
    if next_w == 0:  # fewer frames decoded than planned: pad the first window like iter_windows does
        have = sorted(crops)
        if not have:
            raise VideoError(f"{plan.path}: no frame decoded on the second pass")
        yield np.stack([crops[j if j in crops else have[-1]] for j in windows[0]])


def to_clip_tensor(windows: np.ndarray | list[np.ndarray], device: torch.device | str = "cpu") -> Tensor:
    """uint8 [B, T, H, W, 3] windows -> float32 [B, 3, T, H, W] in [0, 1] on `device`, the encoder's input.

    The uint8 frames travel (a quarter of the float bytes; on CUDA from pinned memory, without blocking) and become
    float on the device."""
    x = torch.from_numpy(np.ascontiguousarray(np.stack(windows) if isinstance(windows, list) else windows))
    if torch.device(device).type == "cuda":
        x = x.pin_memory().to(device, non_blocking=True)
    else:
        x = x.to(device)
    return x.permute(0, 4, 1, 2, 3).float().div_(255)


@torch.inference_mode()
def encode_windows(
    model: Any,
    windows: Iterable[np.ndarray],
    *,
    batch_size: int = 8,
    keep_seq: bool = False,
    dtype: str | None = None,
    timings: Timings | None = None,
) -> Tensor:
    """Run the encoder over a stream of uint8 windows in batches -> [n, D] (or [n, N, D] with keep_seq), float32."""
    outs, batch = [], []

    def flush() -> None:
        t0 = time.perf_counter()
        with autocast(model.device, dtype):
            feats = model.extract_features(to_clip_tensor(batch, model.device), keep_seq=keep_seq)
        outs.append(feats.float().cpu())
        batch.clear()
        if timings is not None:
            timings.encode += time.perf_counter() - t0

    for w in windows:
        batch.append(w)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not outs:
        raise ValueError("no windows to encode")
    return torch.cat(outs)


@dataclass
class VideoFeatures:
    """Features of one video (or face track) and how they were obtained."""

    path: Path
    features: Tensor  # [n_windows, D] or [n_windows, N, D]
    window_frames: list[list[int]]
    n_frames: int
    n_faceless: int = 0
    track: int | None = None
    timings: Timings = field(default_factory=Timings)
    samples: list[np.ndarray] = field(default_factory=list)
    sample_frames: list[int] = field(default_factory=list)
    window_coverage: list[float] = field(default_factory=list)  # with crop_face: face-detected fraction per window

    def reduce(self, reduction: str = "none") -> Tensor:
        """ "none" -> all windows; "mean" / "max" -> pooled over windows (official `reduction`)."""
        return reduce_windows(self.features, reduction)


def reduce_windows(features: Tensor, reduction: str = "none") -> Tensor:
    """Pool a video's window features ``[n, ...]`` over windows: "none" keeps them, "mean" / "max" pool them."""
    if reduction == "none":
        return features
    if reduction == "mean":
        return features.mean(dim=0)
    if reduction == "max":
        return features.max(dim=0).values
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def extract_video_tracks(
    model: Any,
    path: str | os.PathLike,
    *,
    crop_face: bool = False,
    sample_rate: int = 2,
    stride: int = 16,
    keep_seq: bool = False,
    batch_size: int = 8,
    dtype: str | None = None,
    detector: Any = None,
    all_faces: bool = False,
    resize: bool = False,
    checks: Any = None,
) -> list[VideoFeatures]:
    """Features for every face track of a video (one entry unless `all_faces`); `checks` as in `clip_windows`."""
    cfg = model.config
    streams = clip_windows(
        path,
        clip_frames=cfg.clip_frames,
        img_size=cfg.img_size,
        sample_rate=sample_rate,
        stride=stride,
        crop_face=crop_face,
        detector=detector,
        all_faces=all_faces,
        resize=resize,
        checks=checks,
    )
    results = []
    for s in streams:
        feats = encode_windows(
            model, s.windows, batch_size=batch_size, keep_seq=keep_seq, dtype=dtype, timings=s.timings
        )
        n = len(feats)
        results.append(
            VideoFeatures(
                s.path,
                feats,
                s.window_frames[:n],
                s.n_frames,
                s.n_faceless,
                s.track,
                s.timings,
                s.samples,
                s.sample_frames,
                s.window_coverage[:n],
            )  # fmt: skip
        )
    return results


def extract_video(model: Any, path: str | os.PathLike, **kwargs: Any) -> VideoFeatures:
    """Features of the main face (or the whole frame, without crop_face) of one video; see `extract_video_tracks`."""
    if kwargs.get("all_faces"):
        raise ValueError("extract_video returns one face; use extract_video_tracks for all_faces=True")
    return extract_video_tracks(model, path, **kwargs)[0]
