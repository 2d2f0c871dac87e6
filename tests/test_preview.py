"""Contact sheets (layout, frame sampling, labels, atomic save) and box overlays."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from marlin.face.detect import Detection
from marlin.viz.preview import contact_sheet, draw_boxes, save_contact_sheet


def solid_frames(n: int, h: int = 30, w: int = 40) -> np.ndarray:
    """Frame t is filled with the colour (t, 255 - t, 128), so a tile tells which frame it shows."""
    frames = np.empty((n, h, w, 3), dtype=np.uint8)
    for t in range(n):
        frames[t] = (t, 255 - t, 128)
    return frames


def tile_centre(sheet: Image.Image, i: int, cols: int, tw: int, th: int, pad: int) -> tuple[int, ...]:
    x = pad + (i % cols) * (tw + pad) + tw // 2
    y = pad + (i // cols) * (th + pad) + th // 2
    return sheet.getpixel((x, y))


def test_layout_and_even_sampling_keep_first_and_last_frames():
    sheet = contact_sheet(solid_frames(20), cols=4, max_frames=8, tile=40, pad=2, labels=[""] * 20)
    tw, th = 40, 30  # the 40x30 frames fit a 40 px tile unchanged
    assert sheet.size == (4 * tw + 5 * 2, 2 * th + 3 * 2)
    shown = [tile_centre(sheet, i, 4, tw, th, 2)[0] for i in range(8)]  # red channel = frame index
    assert shown == [0, 3, 5, 8, 11, 14, 16, 19]
    assert sheet.getpixel((0, 0)) == (32, 32, 32)  # background in the gaps


def test_short_videos_use_one_row_and_all_frames():
    sheet = contact_sheet(list(solid_frames(3)), cols=8, max_frames=16, tile=20, pad=0, labels=["", "", ""])
    assert sheet.size == (3 * 20, 15)
    assert [tile_centre(sheet, i, 8, 20, 15, 0)[0] for i in range(3)] == [0, 1, 2]
    assert contact_sheet(solid_frames(30), max_frames=None, cols=10, tile=8).size[1] == 3 * 6 + 4 * 2


def test_labels_are_drawn_and_validated():
    frames = solid_frames(2, 64, 64)
    plain = np.asarray(contact_sheet(frames, labels=["", ""]))
    labelled = np.asarray(contact_sheet(frames, labels=["frame A", ""]))
    diff = np.abs(plain.astype(int) - labelled).sum(-1) > 0
    assert diff[:, : 64 + 2].any() and not diff[:, 64 + 2 :].any()  # only the first tile changed
    with pytest.raises(ValueError, match="expected 2 labels"):
        contact_sheet(frames, labels=["x"])
    with pytest.raises(ValueError, match="uint8 frames"):
        contact_sheet([np.zeros((4, 4, 3), np.float32)])


def test_frames_of_different_sizes_fit_their_tiles():
    frames = [np.full((100, 50, 3), 200, np.uint8), np.full((20, 80, 3), 100, np.uint8)]
    sheet = contact_sheet(frames, tile=50, pad=0, labels=["", ""])
    assert sheet.size == (2 * 25, 50)  # tiles take the first frame's aspect ratio
    assert sheet.getpixel((37, 25)) == (100, 100, 100)  # the wide frame is letterboxed inside its tile
    assert sheet.getpixel((37, 2)) == (32, 32, 32)
    small = contact_sheet([np.full((10, 10, 3), 90, np.uint8)], tile=40, pad=0, labels=[""])
    assert small.size == (40, 40) and small.getpixel((38, 38)) == (90, 90, 90)  # small frames are enlarged


def test_save_contact_sheet_writes_atomically(tmp_path):
    path = tmp_path / "sheets" / "clip.png"
    assert save_contact_sheet(path, solid_frames(4), tile=20) == path
    first = Image.open(path)
    assert first.format == "PNG" and first.size == contact_sheet(solid_frames(4), tile=20).size
    save_contact_sheet(path, solid_frames(12), tile=20, cols=2)  # overwrite in place
    assert Image.open(path).size == contact_sheet(solid_frames(12), tile=20, cols=2).size
    assert sorted(p.name for p in path.parent.iterdir()) == ["clip.png"]  # no temporary files left behind
    with pytest.raises(ValueError, match="image suffix"):
        save_contact_sheet(tmp_path / "clip.notanimage", solid_frames(2))


def test_draw_boxes_outlines_without_touching_the_input():
    frame = np.zeros((50, 60, 3), np.uint8)
    out = draw_boxes(frame, np.array([[10, 10, 30, 40]]), labels=[""], color=(255, 0, 0), width=1)
    assert not frame.any()  # the input is not modified
    assert tuple(out[10, 20]) == (255, 0, 0) and tuple(out[40, 30]) == (255, 0, 0)  # top and corner on the outline
    assert not out[20, 20].any() and not out[5, 5].any()  # inside and outside untouched
    scored = draw_boxes(frame, [Detection(box=(10.0, 10.0, 50.0, 40.0), score=0.93)])
    assert (scored[12:25, 12:45] > 0).any()  # the score is written inside the box's top-left corner
    with pytest.raises(ValueError, match="one per box"):
        draw_boxes(frame, np.zeros((2, 4)), labels=["a"])
