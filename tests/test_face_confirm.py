"""Face tracks you can trust: shot cuts split tracks, weak or unverified faces give no windows, coverage per window.

Most tests use scripted detectors on synthetic two-scene videos (each frame carries its index as a small barcode,
read back by the fake detector), so they run without mediapipe; the last ones run the real detector and face mesh on
a drawn smiley and on the embedded real face clip.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from marlin.face.detect import Detection
from marlin.face.track import NoFaceError
from marlin.video.faces import FaceChecks, plan_face_crops
from marlin.video.pipeline import clip_windows
from marlin.video.shots import CutDetector, frame_signature, shot_spans, signature_distance
from videogen import frame_index, make_frame
from videogen import write_video as write_test_video

SIDE = 96
CUT = 40  # the second scene starts here
SCENES = [(70, 110, 160), (200, 160, 60)]  # base colours of scene A and scene B


def two_scenes(i: int, height: int = SIDE, width: int = SIDE) -> np.ndarray:
    """A frame of scene A (before CUT) or B: a flat colour with a slow gradient, and the frame index as a barcode."""
    base = np.array(SCENES[i >= CUT], dtype=np.float32)
    ramp = np.linspace(-20, 20, width, dtype=np.float32)[None, :, None] + (i % 7)  # a little motion
    frame = np.clip(base + ramp, 0, 255).astype(np.uint8).repeat(height, 0)
    frame[:16] = make_frame(i, 16, width)
    return frame


class ScriptedDetector:
    """Returns the detections scripted for each frame index (read from the barcode)."""

    def __init__(self, script: dict[int, list[Detection]]) -> None:
        self.script, self.calls = script, []

    def detect(self, frame: np.ndarray) -> list[Detection]:
        i = frame_index(frame[:16])
        self.calls.append(i)
        return list(self.script.get(i, []))

    def close(self) -> None:
        pass


class ScriptedVerifier:
    """Says a box is a face unless its left edge is in `fakes`."""

    def __init__(self, fakes: set[float] = frozenset()) -> None:
        self.fakes, self.calls = set(fakes), 0

    def verify(self, frame: np.ndarray, box) -> bool:
        self.calls += 1
        return float(box[0]) not in self.fakes

    def close(self) -> None:
        pass


FACE = (30.0, 30.0, 70.0, 70.0)
FAKE = (5.0, 20.0, 25.0, 40.0)


def det(box=FACE, score: float = 0.9) -> list[Detection]:
    return [Detection(box=box, score=score)]


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_video(tmp_path_factory.mktemp("scenes") / "two.mp4", 80, SIDE, SIDE, frame_fn=two_scenes)


def windows_of(video: Path, script, checks=None, verifier=None, **kw):
    """clip_windows with a scripted detector; the verifier is injected through plan_face_crops' default."""
    import marlin.video.faces as faces

    original = faces._default_verifier
    faces._default_verifier = lambda: verifier
    try:
        return clip_windows(video, clip_frames=8, img_size=32, sample_rate=2, stride=8, crop_face=True,
                            detector=ScriptedDetector(script), checks=checks or FaceChecks(), **kw)  # fmt: skip
    finally:
        faces._default_verifier = original


# ---- shots ----------------------------------------------------------------------------------------------------------
def test_signature_distance_is_zero_for_one_frame_and_large_across_scenes() -> None:
    a, b = frame_signature(two_scenes(3)), frame_signature(two_scenes(CUT + 3))
    assert signature_distance(a, a) == (0.0, 0.0)
    d_hist, d_pix = signature_distance(a, b)
    assert d_hist > 0.5 and d_pix > 0.05


def test_the_cut_detector_finds_the_cut_and_nothing_else(video: Path) -> None:
    from marlin.video.io import iter_frames

    cutter = CutDetector()
    cuts = [i for i, f in enumerate(iter_frames(video)) if cutter.update(f)]
    assert cuts == [CUT]


def test_a_camera_pan_over_one_scene_is_not_a_cut() -> None:
    rng = np.random.default_rng(0)
    scene = rng.integers(0, 256, (120, 400, 3), dtype=np.uint8)  # a busy scene...
    scene = np.repeat(np.repeat(scene[:, ::8], 8, axis=1), 1, axis=0)[:, :400]  # ...of vertical blocks
    cutter = CutDetector()
    assert not any(cutter.update(np.ascontiguousarray(scene[:, x : x + 160])) for x in range(0, 200, 4))


def test_shot_spans() -> None:
    assert shot_spans(10, []) == [(0, 10)]
    assert shot_spans(10, [4, 4, 0, 12]) == [(0, 4), (4, 10)]


# ---- plans and windows ----------------------------------------------------------------------------------------------
def test_no_box_is_borrowed_across_a_cut(video: Path) -> None:
    """A face in scene A only: scene B gets no box and no window (it used to be cropped with A's boxes)."""
    script = {i: det() for i in range(0, CUT, 2)}
    [plan] = plan_face_crops(video, ScriptedDetector(script), every=2, checks=FaceChecks(verify=False))
    assert plan.cuts == (CUT,)
    assert plan.box(CUT - 1) is not None and plan.box(CUT) is None and plan.box(79) is None
    [stream] = windows_of(video, script, FaceChecks(verify=False))
    assert stream.window_frames and all(max(w) < CUT for w in stream.window_frames)
    # without cut detection the same script crops scene B with scene A's box (the old behaviour)
    [old] = windows_of(video, script, FaceChecks(verify=False, cuts=False, min_face_fraction=0.0))
    assert any(max(w) >= CUT for w in old.window_frames)


def test_windows_of_a_second_shot_start_on_its_own_grid(video: Path) -> None:
    script = {i: det() for i in range(80)}
    [stream] = windows_of(video, script, FaceChecks(verify=False))
    starts = [w[0] for w in stream.window_frames]
    assert CUT in starts and all(not (min(w) < CUT <= max(w)) for w in stream.window_frames)
    assert stream.window_coverage == [1.0] * len(starts)


def test_weak_detections_are_not_faces(video: Path) -> None:
    """The issue's case: a clip with no person, low-confidence detections (0.50-0.61) on a few frames."""
    script = {i: det(score=0.55) for i in (4, 10, 30, 50, 60, 70)}
    with pytest.raises(NoFaceError, match="below 0.6"):
        windows_of(video, script, FaceChecks(verify=False))


def test_a_face_on_few_frames_gives_no_window(video: Path) -> None:
    """Confident but sparse detections: every window's coverage is below --min-face-fraction."""
    script = {i: det() for i in (4, 30, 50, 70)}
    with pytest.raises(NoFaceError, match="at least 50%"):
        windows_of(video, script, FaceChecks(verify=False))
    [stream] = windows_of(video, script, FaceChecks(verify=False, min_face_fraction=0.1))
    assert stream.window_coverage and all(0.1 <= c < 0.5 for c in stream.window_coverage)


def test_coverage_counts_detected_frames_of_each_window(video: Path) -> None:
    script = {i: det() for i in range(0, 8, 2)}  # the first window (frames 0..14 every 2): frames 0, 2, 4, 6
    [stream] = windows_of(video, script, FaceChecks(verify=False, min_face_fraction=0.0))
    assert stream.window_frames[0] == list(range(0, 16, 2))
    assert stream.window_coverage[0] == pytest.approx(0.5)
    kept = windows_of(video, script, FaceChecks(verify=False))[0]
    assert kept.window_frames == [list(range(0, 16, 2))] and kept.window_coverage == [0.5]
    assert kept.n_faceless == 4  # frames 8, 10, 12, 14 borrowed their box


def test_a_track_the_verifier_rejects_gives_no_face(video: Path) -> None:
    script = {i: det(FAKE) for i in range(0, 80, 2)}
    verifier = ScriptedVerifier({FAKE[0]})
    with pytest.raises(NoFaceError, match="face mesh found no face"):
        windows_of(video, script, verifier=verifier)
    assert 0 < verifier.calls <= 10  # a few checks per shot, not one per frame


def test_all_faces_keeps_the_verified_track_only(video: Path) -> None:
    script = {i: det(FACE) + det(FAKE, 0.95) for i in range(0, CUT, 2)}
    streams = windows_of(video, script, verifier=ScriptedVerifier({FAKE[0]}), all_faces=True)
    assert [s.track for s in streams] == [0]
    # the main face is the largest one: a larger fake must not take it
    big_fake = (0.0, 0.0, 90.0, 90.0)
    script = {i: det(FACE) + det(big_fake) for i in range(0, CUT, 2)}
    import marlin.video.faces as faces

    original = faces._default_verifier
    faces._default_verifier = lambda: ScriptedVerifier({0.0})
    try:
        [plan] = plan_face_crops(video, ScriptedDetector(script), every=2)
    finally:
        faces._default_verifier = original
    assert np.allclose(plan.track.boxes[0], FACE, atol=1e-6)


def test_the_default_verifier_is_built_once_per_process(video: Path, monkeypatch) -> None:
    """One face-mesh graph per process, not per video: building one per video cost time and printed MediaPipe's
    native log lines once per video in `marlin prepare` (seen in its worker output)."""
    import marlin.face.verify
    import marlin.video.faces as faces

    built = []

    class CountingVerifier(ScriptedVerifier):
        def __init__(self) -> None:
            super().__init__()
            built.append(self)

    monkeypatch.setattr(marlin.face.verify, "MeshVerifier", CountingVerifier)
    monkeypatch.setattr(faces, "_VERIFIERS", {})
    script = {i: det() for i in range(80)}
    for _ in range(3):
        faces.plan_face_crops(video, ScriptedDetector(script))
    assert len(built) == 1 and built[0].calls >= 3  # the one verifier checked the tracks of all three videos


def test_face_checks_refuse_bad_values() -> None:
    with pytest.raises(ValueError, match="min_face_fraction"):
        FaceChecks(min_face_fraction=1.5)
    with pytest.raises(ValueError, match="verify_every"):
        FaceChecks(verify_every=0)


# ---- the real detector and face mesh ---------------------------------------------------------------------------------
def _smiley_clip(path: Path) -> Path:
    cv2 = pytest.importorskip("cv2")
    from marlin.video.io import write_video

    rng = np.random.default_rng(0)
    y = np.linspace(0, 1, 360)[:, None, None]
    sky = (1 - y) * np.array([90, 150, 235]) + y * np.array([200, 220, 250])  # [360, 1, 3]
    clouds = cv2.resize(cv2.GaussianBlur(rng.random((45, 60)).astype(np.float32), (0, 0), 2), (480, 360))
    frames = []
    for t in range(40):
        f = np.clip(sky + 60 * np.roll(clouds, 3 * t, axis=1)[..., None], 0, 255).astype(np.uint8)
        cx, cy = 150 + 2 * t, 180
        cv2.circle(f, (cx, cy), 70, (250, 220, 40), -1)
        for dx in (-25, 25):
            cv2.circle(f, (cx + dx, cy - 20), 9, (20, 20, 20), -1)
        cv2.ellipse(f, (cx, cy + 10), (35, 25), 0, 20, 160, (20, 20, 20), 5)
        frames.append(f)
    return write_video(path, np.stack(frames), fps=25)


def test_a_drawn_smiley_is_detected_but_not_confirmed(tmp_path: Path) -> None:
    pytest.importorskip("mediapipe")
    from marlin.face.detect import create_detector

    clip = _smiley_clip(tmp_path / "smiley.mp4")
    with create_detector("mediapipe") as detector:
        [plan] = plan_face_crops(clip, detector, checks=FaceChecks(verify=False))  # the detector alone: a "face"
        assert plan.track.detected.mean() > 0.3
        with pytest.raises(NoFaceError, match="face mesh"):
            clip_windows(clip, crop_face=True, detector=detector)


def test_the_embedded_real_face_keeps_every_window(tmp_path: Path) -> None:
    pytest.importorskip("mediapipe")
    from marlin.face.detect import create_detector
    from marlin.viz.sample import make_sample_clip

    clip = make_sample_clip(tmp_path / "face.mp4")
    with create_detector("mediapipe") as detector:
        [off] = clip_windows(clip, crop_face=True, detector=detector, checks=FaceChecks(verify=False, cuts=False,
                             min_score=0.5, min_face_fraction=0.0))  # fmt: skip
        [on] = clip_windows(clip, crop_face=True, detector=detector)
    assert on.window_frames == off.window_frames and min(on.window_coverage) >= 0.9


# ---- through `marlin extract` ----------------------------------------------------------------------------------------
def test_extract_marks_a_smiley_no_face_and_records_the_coverage_of_a_real_face(tmp_path: Path, capsys) -> None:
    pytest.importorskip("mediapipe")
    import csv

    from marlin.cli import main
    from marlin.viz.sample import make_sample_clip

    (tmp_path / "in").mkdir()
    _smiley_clip(tmp_path / "in" / "smiley.mp4")
    make_sample_clip(tmp_path / "in" / "face.mp4")
    argv = ["extract", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--model", "marlin_vit_tiny_test",
            "--random-init", "--crop-face", "--workers", "0", "--no-progress", "--dtype", "fp32"]  # fmt: skip
    assert main(argv) == 1  # one input has no face
    rows = {Path(r["input"]).name: r for r in csv.DictReader(open(tmp_path / "out" / "index.csv"))}
    assert rows["smiley.mp4"]["status"] == "no_face" and "face mesh" in rows["smiley.mp4"]["error"]
    assert not (tmp_path / "out" / "smiley.npy").exists()
    face = rows["face.mp4"]
    assert face["status"] == "ok" and float(face["face_coverage"]) >= 0.9 and int(face["windows"]) >= 1
    # with the checks off (the planner before) the smiley's windows are written as an ok "face"
    off = ["--no-verify-faces", "--min-score", "0.5", "--min-face-fraction", "0"]
    assert main([*argv, *off, "-o", str(tmp_path / "out2")]) == 0
    rows = {Path(r["input"]).name: r for r in csv.DictReader(open(tmp_path / "out2" / "index.csv"))}
    assert rows["smiley.mp4"]["status"] == "ok"
    capsys.readouterr()


def test_extract_refuses_a_face_fraction_outside_0_1(tmp_path: Path, capsys) -> None:
    from marlin.cli import main

    clip = write_test_video(tmp_path / "v.mp4", 4)
    rc = main(["extract", str(clip), "-o", str(tmp_path / "o"), "--model", "marlin_vit_tiny_test",
               "--random-init", "--crop-face", "--min-face-fraction", "1.5"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "min_face_fraction" in err
