"""Shot cuts: where a video jumps to another scene, so that nothing (a face box, a track) is carried across.

A cut is found causally, frame by frame, from a small signature of each frame (:func:`frame_signature`): a joint
colour histogram (4 x 4 x 4 bins) and a 16 x 16 grey thumbnail. :func:`signature_distance` compares two consecutive
frames on both; :class:`CutDetector` calls a cut when the histograms differ strongly *and* the picture changed, or
when the histograms differ so much that no motion explains it. Thresholds were set on 156 shared and synthetic clips
(largest change inside a clip: histogram 0.23) against 2,652 hard cuts between them, of which 3.3% are missed (cuts
between near-identical scenes, e.g. two GRID clips of one speaker, where carrying the box over does no harm).
Gradual transitions (dissolves, fades) are not detected as cuts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["CutDetector", "FrameSignature", "frame_signature", "shot_spans", "signature_distance"]

_SIDE = 64  # frames are subsampled to about this many pixels a side before the signature is taken
_BINS = 4  # per channel: 4 x 4 x 4 joint colour bins
_THUMB = 16  # grey thumbnail side


@dataclass(frozen=True)
class FrameSignature:
    """What :func:`frame_signature` keeps of one frame."""

    hist: np.ndarray  # float32 [64], sums to 1
    thumb: np.ndarray  # float32 [16, 16] grey in [0, 1]


def frame_signature(frame: np.ndarray) -> FrameSignature:
    """Signature of one ``uint8 [H, W, 3]`` RGB frame (strided subsampling: microseconds on a 720p frame)."""
    h, w = frame.shape[:2]
    small = frame[:: max(1, h // _SIDE), :: max(1, w // _SIDE)]  # [~64, ~64, 3]
    q = (small >> (8 - 2)).astype(np.int64)  # [h, w, 3] in 0..3 (_BINS = 4 = 2 bits)
    codes = (q[..., 0] * _BINS + q[..., 1]) * _BINS + q[..., 2]  # [h, w]
    hist = np.bincount(codes.ravel(), minlength=_BINS**3).astype(np.float32)
    hist /= max(hist.sum(), 1.0)
    grey = small.astype(np.float32).mean(-1) / 255.0  # [h, w]
    th, tw = min(_THUMB, grey.shape[0]), min(_THUMB, grey.shape[1])
    grey = grey[: grey.shape[0] // th * th, : grey.shape[1] // tw * tw]  # whole blocks only
    thumb = grey.reshape(th, grey.shape[0] // th, tw, grey.shape[1] // tw).mean(axis=(1, 3))  # [16, 16] block means
    return FrameSignature(hist, thumb)


def signature_distance(a: FrameSignature, b: FrameSignature) -> tuple[float, float]:
    """(histogram distance in [0, 1]: half the L1 distance, mean absolute thumbnail difference in [0, 1])."""
    d_hist = 0.5 * float(np.abs(a.hist - b.hist).sum())
    d_pix = float(np.abs(a.thumb - b.thumb).mean()) if a.thumb.shape == b.thumb.shape else 1.0
    return d_hist, d_pix


@dataclass
class CutDetector:
    """Feed frames in order (:meth:`update`); it answers whether each one starts a new shot.

    Args:
        hist_threshold: histogram distance above which a change of picture counts as a cut.
        pix_threshold: thumbnail difference that must come with it (a camera pan changes pixels, not colours).
        hist_alone: histogram distance that is a cut on its own.
    """

    hist_threshold: float = 0.25
    pix_threshold: float = 0.05
    hist_alone: float = 0.5
    _prev: FrameSignature | None = field(default=None, repr=False)

    def update(self, frame: np.ndarray) -> bool:
        """True when ``frame`` is the first frame of a new shot (never for the very first frame)."""
        sig = frame_signature(frame)
        prev, self._prev = self._prev, sig
        if prev is None:
            return False
        d_hist, d_pix = signature_distance(prev, sig)
        return d_hist >= self.hist_alone or (d_hist >= self.hist_threshold and d_pix >= self.pix_threshold)


def shot_spans(n_frames: int, cuts: list[int]) -> list[tuple[int, int]]:
    """``[start, stop)`` of every shot of an ``n_frames`` video whose shots start at 0 and at each of ``cuts``."""
    starts = [0] + sorted(c for c in set(cuts) if 0 < c < n_frames)
    return [(s, e) for s, e in zip(starts, starts[1:] + [n_frames], strict=True) if e > s]
