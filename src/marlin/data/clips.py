"""The one clip sampler: which frames make a training / evaluation clip, and how a clip is read and cropped.

A *clip* is ``clip_frames`` frames ``sample_rate`` apart (``MarlinConfig.clip_frames``; ``sample_rate`` 2 as the
official pretraining). Pretraining (stores and video folders), fine-tuning, reconstructions and mask sheets all pick
their frames here, so they agree on padding and on what "centred" means:

* :func:`clip_indices` -- the frames of the clip starting at ``start``; a clip that runs past the last frame repeats
  it (short videos are padded, never refused).
* :func:`max_start`, :func:`centred_start`, :func:`random_start`, :func:`spread_starts` -- where clips may start.
* :func:`fit_sample_rate` -- the largest rate <= the asked one whose clip fits a short video (fine-tuning lowers it
  before padding, so a 20-frame video still gives 16 distinct frames).
* :func:`read_clip` -- the clip's frames from a video file through :func:`marlin.video.io.read_frames` (the one reader:
  rotation, colour conversion, padding past a truncated end), centre-cropped square and resized by
  :func:`center_crop`; :func:`read_face_clip` -- the same frames cropped around the tracked face instead.

(Feature *extraction* follows the official sliding-window rule instead: :mod:`marlin.video.windows`.)
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "center_crop",
    "centred_start",
    "clip_indices",
    "fit_sample_rate",
    "max_start",
    "random_start",
    "read_clip",
    "read_face_clip",
    "spread_starts",
]


def _check(n_frames: int, clip_frames: int, sample_rate: int) -> None:
    if n_frames < 1 or clip_frames < 1 or sample_rate < 1:
        raise ValueError(
            f"expected n_frames, clip_frames and sample_rate >= 1, found {n_frames}, {clip_frames}, {sample_rate}"
        )


def clip_indices(n_frames: int, clip_frames: int, sample_rate: int, start: int) -> np.ndarray:
    """Frame indices ``start, start + sample_rate, ...`` (``clip_frames`` of them), clipped to the last frame.

    Clipping pads a clip that runs past the end by repeating the last frame (short videos). ``[clip_frames]`` int64.
    """
    _check(n_frames, clip_frames, sample_rate)
    if start < 0:
        raise ValueError(f"clip_indices: expected start >= 0, found {start}")
    return np.minimum(start + sample_rate * np.arange(clip_frames), n_frames - 1)  # [clip_frames]


def max_start(n_frames: int, clip_frames: int, sample_rate: int) -> int:
    """The last start whose clip ends within the video (0 when even the first clip does not fit)."""
    _check(n_frames, clip_frames, sample_rate)
    return max(0, n_frames - ((clip_frames - 1) * sample_rate + 1))


def centred_start(n_frames: int, clip_frames: int, sample_rate: int) -> int:
    """The start of the clip in the middle of the video (deterministic evaluation)."""
    return max_start(n_frames, clip_frames, sample_rate) // 2


def random_start(n_frames: int, clip_frames: int, sample_rate: int, rng: np.random.Generator | None = None) -> int:
    """A uniform start in ``[0, max_start]``: from ``rng`` when given (seeded pipelines), else torch's global RNG
    (reproducible under ``torch.manual_seed``, different in every DataLoader worker)."""
    n_starts = max_start(n_frames, clip_frames, sample_rate) + 1
    return int(rng.integers(n_starts)) if rng is not None else int(torch.randint(n_starts, ()))


def spread_starts(n_frames: int, clip_frames: int, sample_rate: int, n_clips: int) -> list[int]:
    """``n_clips`` starts evenly spaced from the first to the last possible one (one clip: the centred one)."""
    last = max_start(n_frames, clip_frames, sample_rate)
    if n_clips == 1:
        return [last // 2]
    return [int(s) for s in np.round(np.linspace(0, last, n_clips)).astype(int)]


def fit_sample_rate(n_frames: int, clip_frames: int, sample_rate: int) -> int:
    """The largest rate <= `sample_rate` whose clip fits in `n_frames` (1 when even consecutive frames do not fit)."""
    if clip_frames <= 1:
        return sample_rate
    return max(1, min(sample_rate, (n_frames - 1) // (clip_frames - 1)))


def center_crop(frame: np.ndarray, size: int) -> np.ndarray:
    """The centre square of ``[H, W, 3]`` uint8, resized to ``[size, size, 3]`` with the face crops' resampler
    (:func:`marlin.face.crop.crop_face`: PIL bilinear, area-aware when shrinking)."""
    from ..face.crop import crop_face

    h, w = frame.shape[:2]
    side = min(h, w)
    x1, y1 = (w - side) / 2, (h - side) / 2
    return crop_face(frame, (x1, y1, x1 + side, y1 + side), size=size)


def read_clip(path: str | os.PathLike, indices: Sequence[int], size: int) -> Tensor:
    """Frames `indices` of a video, centre-cropped square and resized: uint8 ``[3, len(indices), size, size]``.

    An index past the frames that decode repeats the last one (see :func:`marlin.video.io.read_frames`).
    """
    from ..video.io import read_frames

    frames = read_frames(path, indices)  # [T, H, W, 3], upright
    crops = np.stack([center_crop(f, size) for f in frames])  # [T, S, S, 3]
    return torch.from_numpy(crops).permute(3, 0, 1, 2).contiguous()  # [3, T, S, S]


def read_face_clip(
    path: str | os.PathLike, indices: Sequence[int], size: int, detector: str = "mediapipe"
) -> np.ndarray:
    """Frames `indices` cropped around the video's main face (detected on those frames, tracked and smoothed as
    `marlin extract --crop-face` does): uint8 ``[len(indices), size, size, 3]``. Indices past the frames that decode
    repeat the last one; a video without a face raises :class:`marlin.face.NoFaceError`."""
    from ..face.detect import create_detector
    from ..face.track import NoFaceError
    from ..video.faces import iter_face_crops, plan_face_crops

    wanted = {int(i) for i in indices}
    with create_detector(detector) as det:
        plan = plan_face_crops(path, det, select=wanted.__contains__)[0]
    got = dict(iter_face_crops(plan, wanted, size=size))  # frame index -> [S, S, 3]
    if not got:
        raise ValueError(f"{path}: none of the frames {min(wanted)}..{max(wanted)} decodes or shows a confirmed face")
    last = max(got)
    missing = sorted(i for i in wanted if i <= last and i not in got)
    if missing:  # frames of a shot without a confirmed face: nothing of that scene to crop
        raise NoFaceError(f"{path}: frames {missing[0]}..{missing[-1]} of the clip show no confirmed face")
    return np.stack([got[min(int(i), last)] for i in indices])  # [T, S, S, 3]
