"""Tests for marlin.viz.masks (mask pictures) and `marlin masks`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from marlin.cli import main
from marlin.mae.masking import generate_visible
from marlin.video.io import write_video
from marlin.viz.masks import HIDDEN_GREY, VISIBLE_OUTLINE, load_face_clip, mask_frame, mask_sheet, save_mask_sheet
from videogen import frame_index, make_frame


def rgb_noise(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


# ---- drawing ---------------------------------------------------------------------------------------------------------
def test_mask_frame_keeps_visible_patches_and_greys_hidden_ones():
    frame = rgb_noise(32, 48)
    visible = np.array([[True, False, False], [False, False, True]])
    out = mask_frame(frame, visible, patch=16, hatch=0, outline=False)
    np.testing.assert_array_equal(out[:16, :16], frame[:16, :16])  # visible: untouched
    np.testing.assert_array_equal(out[16:, 32:], frame[16:, 32:])
    hidden_in, hidden_out = frame[:16, 16:32].astype(float), out[:16, 16:32].astype(float)
    expected = 0.35 * hidden_in + 0.65 * np.asarray(HIDDEN_GREY, dtype=float)
    assert np.abs(hidden_out - expected).max() <= 0.5  # blended towards grey
    assert hidden_out.std() < 0.5 * hidden_in.std()


def test_mask_frame_outline_and_hatch():
    frame = np.zeros((32, 32, 3), np.uint8)
    out = mask_frame(frame, np.array([[True, False], [False, False]]), patch=16, hatch=4)
    assert (out[0, :16] == VISIBLE_OUTLINE).all() and (out[:16, 15] == VISIBLE_OUTLINE).all()
    assert (out[5:10, 5:10] == 0).all()  # inside a visible patch: the frame itself
    hidden = out[16:, 16:]
    assert len(np.unique(hidden.reshape(-1, 3), axis=0)) == 2  # grey + hatch lines


def test_mask_frame_rejects_a_grid_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"bool visibility grid \[2, 2\]"):
        mask_frame(np.zeros((32, 32, 3), np.uint8), np.ones((2, 3), bool), patch=16)
    with pytest.raises(ValueError, match=r"bool visibility grid"):
        mask_frame(np.zeros((32, 32, 3), np.uint8), np.ones((2, 2), np.uint8), patch=16)


def test_mask_sheet_layout_and_checks():
    frames = rgb_noise(4, 32, 32)
    visible = generate_visible("random", 1, clip_frames=4, tubelet=2, img_size=32, patch=16, mask_ratio=0.5)[0]
    parse = np.zeros((4, 32, 32), np.uint8)
    with_parse = mask_sheet(frames, visible.numpy(), parse=parse, tubelet=2, patch=16, title="t")
    without = mask_sheet(frames, visible.numpy(), tubelet=2, patch=16)
    assert with_parse.width == without.width  # one column per tubelet: 2
    assert with_parse.height - without.height == 32 + 4 + 26  # one more row (+ pad) and the title bar
    big = mask_sheet(frames, visible.numpy(), tubelet=2, patch=16, tile=64)
    assert big.height > without.height and big.width > without.width
    with pytest.raises(ValueError, match="8 tokens"):
        mask_sheet(frames, np.ones(9, bool), tubelet=2, patch=16)
    with pytest.raises(ValueError, match="divisible by tubelet=2"):
        mask_sheet(frames[:3], visible.numpy(), tubelet=2, patch=16)
    with pytest.raises(ValueError, match="expected parse"):
        mask_sheet(frames, visible.numpy(), parse=parse[:2], tubelet=2, patch=16)


def test_mask_sheet_shows_the_mask_per_tubelet():
    """The masked row of tubelet k is the first frame of tubelet k with exactly that tubelet's hidden patches."""
    frames = np.full((4, 32, 32, 3), 200, np.uint8)
    grid = np.zeros((2, 2, 2), bool)
    grid[0, 0, 0] = grid[1, 1, 1] = True
    sheet = np.asarray(mask_sheet(frames, grid.reshape(-1), tubelet=2, patch=16))
    top, left, step = 36 + 32 + 4, 62 + 4, 32 + 4  # header, crop row + pad; row labels + pad; panel + pad
    for k in range(2):
        panel = sheet[top : top + 32, left + k * step : left + k * step + 32]
        for r in range(2):
            for c in range(2):
                inner = panel[r * 16 + 2 : r * 16 + 14, c * 16 + 2 : c * 16 + 14]  # inside the outline
                assert (inner == 200).all() == bool(grid[k, r, c]), (k, r, c)


def test_save_mask_sheet_is_atomic_png(tmp_path):
    frames = rgb_noise(4, 32, 32)
    visible = np.ones(8, bool)
    path = save_mask_sheet(tmp_path / "m.png", frames, visible, tubelet=2, patch=16)
    assert Image.open(path).mode == "RGB"
    small = save_mask_sheet(tmp_path / "p.png", frames, visible, tubelet=2, patch=16, palette=True)
    assert Image.open(small).mode == "P"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.png", "p.png"]
    with pytest.raises(ValueError, match="image suffix"):
        save_mask_sheet(tmp_path / "m.xyz", frames, visible)


# ---- reading a clip --------------------------------------------------------------------------------------------------
def test_load_face_clip_without_cropping_pads_short_videos(tmp_path):
    write_video(tmp_path / "v.mp4", np.stack([make_frame(k, 64, 64) for k in range(10)]), preset="ultrafast")
    clip, indices, cropped = load_face_clip(tmp_path / "v.mp4", start=3, sample_rate=2, clip_frames=6, size=64)
    assert not cropped  # already size x size: "auto" does not crop
    assert indices == [3, 5, 7, 9, 9, 9]
    assert [frame_index(f) for f in clip] == [3, 5, 7, 9, 9, 9]
    with pytest.raises(ValueError, match="past the end"):
        load_face_clip(tmp_path / "v.mp4", start=10, clip_frames=2, size=64)


# ---- the command -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["random", "tube", "frame"])
def test_masks_command_non_face_strategies(tmp_path, capsys, strategy):
    write_video(tmp_path / "v.mp4", rgb_noise(8, 32, 32), preset="ultrafast")
    out = tmp_path / "m.png"
    rc = main(["masks", str(tmp_path / "v.mp4"), "--strategy", strategy, "--no-parse", "--out", str(out),
               "--model", "marlin_vit_tiny_test", "--mask-ratio", "0.5"])  # fmt: skip
    assert rc == 0
    assert f"{strategy}: 4/8 tokens visible" in capsys.readouterr().out
    assert Image.open(out).size[0] > 2 * 32


def test_masks_command_refuses_fasking_without_parse(tmp_path, capsys):
    write_video(tmp_path / "v.mp4", rgb_noise(8, 32, 32), preset="ultrafast")
    rc = main(["masks", str(tmp_path / "v.mp4"), "--no-parse", "--out", str(tmp_path / "m.png")])
    assert rc == 2 and "needs the face parse" in capsys.readouterr().err


def test_masks_command_reports_a_bad_video(tmp_path, capsys):
    (tmp_path / "v.mp4").write_bytes(b"nope")
    rc = main(["masks", str(tmp_path / "v.mp4"), "--strategy", "tube", "--no-parse", "--out", str(tmp_path / "m.png")])
    assert rc == 2 and "not a video file" in capsys.readouterr().err
    assert not (tmp_path / "m.png").exists()


@pytest.mark.face
@pytest.mark.slow
def test_masks_command_fasking_on_a_real_face(tmp_path, capsys):
    """An in-the-wild clip is face-cropped and parsed; fasking hides the face components, fasking_opp shows them."""
    pytest.importorskip("mediapipe")
    from marlin.face.parse import FaceParser
    from test_prepare import face_video

    video = face_video(tmp_path / "hopper.mp4", n=8)
    rc = main(["masks", str(video), "--out", str(tmp_path / "m.png"), "--sample-rate", "1", "--tile", "64"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "fasking: 156/1568 tokens visible" in text
    assert "frames 0-7 step 1 (padded), face cropped, face parsed in 16/16 frames" in text
    assert (tmp_path / "m.png").is_file()

    clip, _, _ = load_face_clip(video, sample_rate=1)
    with FaceParser() as parser:
        parse = torch.from_numpy(parser.parse_frames(clip))[None]  # [1, 16, 224, 224]
    component = (parse >= 2) & (parse <= 9)  # brows, eyes, nose, lips, mouth
    has_component = component[:, ::2].reshape(1, 8, 14, 16, 14, 16).any(-1).any(-2).reshape(1, -1)  # [1, 1568]
    shown = {}
    for strategy in ("fasking", "fasking_opp"):
        visible = generate_visible(strategy, 1, parse=parse, generator=torch.Generator().manual_seed(0))
        shown[strategy] = int((visible & has_component).sum())
    assert shown["fasking"] < 10 < 100 < shown["fasking_opp"]
