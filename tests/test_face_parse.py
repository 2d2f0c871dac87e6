"""Face parsing (LaPa labels from MediaPipe face mesh + selfie segmentation) and its overlays."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from marlin.face.overlay import overlay_parse, parse_overlay_sheet, save_parse_overlay_sheet
from marlin.face.parse import LAPA_LABELS, LAPA_PALETTE, FaceRegions, LapaClass, chains_from_edges, rasterise_labels

# ---------------------------------------------------------------------------------------------------- labels, palette


def test_labels_and_palette() -> None:
    assert LAPA_LABELS == (
        "background", "skin", "right_brow", "left_brow", "right_eye", "left_eye",
        "nose", "upper_lip", "inner_mouth", "lower_lip", "hair",
    )  # fmt: skip
    assert [int(c) for c in LapaClass] == list(range(11))
    assert LAPA_PALETTE.shape == (11, 3) and LAPA_PALETTE.dtype == np.uint8
    assert len({tuple(c) for c in LAPA_PALETTE}) == 11  # every class distinguishable
    assert tuple(LAPA_PALETTE[0]) == (0, 0, 0)
    with pytest.raises(ValueError):
        LAPA_PALETTE[1] = 0  # shared constant is read-only


# ----------------------------------------------------------------------------------------------- polygons from edges


def test_chains_from_edges_loop_and_paths() -> None:
    loop = [(3, 1), (2, 3), (4, 2), (1, 4)]  # square 1-4-2-3, edges shuffled and reversed
    [(verts, closed)] = chains_from_edges(loop)
    assert closed and sorted(verts) == [1, 2, 3, 4]
    ring = verts + verts[:1]
    assert {frozenset(e) for e in zip(ring, ring[1:], strict=False)} == {frozenset(e) for e in loop}

    chains = chains_from_edges([(10, 11), (12, 11), (20, 21), (22, 21), (23, 22)])
    assert [closed for _, closed in chains] == [False, False]
    assert chains[0][0] in ([10, 11, 12], [12, 11, 10]) and chains[1][0] in ([20, 21, 22, 23], [23, 22, 21, 20])


def test_chains_from_edges_rejects_branching() -> None:
    with pytest.raises(ValueError, match="branching"):
        chains_from_edges([(0, 1), (0, 2), (0, 3)])


# --------------------------------------------------------------------------------------- rasterising a synthetic face


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int) -> np.ndarray:
    """``[n, 2]`` points; point 0 at angle 0 (image right), angles grow clockwise on screen (y down)."""
    a = np.arange(n) * 2 * np.pi / n
    return np.stack([cx + rx * np.cos(a), cy + ry * np.sin(a)], 1)


def _synthetic_face() -> tuple[np.ndarray, FaceRegions]:
    """A cartoon face on a 224x224 canvas with its own landmark numbering (not MediaPipe's)."""
    pts: list[np.ndarray] = []

    def add(p: np.ndarray) -> tuple[int, ...]:
        start = sum(len(q) for q in pts)
        pts.append(np.asarray(p, dtype=np.float64).reshape(-1, 2))
        return tuple(range(start, start + len(pts[-1])))

    oval = add(_ellipse(112, 118, 70, 90, 16))  # index 4: bottom (chin), 12: top (forehead)
    right_eye = add(_ellipse(85, 100, 10, 5, 8))  # subject's right eye: image left
    left_eye = add(_ellipse(139, 100, 10, 5, 8))
    xs = np.linspace(70, 100, 4)
    # Brow contours run the same way on the right brow and opposite ways on the left: both must give a band.
    r_up, r_lo = add(np.stack([xs, np.full(4, 72.0)], 1)), add(np.stack([xs, np.full(4, 86.0)], 1))
    l_up, l_lo = add(np.stack([xs + 54, np.full(4, 72.0)], 1)), add(np.stack([xs + 54, np.full(4, 86.0)], 1)[::-1])
    outer = add(_ellipse(112, 165, 30, 14, 12)[::-1])  # counter-clockwise: 11 image-right corner, 5 left, 2 top
    inner = add(_ellipse(112, 165, 22, 5, 8))  # 0: image-right corner, 4: image-left, 6: top
    nose = add([(112, 95), (100, 135), (124, 135), (112, 140)])
    regions = FaceRegions(
        oval=oval,
        right_eye=right_eye,
        left_eye=left_eye,
        right_brow=(r_up, r_lo),
        left_brow=(l_up, l_lo),
        lips_outer=outer,
        lips_inner=inner,
        nose=nose,
        mouth_corners_outer=(outer[5], outer[11]),
        mouth_corners_inner=(inner[4], inner[0]),
        upper_lip_outer_mid=outer[2],
        upper_lip_inner_mid=inner[6],
        nose_tip=nose[3],
        chin=oval[4],
        forehead=oval[12],
    )
    return np.concatenate(pts), regions


FEATURE_POINTS = {  # (row, col) -> expected label on the synthetic face
    (118, 60): LapaClass.SKIN,
    (75, 85): LapaClass.RIGHT_BROW,
    (83, 85): LapaClass.RIGHT_BROW,
    (79, 73): LapaClass.RIGHT_BROW,  # brow ends: filled only when the two contours join into a band, not a bow tie
    (75, 139): LapaClass.LEFT_BROW,
    (83, 139): LapaClass.LEFT_BROW,
    (79, 151): LapaClass.LEFT_BROW,
    (100, 85): LapaClass.RIGHT_EYE,
    (100, 139): LapaClass.LEFT_EYE,
    (128, 112): LapaClass.NOSE,
    (155, 112): LapaClass.UPPER_LIP,
    (165, 112): LapaClass.INNER_MOUTH,
    (176, 112): LapaClass.LOWER_LIP,
    (220, 112): LapaClass.BACKGROUND,
}


@pytest.mark.face  # OpenCV comes with the [face] extra
def test_rasterise_features_without_person_mask() -> None:
    pytest.importorskip("cv2")
    lm, regions = _synthetic_face()
    labels = rasterise_labels(lm, (224, 224), regions)
    assert labels.shape == (224, 224) and labels.dtype == np.uint8
    for (r, c), cls in FEATURE_POINTS.items():
        assert labels[r, c] == cls, f"({r}, {c}): expected {cls.name}, got {LAPA_LABELS[labels[r, c]]}"
    assert labels[5, 5] == LapaClass.BACKGROUND  # no person mask -> no hair
    assert not (labels == LapaClass.HAIR).any()


@pytest.mark.face  # OpenCV comes with the [face] extra
def test_rasterise_hair_above_nose_tip_only() -> None:
    pytest.importorskip("cv2")
    lm, regions = _synthetic_face()
    person = np.ones((224, 224), dtype=bool)
    labels = rasterise_labels(lm, (224, 224), regions, person=person)
    for (r, c), cls in FEATURE_POINTS.items():
        assert labels[r, c] == cls
    assert labels[5, 5] == labels[20, 112] == labels[100, 20] == LapaClass.HAIR  # above the tip, outside the oval
    assert labels[200, 20] == labels[215, 112] == LapaClass.BACKGROUND  # neck / body below the tip
    person[:, :40] = False  # selfie segmentation says "not person" on the left strip
    assert rasterise_labels(lm, (224, 224), regions, person=person)[100, 20] == LapaClass.BACKGROUND


@pytest.mark.face  # OpenCV comes with the [face] extra
def test_rasterise_hair_or_skin_by_colour() -> None:
    pytest.importorskip("cv2")
    lm, regions = _synthetic_face()
    person = np.ones((224, 224), dtype=bool)
    rng = np.random.default_rng(0)
    frame = np.clip(rng.normal((200, 150, 120), 4, (224, 224, 3)), 0, 255).astype(np.uint8)  # skin everywhere
    labels = rasterise_labels(lm, (224, 224), regions, person=person, frame=frame)
    assert labels[24, 112] == LapaClass.SKIN  # just above the oval: forehead beyond the mesh
    assert labels[5, 5] == LapaClass.HAIR  # skin-coloured but far from the face: still hair
    frame[:40] = (40, 30, 20)  # dark hair over the top, reaching 12 px into the oval
    labels = rasterise_labels(lm, (224, 224), regions, person=person, frame=frame)
    assert labels[34, 112] == LapaClass.HAIR  # hairline inside the oval (top at row 28), joined to hair outside
    assert labels[45, 112] == LapaClass.SKIN and labels[5, 5] == LapaClass.HAIR
    frame[50:56, 100:124] = (40, 30, 20)  # an isolated dark patch on the forehead is not hair
    assert rasterise_labels(lm, (224, 224), regions, person=person, frame=frame)[53, 112] == LapaClass.SKIN


# ------------------------------------------------------------------------------------------------------------ overlay


def test_overlay_blends_only_foreground() -> None:
    frame = np.full((6, 8, 3), 100, dtype=np.uint8)
    labels = np.zeros((6, 8), dtype=np.uint8)
    labels[2:4, 3:5] = LapaClass.NOSE
    out = overlay_parse(frame, labels, alpha=0.5)
    assert out.shape == (6, 8, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[labels == 0], frame[labels == 0])
    expected = np.round(0.5 * 100 + 0.5 * LAPA_PALETTE[LapaClass.NOSE].astype(np.float32))
    np.testing.assert_array_equal(out[2, 3], expected)
    np.testing.assert_array_equal(overlay_parse(frame, labels, alpha=1.0)[3, 4], LAPA_PALETTE[LapaClass.NOSE])


def test_overlay_rejects_bad_input() -> None:
    frame = np.zeros((6, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="labels"):
        overlay_parse(frame, np.zeros((6, 7), dtype=np.uint8))
    with pytest.raises(ValueError, match="label ids < 11"):
        overlay_parse(frame, np.full((6, 8), 11, dtype=np.uint8))
    with pytest.raises(ValueError, match="alpha"):
        overlay_parse(frame, np.zeros((6, 8), dtype=np.uint8), alpha=1.5)


def _frames_and_labels(t: int, h: int = 32, w: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8), rng.integers(0, 11, (t, h, w), dtype=np.uint8)


def test_overlay_sheet_layout() -> None:
    frames, labels = _frames_and_labels(5)
    sheet = parse_overlay_sheet(frames, labels, cols=2, legend=False)
    assert sheet.size == (2 * 40, 3 * 32)
    grid = np.asarray(sheet)
    np.testing.assert_array_equal(grid[32:64, 0:40], overlay_parse(frames[2], labels[2]))  # row 1, col 0
    assert not grid[64:, 40:].any()  # the unused sixth cell stays black
    with_legend = parse_overlay_sheet(frames, labels, cols=2)
    assert with_legend.width == 80 and with_legend.height > 96
    np.testing.assert_array_equal(np.asarray(with_legend)[:96], grid)
    with pytest.raises(ValueError, match="as many"):
        parse_overlay_sheet(frames, labels[:4])


def test_save_overlay_sheet_is_atomic(tmp_path: Path) -> None:
    from PIL import Image

    frames, labels = _frames_and_labels(3)
    out = save_parse_overlay_sheet(tmp_path / "sub" / "sheet.png", frames, labels, cols=3)
    assert out == tmp_path / "sub" / "sheet.png"
    with Image.open(out) as img:
        np.testing.assert_array_equal(np.asarray(img.convert("RGB")), np.asarray(parse_overlay_sheet(frames, labels)))
    assert [p.name for p in out.parent.iterdir()] == ["sheet.png"]  # no temp file left behind
    with pytest.raises(ValueError, match="suffix"):
        save_parse_overlay_sheet(tmp_path / "sheet.unknownext", frames, labels)
    assert not list(tmp_path.glob("*unknownext*"))


# ---------------------------------------------------------------------------------------------------- with mediapipe


@pytest.mark.face
def test_face_mesh_regions_from_connection_sets() -> None:
    pytest.importorskip("mediapipe")
    from marlin.face.parse import face_mesh_regions

    r = face_mesh_regions()
    assert len(r.oval) == 36 and len(r.right_eye) == len(r.left_eye) == 16
    assert [len(p) for p in r.right_brow + r.left_brow] == [5, 5, 5, 5]
    assert len(r.lips_outer) == len(r.lips_inner) == 20 and not set(r.lips_outer) & set(r.lips_inner)
    assert set(r.mouth_corners_outer) <= set(r.lips_outer) and set(r.mouth_corners_inner) <= set(r.lips_inner)
    assert 33 in r.right_eye and 263 in r.left_eye  # MediaPipe's RIGHT_EYE holds the subject's right outer corner
    assert r.nose_tip in r.nose and r.chin in r.oval and r.forehead in r.oval


@pytest.mark.face
def test_parser_no_face_and_bad_input() -> None:
    pytest.importorskip("mediapipe")
    from marlin.face.parse import FaceParser

    with FaceParser() as parser:
        labels = parser.parse_frames(np.zeros((2, 64, 64, 3), dtype=np.uint8))
        assert labels.shape == (2, 64, 64) and labels.dtype == np.uint8 and not labels.any()
        assert parser.n_missing == parser.n_frames == 2 and parser.last_found.tolist() == [False, False]
        parser.reset()  # new clip: tracking state dropped, counters kept
        assert not parser.parse(np.zeros((64, 64, 3), dtype=np.uint8)).any() and parser.n_missing == 3
        with pytest.raises(ValueError, match=r"\[H, W, 3\] uint8"):
            parser.parse(np.zeros((64, 64), dtype=np.uint8))
    with pytest.raises(RuntimeError, match="close"):
        parser.parse(np.zeros((64, 64, 3), dtype=np.uint8))


def _centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


@pytest.mark.face
@pytest.mark.slow
def test_parse_real_face_crops(shared_data: Path) -> None:
    av = pytest.importorskip("av")
    pytest.importorskip("mediapipe")
    from marlin.face.parse import FaceParser

    with av.open(str(shared_data / "marlin_samples" / "cropped01.mp4")) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])  # [T, 224, 224, 3]
    with FaceParser() as parser:
        start = time.perf_counter()
        labels = parser.parse_frames(frames)
        ms = (time.perf_counter() - start) / len(frames) * 1e3
        found = parser.last_found
    print(f"\nparsed {found.sum()}/{len(frames)} frames of cropped01 at {ms:.1f} ms/frame")
    assert labels.shape == frames.shape[:3] and labels.dtype == np.uint8
    assert found.mean() >= 0.9 and not labels[~found].any()
    for lab in labels[found]:
        for cls in (LapaClass.SKIN, LapaClass.RIGHT_EYE, LapaClass.LEFT_EYE, LapaClass.NOSE, LapaClass.UPPER_LIP):
            assert (lab == cls).any(), f"no {cls.name} in a parsed frame"
        assert (lab == LapaClass.LOWER_LIP).any() and (lab == LapaClass.SKIN).mean() > 0.2
        r_eye, l_eye = _centroid(lab == LapaClass.RIGHT_EYE), _centroid(lab == LapaClass.LEFT_EYE)
        nose = _centroid(lab == LapaClass.NOSE)
        mouth = _centroid((lab >= LapaClass.UPPER_LIP) & (lab <= LapaClass.LOWER_LIP))
        brows = _centroid((lab == LapaClass.RIGHT_BROW) | (lab == LapaClass.LEFT_BROW))
        assert brows[1] < min(r_eye[1], l_eye[1]) and max(r_eye[1], l_eye[1]) < nose[1] < mouth[1]
        assert r_eye[0] < lab.shape[1] / 2 < l_eye[0]  # subject's right eye on the image's left
