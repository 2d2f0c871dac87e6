"""Square-crop geometry, zero padding at frame borders, resizing, and an end-to-end crop of a synthetic video."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from marlin.face.crop import MEDIAPIPE_OFFICIAL_FRAMING, crop_face, crop_frames, square_boxes
from marlin.face.detect import Detection, detect_video
from marlin.face.track import NoFaceError, track_face


def coord_frame(h: int = 60, w: int = 80) -> np.ndarray:
    """A frame whose pixel (y, x) holds (y, x, 7): any crop can be checked against where it came from."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([yy, xx, np.full_like(yy, 7)], axis=-1).astype(np.uint8)


def test_square_boxes_centre_side_and_margin():
    sq = square_boxes(np.array([10.0, 20.0, 50.0, 40.0]))  # w=40, h=20, centre (30, 30)
    np.testing.assert_array_equal(sq, [10, 10, 50, 50])
    np.testing.assert_array_equal(square_boxes([10.0, 20.0, 50.0, 40.0], margin=0.5), [0, 0, 60, 60])
    batch = square_boxes(np.array([[0, 0, 10, 30], [5, 5, 6, 6]], dtype=float))
    assert batch.shape == (2, 4) and batch.dtype == np.int64
    np.testing.assert_array_equal(batch[:, 2] - batch[:, 0], batch[:, 3] - batch[:, 1])
    np.testing.assert_array_equal(batch[0], [-10, 0, 20, 30])
    with pytest.raises(ValueError, match="finite"):
        square_boxes([np.nan, 0, 1, 1])


def test_shift_y_moves_the_square_by_a_fraction_of_the_box_side():
    box = np.array([100.0, 100.0, 200.0, 200.0])
    np.testing.assert_array_equal(square_boxes(box, shift_y=-0.1), [100, 90, 200, 190])
    # The official-like framing: 20% bigger, centre 9% of the side higher.
    np.testing.assert_array_equal(square_boxes(box, **MEDIAPIPE_OFFICIAL_FRAMING), [90, 81, 210, 201])
    frame = coord_frame()
    np.testing.assert_array_equal(crop_face(frame, (20, 20, 40, 40), size=20, shift_y=-0.5), frame[10:30, 20:40])


def test_crop_without_resize_is_the_exact_square_slice():
    frame = coord_frame()
    out = crop_face(frame, (20, 10, 40, 30), size=20)  # 20x20 square, no resampling
    np.testing.assert_array_equal(out, frame[10:30, 20:40])
    # A wide box gives a square of side w around the same centre.
    out = crop_face(frame, (20, 15, 40, 25), size=20)
    np.testing.assert_array_equal(out, frame[10:30, 20:40])


def test_crop_zero_pads_outside_the_frame_and_keeps_the_face_centred():
    frame = coord_frame()
    out = crop_face(frame, (-10, -5, 10, 15), size=20)  # top-left quarter-ish outside the frame
    np.testing.assert_array_equal(out[5:, 10:], frame[0:15, 0:10])
    assert not out[:5].any() and not out[:, :10].any()
    out = crop_face(frame, (70, 50, 90, 70), size=20)  # bottom-right corner
    np.testing.assert_array_equal(out[:10, :10], frame[50:60, 70:80])
    assert not out[10:].any() and not out[:, 10:].any()
    assert not crop_face(frame, (500, 500, 520, 520), size=8).any()  # entirely outside: all black


def test_resize_output_shape_dtype_and_colour():
    frame = np.zeros((300, 400, 3), dtype=np.uint8)
    frame[50:250, 100:300] = (200, 30, 90)
    for size in (224, 64):  # down- and up-scaling
        out = crop_face(frame, (100, 50, 300, 250), size=size)
        assert out.shape == (size, size, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out[size // 2, size // 2], (200, 30, 90))
    big = crop_face(frame, (100, 50, 300, 250), size=224, margin=1.0)  # 400 px square: the face fills the middle half
    np.testing.assert_array_equal(big[112, 112], (200, 30, 90))
    assert not big[:40].any() and not big[:, :40].any()
    with pytest.raises(ValueError, match="resample"):
        crop_face(frame, (0, 0, 10, 10), resample="nearest-ish")
    with pytest.raises(ValueError, match="uint8 RGB"):
        crop_face(frame.astype(np.float32), (0, 0, 10, 10))


def test_crop_frames_matches_crop_face():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (5, 48, 64, 3), dtype=np.uint8)
    boxes = np.array([[5, 5, 30, 25], [10, 0, 40, 30], [-5, -5, 20, 20], [40, 20, 70, 50], [0, 0, 64, 48]], float)
    out = crop_frames(frames, boxes, size=32)
    assert out.shape == (5, 32, 32, 3)
    for t in range(5):
        np.testing.assert_array_equal(out[t], crop_face(frames[t], boxes[t], size=32))
    np.testing.assert_array_equal(crop_frames(list(frames), boxes, size=32), out)  # a list of frames works too
    with pytest.raises(ValueError, match=r"expected boxes \[T=5, 4\]"):
        crop_frames(frames, boxes[:4])


class BrightBlobDetector:
    """A stand-in detector: the 'face' is the bounding box of near-white pixels."""

    def detect(self, frame: np.ndarray) -> list[Detection]:
        ys, xs = np.nonzero(frame.min(-1) > 200)
        if len(xs) == 0:
            return []
        return [Detection(box=(float(xs.min()), float(ys.min()), xs.max() + 1.0, ys.max() + 1.0), score=1.0)]


def write_video(path: Path, frames: np.ndarray, fps: int = 25) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "10"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def read_video(path: Path) -> list[np.ndarray]:
    import av

    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_video_to_centred_crops_end_to_end(tmp_path):
    pytest.importorskip("av")
    t_max, h, w = 12, 96, 128
    frames = np.full((t_max, h, w, 3), 40, dtype=np.uint8)
    for t in range(t_max):
        if t not in (4, 5):  # a 'face' moving right, missed on two frames
            frames[t, 30:62, 10 + 6 * t : 42 + 6 * t] = 255
    path = tmp_path / "moving.mp4"
    write_video(path, frames)
    decoded = read_video(path)
    track = track_face(detect_video(decoded, BrightBlobDetector()), name=path, window=1)
    assert track.n_missing == 2
    crops = crop_frames(decoded, track.boxes, size=64, margin=1.0)  # face fills the middle half of each crop
    detected = crops[track.detected]
    assert (detected[:, 24:40, 24:40].min(-1) > 200).all()  # centre is face
    assert (detected[:, :8].max(-1) < 100).all() and (detected[:, -8:].max(-1) < 100).all()  # rim is background


def test_blank_video_raises_no_face_error(tmp_path):
    pytest.importorskip("av")
    path = tmp_path / "blank.mp4"
    write_video(path, np.full((8, 64, 64, 3), 40, dtype=np.uint8))
    detections = detect_video(read_video(path), BrightBlobDetector())
    assert len(detections) == 8
    with pytest.raises(NoFaceError, match="blank.mp4"):
        track_face(detections, name=path)
