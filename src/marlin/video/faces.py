"""A video's face track, streamed: decode -> detect -> track (smooth, fill) -> crop, at flat memory.

Two passes over the file: the first decodes every frame and detects faces on the frames that will be used; the
second decodes again and crops them with the smoothed boxes. Decoding is cheap next to detection and the model, and
this keeps memory flat for videos of any length (only boxes are held between the passes).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..face.crop import MEDIAPIPE_OFFICIAL_FRAMING, crop_face
from ..face.track import FaceTrack, track_face, track_faces
from .io import iter_frames


@dataclass
class FacePlan:
    """Boxes for the frames of one video that will be cropped (one plan per face track)."""

    path: Path
    n_frames: int  # frames that actually decoded
    frames: np.ndarray  # [K] frame indices covered by `track`, ascending
    track: FaceTrack  # boxes [K, 4] for those frames, smoothed and filled
    framing: dict[str, float] = field(default_factory=lambda: dict(MEDIAPIPE_OFFICIAL_FRAMING))

    @property
    def n_faceless(self) -> int:
        """Frames among `frames` where no face was detected (their box was borrowed from the nearest frame)."""
        return int(self.track.n_missing)

    def box(self, index: int) -> np.ndarray:
        """Box for any frame index: the planned one, or that of the nearest planned frame."""
        k = int(np.clip(np.searchsorted(self.frames, index), 0, len(self.frames) - 1))
        if k > 0 and abs(self.frames[k - 1] - index) <= abs(self.frames[k] - index):
            k -= 1
        return self.track.boxes[k]


def plan_face_crops(
    path: str | os.PathLike,
    detector: Any,
    *,
    select: Callable[[int], bool] | None = None,
    all_faces: bool = False,
    framing: dict[str, float] | None = None,
    progress: Callable[[int], None] | None = None,
    **track_kwargs: Any,
) -> list[FacePlan]:
    """Pass 1: detect faces on the frames `select(index)` accepts (all by default) and track them.

    Returns one plan (the main face: largest, kept consistent over time) or, with `all_faces`, one per face track.
    Raises `marlin.face.NoFaceError` when no selected frame has a face, `VideoError` for unreadable files.
    """
    path = Path(path)
    indices, detections = [], []
    n = 0
    for n, frame in enumerate(iter_frames(path), start=1):
        i = n - 1
        if select is None or select(i):
            indices.append(i)
            detections.append(detector.detect(frame))
        if progress is not None:
            progress(i)
    frames = np.asarray(indices, dtype=np.int64)
    framing = dict(MEDIAPIPE_OFFICIAL_FRAMING if framing is None else framing)
    if not all_faces:
        return [FacePlan(path, n, frames, track_face(detections, name=path, **track_kwargs), framing)]
    tracks = track_faces(detections, **track_kwargs)
    if not tracks:
        track_face(detections, name=path)  # raises the NoFaceError with the usual message
    return [FacePlan(path, n, frames[t.start : t.stop], t, framing) for t in tracks]


def iter_face_crops(
    plan: FacePlan, wanted: set[int] | None = None, size: int = 224, resample: str = "bilinear"
) -> Iterator[tuple[int, np.ndarray]]:
    """Pass 2: yield (frame index, uint8 [size, size, 3] crop) for the wanted frames (default: the planned ones)."""
    wanted = set(plan.frames.tolist()) if wanted is None else wanted
    last = max(wanted) if wanted else -1
    for i, frame in enumerate(iter_frames(plan.path, stop=last + 1)):
        if i in wanted:
            yield i, crop_face(frame, plan.box(i), size=size, resample=resample, **plan.framing)
