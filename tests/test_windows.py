"""Tests for marlin.video.windows: the clip-window rule, checked against a re-enactment of the official loop."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from marlin.video.io import iter_frames, probe_video, read_video
from marlin.video.windows import iter_windows, n_windows, window_indices
from videogen import frame_index, write_video


def _official_sliding(n: int, clip_frames: int, sample_rate: int, stride: int) -> list[list[int]]:
    """The official sliding-window branch (n > clip_frames * sample_rate), re-enacted on frame indices.

    It reads frames one by one, keeps every sample_rate-th in a deque of length clip_frames, and emits the deque when
    the read position reaches a window's end index, as ``Marlin._load_video`` does with OpenCV.
    """
    starts = list(range(0, n - clip_frames * sample_rate, stride * sample_rate))
    ends = {s + clip_frames * sample_rate - 1 for s in starts}
    window: deque[int] = deque(maxlen=clip_frames)
    out, position = [], 0
    while position < n:  # cap.read() succeeds
        index = position
        position += sample_rate  # the read frame plus sample_rate - 1 skipped reads
        window.append(index)
        if position - 1 in ends:
            out.append(list(window))
    return out


EXPECTED_COUNTS = {1: 1, 15: 1, 16: 1, 17: 1, 31: 1, 32: 1, 33: 1, 75: 2, 100: 3, 1000: 31}


@pytest.mark.parametrize("n", list(EXPECTED_COUNTS))
def test_window_counts_with_official_defaults(n: int) -> None:
    windows = window_indices(n)
    assert len(windows) == n_windows(n) == EXPECTED_COUNTS[n]
    assert all(len(w) == 16 for w in windows)
    assert all(0 <= i < n for w in windows for i in w)


def test_window_contents_at_boundaries() -> None:
    assert window_indices(1) == [[0] * 16]
    assert window_indices(15) == [list(range(15)) + [14]]
    assert window_indices(16) == [list(range(16))]
    for n in (17, 31, 32):  # the official middle branch: the first 16 consecutive frames
        assert window_indices(n) == [list(range(16))]
    assert window_indices(33) == [list(range(0, 32, 2))]
    assert window_indices(75) == [list(range(0, 32, 2)), list(range(32, 64, 2))]
    # kept for parity: the exclusive range end drops the complete window [32, 62] when n = 64
    assert window_indices(64) == [list(range(0, 32, 2))]
    assert window_indices(65) == [list(range(0, 32, 2)), list(range(32, 64, 2))]


@pytest.mark.parametrize(
    ("clip_frames", "sample_rate", "stride"), [(16, 2, 16), (16, 1, 16), (16, 2, 8), (8, 3, 4), (16, 4, 16), (4, 2, 1)]
)
def test_sliding_windows_match_the_official_loop(clip_frames: int, sample_rate: int, stride: int) -> None:
    for n in range(clip_frames * sample_rate + 1, 400):
        expected = _official_sliding(n, clip_frames, sample_rate, stride)
        assert window_indices(n, clip_frames, sample_rate, stride) == expected, n
        assert n_windows(n, clip_frames, sample_rate, stride) == len(expected), n


def test_every_length_gives_at_least_one_full_window() -> None:
    for n in range(1, 200):
        for args in [(16, 2, 16), (16, 1, 16), (8, 3, 2)]:
            windows = window_indices(n, *args)
            assert len(windows) == n_windows(n, *args) >= 1
            assert all(len(w) == args[0] and w == sorted(w) for w in windows)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n_frames=0),
        dict(n_frames=-3),
        dict(n_frames=10, clip_frames=0),
        dict(n_frames=10, sample_rate=0),
        dict(n_frames=10, stride=0),
    ],
)
def test_invalid_arguments(kwargs) -> None:
    with pytest.raises(ValueError, match=">= 1"):
        window_indices(**kwargs)
    with pytest.raises(ValueError, match=">= 1"):
        n_windows(**kwargs)
    with pytest.raises(ValueError, match=">= 1"):
        iter_windows(iter([]), **kwargs)  # checked at the call, before any frame is read


# ---- iter_windows ---------------------------------------------------------------------------------------------


class _Frames:
    """Frames [1, 1, 1] whose value is their index; tracks how many were read and how many are still alive."""

    def __init__(self, n: int) -> None:
        self.n, self.read, self.max_alive = n, 0, 0
        self._alive: set[int] = set()

    def __iter__(self) -> Iterator[np.ndarray]:
        import weakref

        for i in range(self.n):
            frame = np.full((1, 1, 1), i, np.int32)
            self._alive.add(i)
            weakref.finalize(frame, self._alive.discard, i)
            self.read += 1
            self.max_alive = max(self.max_alive, len(self._alive))
            yield frame
            del frame


def _values(window: np.ndarray) -> list[int]:
    return window[:, 0, 0, 0].tolist()


@pytest.mark.parametrize("n", [1, 5, 16, 20, 32, 33, 64, 75, 100, 333])
@pytest.mark.parametrize(("clip_frames", "sample_rate", "stride"), [(16, 2, 16), (16, 2, 4), (8, 1, 8), (4, 3, 1)])
def test_iter_windows_matches_indices_and_holds_at_most_one_window(n, clip_frames, sample_rate, stride) -> None:
    source = _Frames(n)
    windows = [_values(w) for w in iter_windows(source, n, clip_frames, sample_rate, stride)]
    expected = window_indices(n, clip_frames, sample_rate, stride)
    assert windows == expected
    assert source.max_alive <= clip_frames + 1  # + the frame being handed over
    assert source.read == max(w[-1] for w in expected) + 1  # never reads past the last frame it needs


def test_iter_windows_pads_first_window_when_stream_is_short() -> None:
    """The fix of the official middle-branch bug: a container that over-reports its length still gives a full clip."""
    with pytest.warns(RuntimeWarning, match="ended after 10 of 20 frames; padded the first window"):
        (window,) = iter_windows(_Frames(10), n_frames=20)
    assert _values(window) == list(range(10)) + [9] * 6
    with pytest.warns(RuntimeWarning, match="dropped 2 later window"):
        (window,) = iter_windows(_Frames(20), n_frames=100)
    assert _values(window) == list(range(0, 20, 2)) + [18] * 6


def test_iter_windows_drops_incomplete_later_windows() -> None:
    with pytest.warns(RuntimeWarning, match="ended after 70 of 100 frames; dropped the last 1 incomplete"):
        windows = list(iter_windows(_Frames(70), n_frames=100))
    assert [_values(w) for w in windows] == window_indices(100)[:2]


def test_iter_windows_empty_stream() -> None:
    with pytest.raises(ValueError, match="frame stream is empty"):
        list(iter_windows(iter([]), n_frames=5))


@pytest.mark.parametrize("n", [10, 24, 75])
def test_iter_windows_on_a_video_equals_indexing_read_video(tmp_path: Path, n: int) -> None:
    path = write_video(tmp_path / f"clip{n}.mp4", n_frames=n)
    info = probe_video(path)
    assert info.n_frames == n
    video = read_video(path)
    expected = [video[idx] for idx in window_indices(n)]
    windows = list(iter_windows(iter_frames(path), info.n_frames))
    assert len(windows) == len(expected)
    for got, want, idx in zip(windows, expected, window_indices(n), strict=True):
        assert got.shape == (16, 64, 96, 3)
        assert np.array_equal(got, want)
        assert [frame_index(f) for f in got] == idx


# ---- real data ------------------------------------------------------------------------------------------------


CROPPED = {"cropped01.mp4": 143, "cropped02.mp4": 104, "cropped03.mp4": 216, "cropped04.mp4": 15, "cropped05.mp4": 27}
CROPPED_WINDOWS = {"cropped01.mp4": 4, "cropped02.mp4": 3, "cropped03.mp4": 6, "cropped04.mp4": 1, "cropped05.mp4": 1}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CROPPED))
def test_marlin_samples_probe_and_windows_match_decode(shared_data: Path, name: str) -> None:
    path = shared_data / "marlin_samples" / name
    if not path.is_file():
        pytest.skip(f"shared data not found: {path}")
    info = probe_video(path)
    n_decoded = sum(1 for _ in iter_frames(path))
    assert info.n_frames == n_decoded == CROPPED[name]
    assert (info.width, info.height, info.rotation) == (224, 224, 0)
    windows = list(iter_windows(iter_frames(path), info.n_frames))
    assert len(windows) == n_windows(n_decoded) == CROPPED_WINDOWS[name]
    assert all(w.shape == (16, 224, 224, 3) for w in windows)
