"""Turn per-frame face detections into one smooth box per frame: face selection, gap filling, temporal smoothing.

Two entry points:

* :func:`track_face` -- the main face of a video (what MARLIN crops). Frame by frame it keeps the detection that
  overlaps the previously chosen box most (IoU), so a second face or a false positive does not steal the crop; when
  nothing overlaps (first face, or the face jumped) it takes the largest (or most confident) detection.
* :func:`track_faces` -- every face: greedy IoU tracks, one :class:`FaceTrack` each over its own frame span, so a
  caller can write one feature file per person.

Boxes are ``(x1, y1, x2, y2)`` pixels. Smoothing is a centred moving mean (or median) of the four coordinates over
``window`` frames, taken over the frames where the face was detected only, truncated at the video ends (so the ends are
not pulled towards zero). Frames without a detection then take the smoothed box of the nearest detected frame in time
(the earlier one on a tie), or, with ``fill="linear"``, a linear interpolation between the detected frames around them
(frames before the first / after the last detection still take the nearest box).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .detect import Detection, boxes_array

__all__ = ["FaceTrack", "NoFaceError", "box_iou", "fill_missing", "smooth_boxes", "track_face", "track_faces"]


class NoFaceError(ValueError):
    """Raised when a video has no detected face in any frame (so there is nothing sensible to crop)."""


@dataclass
class FaceTrack:
    """Per-frame boxes of one face.

    Attributes:
        boxes: ``float64 [T, 4]`` smoothed and gap-filled ``(x1, y1, x2, y2)`` for frames ``start .. start+T-1``.
        detected: ``bool [T]``, True where the detector found this face (False: box filled in).
        n_missing: number of frames whose box was filled in (``(~detected).sum()``).
        score: mean detector score over the detected frames.
        start: index in the video of ``boxes[0]`` (0 for :func:`track_face`, which covers the whole video).
        picked: ``int [T]``, which detection of its frame the track took (index into that frame's list; -1 where
            the box was filled in), so a caller can tell which detections a track is made of.
    """

    boxes: np.ndarray
    detected: np.ndarray
    n_missing: int
    score: float
    start: int = 0
    picked: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def stop(self) -> int:
        """One past the index in the video of the last frame of the track."""
        return self.start + len(self.boxes)

    @property
    def coverage(self) -> float:
        """Fraction of the track's frames where the face was detected."""
        return float(self.detected.mean()) if len(self.detected) else 0.0


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of every box in ``a`` ``[N, 4]`` with every box in ``b`` ``[M, 4]`` -> ``[N, M]``."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # [N, M, 2]
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])  # [N, M, 2]
    inter = np.clip(rb - lt, 0, None).prod(-1)  # [N, M]
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)  # [N]
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)  # [M]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def smooth_boxes(boxes: np.ndarray, window: int = 5, method: str = "mean") -> np.ndarray:
    """Centred moving mean/median of ``boxes`` ``[T, 4]`` over ``window`` frames; NaN rows (missing) are ignored.

    A row whose whole window is NaN stays NaN. ``window=1`` returns a copy.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"smooth_boxes: expected an odd window >= 1, got {window}")
    if method not in ("mean", "median"):
        raise ValueError(f"smooth_boxes: expected method 'mean' or 'median', got {method!r}")
    boxes = np.asarray(boxes, dtype=np.float64)
    if window == 1 or len(boxes) == 0:
        return boxes.copy()
    half = window // 2
    padded = np.pad(boxes, ((half, half), (0, 0)), constant_values=np.nan)  # [T + 2h, 4]
    windows = np.lib.stride_tricks.sliding_window_view(padded, window, axis=0)  # [T, 4, window]
    valid = ~np.isnan(windows).all(-1)  # [T, 4]
    out = np.full(boxes.shape, np.nan)
    reduce = np.nanmean if method == "mean" else np.nanmedian
    out[valid] = reduce(windows[valid], axis=-1)
    return out


def fill_missing(boxes: np.ndarray, detected: np.ndarray, fill: str = "nearest") -> np.ndarray:
    """Fill rows of ``boxes`` ``[T, 4]`` where ``detected`` ``[T]`` is False from the detected rows.

    ``fill="nearest"``: the box of the nearest detected frame in time (the earlier one on a tie). ``fill="linear"``:
    linear interpolation between the detected frames on either side (nearest outside the first/last detection).
    """
    if fill not in ("nearest", "linear"):
        raise ValueError(f"fill_missing: expected fill 'nearest' or 'linear', got {fill!r}")
    boxes = np.asarray(boxes, dtype=np.float64)
    detected = np.asarray(detected, dtype=bool)
    known = np.flatnonzero(detected)
    if len(known) == 0:
        raise ValueError("fill_missing: expected at least one detected frame, found none")
    t = np.arange(len(boxes))
    if fill == "linear":
        return np.stack([np.interp(t, known, boxes[known, k]) for k in range(4)], axis=1)
    # Index of the first known frame at or after t, then pick whichever neighbour is closer.
    right = np.clip(np.searchsorted(known, t), 0, len(known) - 1)
    left = np.clip(right - 1, 0, len(known) - 1)
    use_left = np.abs(t - known[left]) <= np.abs(known[right] - t)
    return boxes[np.where(use_left, known[left], known[right])]


def _choose(dets: Sequence[Detection], prev: np.ndarray | None, prefer: str, iou_threshold: float) -> int:
    """Index of the detection that continues ``prev`` (highest IoU above threshold), else of the largest / most
    confident one."""
    if prev is not None:
        iou = box_iou(prev[None], boxes_array(dets))[0]  # [N]
        best = int(iou.argmax())
        if iou[best] >= iou_threshold:
            return best
    key = (lambda k: dets[k].area) if prefer == "area" else (lambda k: dets[k].score)
    return max(range(len(dets)), key=key)


def _finish(
    raw: np.ndarray,
    scores: np.ndarray,
    detected: np.ndarray,
    window: int,
    method: str,
    fill: str,
    start: int = 0,
    picked: np.ndarray | None = None,
) -> FaceTrack:
    """Smooth the detected boxes of ``raw`` [T, 4], fill the rest, and pack a :class:`FaceTrack`."""
    raw = raw.copy()
    raw[~detected] = np.nan
    smoothed = smooth_boxes(raw, window, method)  # [T, 4], NaN only where not detected
    boxes = fill_missing(smoothed, detected, fill)
    return FaceTrack(
        boxes=boxes,
        detected=detected.copy(),
        n_missing=int((~detected).sum()),
        score=float(scores[detected].mean()),
        start=start,
        picked=picked,
    )


def track_face(
    detections: Sequence[Sequence[Detection]],
    *,
    name: str | os.PathLike[str] | None = None,
    prefer: str = "area",
    iou_threshold: float = 0.3,
    window: int = 5,
    method: str = "mean",
    fill: str = "nearest",
) -> FaceTrack:
    """One box per frame for the main face of a video.

    Args:
        detections: per-frame detections, as returned by :func:`marlin.face.detect.detect_video`.
        name: the video (path or name), used in the error message.
        prefer: how to pick a face when none continues the previous box: ``"area"`` (largest) or ``"score"``.
        iou_threshold: minimum IoU with the previous chosen box for a detection to count as the same face.
        window: smoothing window in frames (odd; 1 disables smoothing).
        method: ``"mean"`` or ``"median"`` smoothing.
        fill: ``"nearest"`` or ``"linear"`` for frames without a detection.

    Raises:
        NoFaceError: no frame has a detection.
    """
    if prefer not in ("area", "score"):
        raise ValueError(f"track_face: expected prefer 'area' or 'score', got {prefer!r}")
    n = len(detections)
    raw = np.full((n, 4), np.nan)
    scores = np.zeros(n)
    detected = np.zeros(n, dtype=bool)
    picked = np.full(n, -1, dtype=np.int64)
    prev = None
    for t, dets in enumerate(detections):
        if not dets:
            continue
        picked[t] = _choose(dets, prev, prefer, iou_threshold)
        det = dets[picked[t]]
        raw[t], scores[t], detected[t] = det.box, det.score, True
        prev = raw[t]
    if not detected.any():
        what = f" of {os.fspath(name)}" if name is not None else ""
        raise NoFaceError(f"no face detected in any of the {n} frames{what}; expected at least one")
    return _finish(raw, scores, detected, window, method, fill, picked=picked)


def track_faces(
    detections: Sequence[Sequence[Detection]],
    *,
    iou_threshold: float = 0.3,
    max_gap: int = 15,
    min_frames: int = 1,
    window: int = 5,
    method: str = "mean",
    fill: str = "nearest",
) -> list[FaceTrack]:
    """Track every face: greedy IoU association of detections across frames.

    Each frame, detection/track pairs are matched in order of decreasing IoU (with the track's last detected box,
    IoU >= ``iou_threshold``); unmatched detections start new tracks. A track bridges up to ``max_gap`` consecutive
    frames without a match; one more ends it. Inside its span a track's missing frames are filled (``fill``) and its
    boxes smoothed as in :func:`track_face`.

    Returns:
        Tracks with at least ``min_frames`` detected frames, most detected frames first (ties: earlier start first).
        Empty when there are no detections at all (callers that need a face should check, or use :func:`track_face`).
    """
    # A track is the list of (frame, box, score, index of the detection in its frame) of its detected frames.
    open_tracks: list[list[tuple[int, tuple[float, ...], float, int]]] = []
    closed: list[list[tuple[int, tuple[float, ...], float, int]]] = []
    for t, dets in enumerate(detections):
        still_open = []
        for track in open_tracks:
            (closed if t - track[-1][0] - 1 > max_gap else still_open).append(track)  # frames missed so far
        open_tracks = still_open
        unmatched = list(range(len(dets)))
        if open_tracks and dets:
            last = np.array([track[-1][1] for track in open_tracks])  # [K, 4]
            iou = box_iou(last, boxes_array(dets))  # [K, N]
            ks, ds = np.nonzero(iou >= iou_threshold)  # candidate (track, detection) pairs
            order = np.argsort(-iou[ks, ds], kind="stable")  # best overlap first
            used_t, used_d = set(), set()
            for k, d in zip(ks[order].tolist(), ds[order].tolist(), strict=True):
                if k in used_t or d in used_d:
                    continue
                used_t.add(k)
                used_d.add(d)
                open_tracks[k].append((t, dets[d].box, dets[d].score, d))
            unmatched = [d for d in unmatched if d not in used_d]
        for d in unmatched:
            open_tracks.append([(t, dets[d].box, dets[d].score, d)])
    closed.extend(open_tracks)

    out = []
    for track in closed:
        if len(track) < min_frames:
            continue
        start, stop = track[0][0], track[-1][0] + 1
        raw = np.full((stop - start, 4), np.nan)
        scores = np.zeros(stop - start)
        detected = np.zeros(stop - start, dtype=bool)
        picked = np.full(stop - start, -1, dtype=np.int64)
        for t, box, score, d in track:
            raw[t - start], scores[t - start], detected[t - start], picked[t - start] = box, score, True, d
        out.append(_finish(raw, scores, detected, window, method, fill, start=start, picked=picked))
    out.sort(key=lambda tr: (-int(tr.detected.sum()), tr.start))
    return out
