"""Detector interface, and the bundled backends on real faces that ship offline (skipped when unavailable)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from marlin.face.detect import Detection, FaceDetector, boxes_array, check_frame, create_detector, detect_video
from marlin.face.track import NoFaceError, box_iou, track_face

SHARED = Path(os.environ.get("MARLIN_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
SAMPLES = SHARED / "marlin_samples"


def read_frames(path: Path, every: int = 1, limit: int | None = None) -> list[np.ndarray]:
    av = pytest.importorskip("av")
    if not path.is_file():
        pytest.skip(f"{path} not present (shared data)")
    out = []
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if limit is not None and len(out) >= limit:
                break
            if i % every == 0:
                out.append(frame.to_ndarray(format="rgb24"))
    return out


def hopper() -> np.ndarray:
    """Grace Hopper's portrait (US Navy photo, public domain) shipped in matplotlib's sample data, 512x600."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or spec.origin is None:
        pytest.skip("matplotlib (which ships the sample face photo) is not installed")
    path = Path(spec.origin).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


class ConstantDetector:
    def __init__(self, box=(1.0, 2.0, 3.0, 4.0)):
        self.box = box
        self.calls = 0

    def detect(self, frame: np.ndarray) -> list[Detection]:
        self.calls += 1
        return [Detection(box=self.box, score=0.5)]


def test_detection_geometry_and_protocol():
    d = Detection(box=(10.0, 20.0, 50.0, 40.0), score=0.8)
    assert (d.width, d.height, d.area, d.center) == (40.0, 20.0, 800.0, (30.0, 30.0))
    assert Detection(box=(5.0, 5.0, 1.0, 9.0), score=0.1).area == 0.0
    assert Detection(d.box, 0.8, keypoints=np.zeros((6, 2))) == d  # keypoint arrays do not break equality
    assert isinstance(ConstantDetector(), FaceDetector)
    np.testing.assert_array_equal(boxes_array([d, d]), [[10, 20, 50, 40]] * 2)
    assert boxes_array([]).shape == (0, 4)


def test_detect_video_uses_a_given_detector_on_every_frame_of_an_iterable():
    detector = ConstantDetector()
    frames = (np.zeros((4, 4, 3), np.uint8) for _ in range(3))  # a generator, as a decoder would give
    out = detect_video(frames, detector)
    assert detector.calls == 3 and [len(d) for d in out] == [1, 1, 1]
    with pytest.raises(TypeError, match="only apply when detector is a name"):
        detect_video([], detector, min_score=0.3)


def test_bad_inputs_fail_with_clear_errors():
    with pytest.raises(ValueError, match="expected one of"):
        create_detector("retinaface")
    with pytest.raises(ValueError, match=r"expected a uint8 RGB array \[H, W, 3\], got dtype float32"):
        check_frame(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        check_frame(np.zeros((4, 4), np.uint8))
    frame = np.zeros((4, 6, 3), np.uint8)[:, ::2]  # non-contiguous views are accepted and made contiguous
    assert check_frame(frame).flags.c_contiguous


@pytest.mark.face
@pytest.mark.parametrize("model", ["short", "full", "auto"])
def test_mediapipe_finds_the_face_in_a_portrait(model):
    pytest.importorskip("mediapipe")
    image = hopper()
    with create_detector("mediapipe", model=model) as detector:
        dets = detector.detect(image)
        again = detector.detect(image)  # the graph is reused: same answer on the second call
    assert len(dets) == 1 and dets[0].score > 0.7
    np.testing.assert_allclose(again[0].box, dets[0].box, atol=1e-3)
    # Measured face box about (170, 140, 366, 340): assert it is there to within a fifth of the face size.
    assert box_iou(np.array(dets[0].box), np.array([170, 140, 366, 340]))[0, 0] > 0.6
    kps = dets[0].keypoints
    assert kps.shape == (6, 2)
    right_eye, left_eye, nose, mouth = kps[:4]
    assert right_eye[0] < nose[0] < left_eye[0]  # subject's right eye is on the image's left
    assert max(right_eye[1], left_eye[1]) < nose[1] < mouth[1]  # eyes above nose above mouth


@pytest.mark.face
def test_mediapipe_close_reopen_and_blank_frames():
    pytest.importorskip("mediapipe")
    detector = create_detector("mediapipe", model="auto", min_score=0.5)
    assert detector.detect(np.zeros((240, 320, 3), np.uint8)) == []
    image = hopper()
    detector.close()
    assert len(detector.detect(image)) == 1  # graphs rebuilt on demand after close()
    detector.close()
    with pytest.raises(ValueError, match="model"):
        create_detector("mediapipe", model="medium")


@pytest.mark.face
def test_haar_agrees_with_mediapipe_on_a_portrait():
    pytest.importorskip("cv2")
    pytest.importorskip("mediapipe")
    image = hopper()
    with create_detector("haar") as haar, create_detector("mediapipe") as mp:
        hd, md = haar.detect(image), mp.detect(image)
    assert len(hd) == 1 and 0 < hd[0].score <= 1 and hd[0].keypoints is None
    assert box_iou(np.array(hd[0].box), np.array(md[0].box))[0, 0] > 0.5


@pytest.mark.face
def test_mediapipe_on_real_video_frames_and_a_tight_crop():
    pytest.importorskip("mediapipe")
    frame = read_frames(SAMPLES / "video01.mp4", limit=1)[0]
    crop = read_frames(SAMPLES / "cropped01.mp4", limit=1)[0]
    with create_detector("mediapipe", model="auto") as detector:
        (face,) = detector.detect(frame)
        crop_faces = detector.detect(crop)
    h, w = frame.shape[:2]
    x1, y1, x2, y2 = face.box
    assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h and face.score > 0.8
    # In an official 224x224 crop the face fills most of the frame and sits in the middle.
    assert len(crop_faces) == 1 and crop_faces[0].width > 0.5 * 224
    cx, cy = crop_faces[0].center
    assert abs(cx - 112) < 30 and abs(cy - 112) < 40


@pytest.mark.face
def test_blank_video_with_mediapipe_raises_no_face_error(tmp_path):
    av = pytest.importorskip("av")
    pytest.importorskip("mediapipe")
    path = tmp_path / "empty_room.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        for t in range(6):
            frame = np.full((120, 160, 3), 30 + 10 * t, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    detections = detect_video(read_frames(path), "mediapipe")
    assert len(detections) == 6
    with pytest.raises(NoFaceError, match="empty_room.mp4"):
        track_face(detections, name=path)


@pytest.mark.face
@pytest.mark.slow
@pytest.mark.parametrize("name", [f"video0{i}.mp4" for i in range(1, 6)] + ["cropped01.mp4", "cropped03.mp4"])
def test_mediapipe_coverage_on_marlin_samples(name):
    pytest.importorskip("mediapipe")
    frames = read_frames(SAMPLES / name, every=3)
    lit = [frame.mean() >= 10 for frame in frames]  # video05 fades in from black: no face to find there
    detections = detect_video(frames, "mediapipe", model="auto")
    found = np.mean([len(d) > 0 for d, keep in zip(detections, lit, strict=True) if keep])
    assert found >= 0.95, f"{name}: face found in {found:.0%} of sampled non-black frames"


# ---- MediaPipe native log lines ------------------------------------------------------------------------------------
_NATIVE_SCRIPT = """
import os, sys, numpy as np
from marlin.face.detect import create_detector
from marlin.face.verify import MeshVerifier
from marlin.face.parse import FaceParser
f = np.zeros((64, 64, 3), np.uint8)
print("before", file=sys.stderr, flush=True)
create_detector("mediapipe").detect(f)
MeshVerifier().verify(f, (8, 8, 40, 40))
FaceParser().parse(f)
print("after", file=sys.stderr, flush=True)
"""


@pytest.mark.parametrize("debug", [False, True])
def test_mediapipe_native_log_lines_reach_the_terminal_only_when_debugging(debug: bool) -> None:
    pytest.importorskip("mediapipe")
    import os
    import subprocess
    import sys

    from marlin.utils.quiet import NATIVE_LOG_LINE

    env = {k: v for k, v in os.environ.items() if k != "MARLIN_DEBUG"} | ({"MARLIN_DEBUG": "1"} if debug else {})
    err = subprocess.run([sys.executable, "-c", _NATIVE_SCRIPT], env=env, capture_output=True, text=True,
                         check=True).stderr  # fmt: skip
    native = [line for line in err.splitlines() if NATIVE_LOG_LINE.match(line)]
    assert "before" in err and "after" in err
    assert (len(native) >= 3) if debug else native == [], err


def test_quiet_native_logs_passes_other_lines_through(capfd: pytest.CaptureFixture[str]) -> None:
    import os

    from marlin.utils.quiet import quiet_native_logs

    with quiet_native_logs():
        os.write(2, b"W0000 00:00:1796556797.860204   22147 inference_feedback_manager.cc:114] Feedback manager\n")
        os.write(2, b"a real problem\n")
    err = capfd.readouterr().err
    assert err == "a real problem\n"
