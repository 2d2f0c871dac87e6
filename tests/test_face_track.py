"""Face selection, smoothing, gap filling and multi-face tracking on synthetic detections (no detector needed)."""

from __future__ import annotations

import numpy as np
import pytest

from marlin.face.detect import Detection
from marlin.face.track import (
    FaceTrack,
    NoFaceError,
    box_iou,
    fill_missing,
    smooth_boxes,
    track_face,
    track_faces,
)


def det(x1: float, y1: float, x2: float, y2: float, score: float = 0.9) -> Detection:
    return Detection(box=(x1, y1, x2, y2), score=score)


def test_box_iou_values():
    a = np.array([[0, 0, 10, 10], [0, 0, 0, 0]])
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
    iou = box_iou(a, b)
    assert iou.shape == (2, 3)
    np.testing.assert_allclose(iou[0], [1.0, 50 / 150, 0.0])
    np.testing.assert_allclose(iou[1], 0.0)  # a degenerate box overlaps nothing, and no division by zero


def test_track_face_fills_gaps_with_nearest_detected_box():
    boxes = {2: (10, 10, 20, 20), 5: (40, 40, 50, 50), 6: (60, 60, 70, 70)}
    dets = [[det(*boxes[t])] if t in boxes else [] for t in range(9)]
    track = track_face(dets, window=1)
    assert isinstance(track, FaceTrack)
    assert track.n_missing == 6 and track.start == 0 and len(track) == 9
    np.testing.assert_array_equal(track.detected, [t in boxes for t in range(9)])
    # Frames 0-1 before the first detection take frame 2; 3 is nearer 2, 4 nearer 5; 7-8 take the last (6).
    expected = [boxes[2], boxes[2], boxes[2], boxes[2], boxes[5], boxes[5], boxes[6], boxes[6], boxes[6]]
    np.testing.assert_array_equal(track.boxes, np.array(expected, dtype=float))


def test_nearest_fill_tie_takes_earlier_frame_and_linear_interpolates():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 0, 0], [20, 20, 30, 30]], dtype=float)
    detected = np.array([True, False, True])
    np.testing.assert_array_equal(fill_missing(boxes, detected, "nearest")[1], [0, 0, 10, 10])
    np.testing.assert_array_equal(fill_missing(boxes, detected, "linear")[1], [10, 10, 20, 20])
    with pytest.raises(ValueError, match="at least one detected"):
        fill_missing(boxes, np.zeros(3, dtype=bool))


def test_track_face_keeps_following_the_same_face_when_a_bigger_one_appears():
    small = [det(100 + 2 * t, 100, 150 + 2 * t, 150) for t in range(10)]
    big = det(300, 50, 450, 200)
    dets = [[small[t]] if t < 4 else [big, small[t]] for t in range(10)]
    track = track_face(dets, window=1)
    np.testing.assert_array_equal(track.boxes, np.array([d.box for d in small]))
    # With no previous box to follow, the largest face wins, and prefer="score" picks the most confident instead.
    first = [det(0, 0, 10, 10, score=0.99), det(50, 50, 90, 90, score=0.6)]
    np.testing.assert_array_equal(track_face([first]).boxes[0], [50, 50, 90, 90])
    np.testing.assert_array_equal(track_face([first], prefer="score").boxes[0], [0, 0, 10, 10])


def test_track_face_switches_when_the_followed_face_is_gone():
    dets = [[det(0, 0, 10, 10)], [det(100, 100, 140, 140)], [det(100, 100, 140, 140)]]
    track = track_face(dets, window=1)
    np.testing.assert_array_equal(track.boxes[1:], [[100, 100, 140, 140]] * 2)


def test_smoothing_reduces_jitter_keeps_ends_and_linear_motion():
    rng = np.random.default_rng(0)
    t = np.arange(40, dtype=float)
    clean = np.stack([100 + 3 * t, 50 + t, 200 + 3 * t, 150 + t], axis=1)  # constant-velocity box
    noisy = clean + rng.normal(0, 4, clean.shape)
    dets = [[det(*b)] for b in noisy]
    smooth = track_face(dets, window=7).boxes
    raw_err = np.abs(noisy - clean)[3:-3].mean()
    assert np.abs(smooth - clean)[3:-3].mean() < 0.6 * raw_err
    # A centred mean leaves linear motion unchanged away from the ends ...
    np.testing.assert_allclose(smooth_boxes(clean, 7)[3:-3], clean[3:-3])
    # ... and a static box is untouched everywhere, ends included (the window is truncated, not zero-padded).
    static = np.tile([10.0, 20.0, 30.0, 40.0], (6, 1))
    np.testing.assert_allclose(smooth_boxes(static, 5), static)


def test_median_smoothing_removes_a_one_frame_outlier_and_ignores_missing_frames():
    boxes = np.tile([10.0, 10.0, 50.0, 50.0], (9, 1))
    boxes[4] = [200, 200, 260, 260]
    np.testing.assert_allclose(smooth_boxes(boxes, 5, "median"), np.tile([10.0, 10.0, 50.0, 50.0], (9, 1)))
    boxes[4] = np.nan
    out = smooth_boxes(boxes, 3)
    np.testing.assert_allclose(out[3:6], [[10, 10, 50, 50]] * 3)  # the NaN frame is averaged from its neighbours
    assert np.isnan(smooth_boxes(np.full((3, 4), np.nan), 3)).all()
    with pytest.raises(ValueError, match="odd window"):
        smooth_boxes(boxes, 4)


def test_smoothing_uses_detected_frames_only():
    # A frame without detection must not drag its neighbours towards any placeholder value.
    dets = [[det(10, 10, 20, 20)], [], [det(10, 10, 20, 20)]]
    track = track_face(dets, window=3)
    np.testing.assert_allclose(track.boxes, [[10, 10, 20, 20]] * 3)
    assert track.n_missing == 1
    assert track.score == pytest.approx(0.9)


def test_no_face_anywhere_raises_with_the_video_name():
    with pytest.raises(NoFaceError, match=r"no face detected in any of the 3 frames of clip07\.mp4"):
        track_face([[], [], []], name="clip07.mp4")
    with pytest.raises(NoFaceError):
        track_face([])


def test_track_faces_separates_two_people_and_fills_gaps_in_a_track():
    left = [det(10 + t, 10, 60 + t, 60) for t in range(12)]
    right = [det(200 - t, 20, 260 - t, 80, score=0.7) for t in range(12)]
    frames = []
    for t in range(12):
        dets = [right[t]] if t in (5, 6) else [left[t], right[t]]  # left face missed on frames 5-6
        frames.append(dets if t % 2 else dets[::-1])  # detection order must not matter
    frames[0] = [left[0]]  # right face appears from frame 1
    tracks = track_faces(frames, window=1)
    assert len(tracks) == 2
    a, b = tracks
    assert (a.start, a.stop, b.start, b.stop) == (1, 12, 0, 12)  # most detections first: right (11) then left (10)
    np.testing.assert_array_equal(a.boxes, [d.box for d in right[1:]])
    assert b.n_missing == 2 and not b.detected[5] and not b.detected[6]
    np.testing.assert_array_equal(b.boxes[5], left[4].box)  # nearest fill within the track
    np.testing.assert_array_equal(b.boxes[6], left[7].box)
    assert a.score == pytest.approx(0.7)


def test_track_faces_closes_tracks_after_max_gap_and_filters_short_ones():
    face = det(0, 0, 10, 10)
    frames = [[face], [face], [], [], [], [face], [det(500, 500, 510, 510)]]
    assert [(tr.start, tr.stop) for tr in track_faces(frames, max_gap=3)] == [(0, 6), (6, 7)]  # 3 missed: bridged
    assert [(tr.start, tr.stop) for tr in track_faces(frames, max_gap=2)] == [(0, 2), (5, 6), (6, 7)]
    assert [(tr.start, tr.stop) for tr in track_faces(frames, max_gap=2, min_frames=2)] == [(0, 2)]
    assert track_faces([[], []]) == []
