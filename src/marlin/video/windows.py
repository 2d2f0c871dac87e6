"""Which frames of a video form each 16-frame clip fed to MARLIN.

The rule follows the official ``Marlin.extract_video(path, sample_rate=2, stride=16)``, with ``n`` the number of
frames, ``clip_frames`` the clip length (16) and ``span = clip_frames * sample_rate`` the frames one window covers:

* ``n <= clip_frames``: one window holding every frame, padded to ``clip_frames`` by repeating the last frame.
* ``clip_frames < n <= span``: one window of the first ``clip_frames`` *consecutive* frames (no subsampling).
* ``n > span``: sliding windows that take every ``sample_rate``-th frame, ``clip_frames`` of them, starting at
  ``range(0, n - span, stride * sample_rate)``. ``stride`` counts sampled frames, so the defaults give back-to-back
  windows of 32 raw frames, frames ``[s, s + 2, ..., s + 30]``.

The count is therefore 1 for ``n <= span`` and ``ceil((n - span) / (stride * sample_rate))`` above: with the defaults,
1 window up to 64 frames, then one more per 32 frames (75 -> 2, 100 -> 3, 1000 -> 31).

Where this differs from the official code (and why):

* The middle branch of the official code computes a padded clip when fewer than 16 frames actually decode, then
  discards it (``v = video[:16]`` overwrites it), so a video whose container over-reports its frame count yields a
  short clip that the model rejects. Here, when the frame stream ends before the first window is complete,
  :func:`iter_windows` completes it by repeating its last available frame, so every video with at least one frame
  gives at least one full window.
* The official sliding branch silently yields nothing more (or nothing at all) when decoding stops before a window's
  last frame; :func:`iter_windows` warns instead.
* The official code takes ``n`` from ffprobe's ``nb_frames``, which Matroska/WebM files lack;
  :func:`marlin.video.io.probe_video` counts packets there.

Kept on purpose for parity with features computed by the official code: the sliding range excludes its end, so when
``n - span`` is a multiple of ``stride * sample_rate`` (e.g. ``n = 64``) the last complete window is not used, and
frames after the last window are never seen. The middle branch's denser temporal sampling is also kept.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator

import numpy as np

__all__ = ["iter_windows", "n_windows", "window_indices"]


def _check_args(n_frames: int, clip_frames: int, sample_rate: int, stride: int) -> None:
    for name, value in (("clip_frames", clip_frames), ("sample_rate", sample_rate), ("stride", stride)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1 (a video with no frames has no windows), got {n_frames}")


def n_windows(n_frames: int, clip_frames: int = 16, sample_rate: int = 2, stride: int = 16) -> int:
    """Number of windows :func:`window_indices` gives for a video of ``n_frames`` frames."""
    _check_args(n_frames, clip_frames, sample_rate, stride)
    span = clip_frames * sample_rate
    if n_frames <= span:
        return 1
    return -(-(n_frames - span) // (stride * sample_rate))  # ceil, in integers


def window_indices(n_frames: int, clip_frames: int = 16, sample_rate: int = 2, stride: int = 16) -> list[list[int]]:
    """Frame indices of every window, ``clip_frames`` per window; padding repeats the last index.

    Indices count frames in the order the decoder outputs them (see :func:`marlin.video.io.iter_frames`).
    The rule and its differences from the official code are in the module docstring.
    """
    _check_args(n_frames, clip_frames, sample_rate, stride)
    if n_frames <= clip_frames:
        return [list(range(n_frames)) + [n_frames - 1] * (clip_frames - n_frames)]
    span = clip_frames * sample_rate
    if n_frames <= span:
        return [list(range(clip_frames))]
    starts = range(0, n_frames - span, stride * sample_rate)
    return [list(range(s, s + span, sample_rate)) for s in starts]


def iter_windows(
    frames: Iterable[np.ndarray],
    n_frames: int,
    clip_frames: int = 16,
    sample_rate: int = 2,
    stride: int = 16,
) -> Iterator[np.ndarray]:
    """Yield each window of :func:`window_indices` as a ``[clip_frames, H, W, C]`` array from a stream of frames.

    ``frames`` yields every frame of the video in order (e.g. :func:`marlin.video.io.iter_frames`); ``n_frames`` is the
    expected count, usually from :func:`marlin.video.io.probe_video`. Only the frames that a pending window still needs
    are held, at most ``clip_frames`` of them, and the stream is not read past the last frame any window uses.

    If the stream ends before ``n_frames`` (a container that over-reports its length, a truncated file), the first
    window is completed by repeating its last available frame, later incomplete windows are dropped, and a
    ``RuntimeWarning`` says so. An empty stream raises ``ValueError``. Arguments are checked at the call.
    """
    return _iter_windows(iter(frames), n_frames, window_indices(n_frames, clip_frames, sample_rate, stride))


def _iter_windows(frames: Iterator[np.ndarray], n_frames: int, windows: list[list[int]]) -> Iterator[np.ndarray]:
    """The generator behind :func:`iter_windows`."""
    held: dict[int, np.ndarray] = {}
    next_window = 0  # index into `windows` of the next window to yield
    n_seen = 0
    for i, frame in enumerate(frames):
        n_seen = i + 1
        # Windows are sorted by start and hold ascending indices; only those starting at or before i can need frame i.
        k = next_window
        while k < len(windows) and windows[k][0] <= i:
            if i in windows[k]:
                held[i] = frame
                break
            k += 1
        while next_window < len(windows) and windows[next_window][-1] <= i:
            yield np.stack([held[j] for j in windows[next_window]])  # [clip_frames, H, W, C]
            next_window += 1
            if next_window < len(windows):
                first_needed = windows[next_window][0]
                held = {j: f for j, f in held.items() if j >= first_needed}
            else:
                held.clear()
        if next_window == len(windows):
            return
    if n_seen == 0:
        raise ValueError(f"frame stream is empty, expected {n_frames} frames")
    n_missing = len(windows) - next_window
    if next_window == 0:
        # Replicate-pad the first window from the frames it did get, so every video gives at least one window.
        clip, last = [], held[windows[0][0]]  # index 0 is always in the first window and was seen
        for j in windows[0]:
            last = held.get(j, last)
            clip.append(last)
        warnings.warn(
            f"frame stream ended after {n_seen} of {n_frames} frames; padded the first window with its last frame"
            + (f" and dropped {n_missing - 1} later window(s)" if n_missing > 1 else ""),
            RuntimeWarning,
            stacklevel=2,
        )
        yield np.stack(clip)  # [clip_frames, H, W, C]
        return
    warnings.warn(
        f"frame stream ended after {n_seen} of {n_frames} frames; dropped the last {n_missing} incomplete window(s)",
        RuntimeWarning,
        stacklevel=2,
    )
