"""Pictures of token masks: what the encoder sees of a clip and what the decoder must reconstruct.

:func:`mask_sheet` lays a 16-frame clip out one column per tubelet (the first frame of each, since a token spans
``tubelet`` frames and the face-guided masks are computed from that frame's parse map), in up to three rows: the crop,
its face-parse overlay, and the crop with the hidden patches greyed and hatched (visible ones clear, outlined). Masks
follow the project convention (:mod:`marlin.mae.masking`): True = visible.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..utils.fileio import atomic_write, image_format

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["HIDDEN_GREY", "VISIBLE_OUTLINE", "mask_frame", "mask_sheet", "save_mask_sheet"]

HIDDEN_GREY = (128, 128, 128)  # hidden patches are blended towards this
VISIBLE_OUTLINE = (255, 210, 0)  # outline drawn around the visible patches
_HATCH = (70, 70, 70)
_PANEL_BG = (24, 24, 24)
_TEXT = (235, 235, 235)


def _check_visible_grid(visible: np.ndarray, frame_shape: tuple[int, ...], patch: int, where: str) -> np.ndarray:
    visible = np.asarray(visible)
    h, w = frame_shape[0] // patch, frame_shape[1] // patch
    if visible.dtype != bool or visible.shape != (h, w) or frame_shape[0] % patch or frame_shape[1] % patch:
        raise ValueError(f"{where}: expected a bool visibility grid [{h}, {w}] for {frame_shape[:2]} frames and "
                         f"patch {patch}, found {visible.dtype} {visible.shape}")  # fmt: skip
    return visible


def mask_frame(
    frame: np.ndarray,
    visible: np.ndarray,
    patch: int = 16,
    *,
    strength: float = 0.65,
    hatch: int = 6,
    outline: bool = True,
) -> np.ndarray:
    """Grey and hatch the hidden patches of one frame; visible patches keep their pixels.

    Args:
        frame: ``uint8 [H, W, 3]`` RGB.
        visible: ``bool [H // patch, W // patch]``, True = visible.
        patch: patch side in pixels.
        strength: how far hidden pixels are blended towards :data:`HIDDEN_GREY` (0: not at all, 1: flat grey).
        hatch: spacing in pixels of the diagonal hatching on hidden patches (0: none).
        outline: draw a 1 px :data:`VISIBLE_OUTLINE` border around each visible patch.

    Returns:
        ``uint8 [H, W, 3]``, a new array.
    """
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"mask_frame: expected a uint8 frame [H, W, 3], found {frame.dtype} {frame.shape}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"mask_frame: expected strength in [0, 1], found {strength}")
    vis = _check_visible_grid(visible, frame.shape, patch, "mask_frame")
    hidden = ~np.kron(vis, np.ones((patch, patch), dtype=bool)).astype(bool)  # [H, W] per pixel
    out = frame.astype(np.float32)
    grey = np.asarray(HIDDEN_GREY, dtype=np.float32)
    out[hidden] = (1.0 - strength) * out[hidden] + strength * grey
    if hatch > 0:
        yy, xx = np.indices(frame.shape[:2])
        lines = ((xx + yy) % hatch == 0) & hidden  # [H, W] diagonal lines
        out[lines] = _HATCH
    out = np.round(out).astype(np.uint8)
    if outline:
        for r, c in zip(*np.nonzero(vis), strict=True):
            y0, x0, y1, x1 = r * patch, c * patch, (r + 1) * patch - 1, (c + 1) * patch - 1
            out[y0, x0 : x1 + 1] = VISIBLE_OUTLINE
            out[y1, x0 : x1 + 1] = VISIBLE_OUTLINE
            out[y0 : y1 + 1, x0] = VISIBLE_OUTLINE
            out[y0 : y1 + 1, x1] = VISIBLE_OUTLINE
    return out


def _patch_grid(img: np.ndarray, patch: int, colour: tuple[int, int, int] = (255, 255, 255), alpha: float = 0.25):
    """Faint patch grid lines over ``img`` (a copy), so tokens can be counted on the parse overlay."""
    out = img.astype(np.float32)
    c = np.asarray(colour, dtype=np.float32)
    out[::patch] = (1 - alpha) * out[::patch] + alpha * c
    out[:, ::patch] = (1 - alpha) * out[:, ::patch] + alpha * c
    return np.round(out).astype(np.uint8)


def mask_sheet(
    frames: np.ndarray,
    visible: np.ndarray,
    *,
    parse: np.ndarray | None = None,
    tubelet: int = 2,
    patch: int = 16,
    title: str = "",
    frame_labels: Sequence[str] | None = None,
    tile: int | None = None,
) -> Image.Image:
    """One column per tubelet: crop, parse overlay (when ``parse`` is given), and hidden patches greyed.

    Args:
        frames: ``uint8 [T, H, W, 3]`` RGB clip, ``T`` divisible by ``tubelet``.
        visible: the clip's visibility mask, ``bool [t * h * w]`` in ``(t, h, w)`` order (a row of
            :func:`marlin.mae.masking.generate_visible`) or ``[t, h, w]``; True = visible.
        parse: optional ``uint8 [T, H, W]`` LaPa labels.
        tubelet, patch: token geometry.
        title: text above the sheet.
        frame_labels: one caption per frame of the clip (e.g. its source frame index); default: the clip index.
        tile: panel side in pixels (default: the frame size); panels are drawn at full size, then resized.

    Returns:
        A PIL RGB image.
    """
    frames, grid = _check_sheet_inputs(frames, visible, parse, frame_labels, tubelet, patch)  # [T, H, W, 3], [t, h, w]
    n_frames, height, width = frames.shape[:3]
    side = tile or width
    panel_h = round(height * (side / width))
    names = frame_labels if frame_labels is not None else [str(i) for i in range(n_frames)]
    rows = _sheet_rows(frames, grid, parse, tubelet, patch)
    return _draw_sheet(rows, grid, names, tubelet, title, (side, panel_h), with_parse=parse is not None)


def _check_sheet_inputs(
    frames: np.ndarray,
    visible: np.ndarray,
    parse: np.ndarray | None,
    frame_labels: Sequence[str] | None,
    tubelet: int,
    patch: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Validate :func:`mask_sheet`'s inputs so a bad clip fails clearly; returns frames and the ``[t, h, w]`` grid."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] % tubelet:
        raise ValueError(f"mask_sheet: expected uint8 frames [T, H, W, 3] with T divisible by tubelet={tubelet}, "
                         f"found {frames.dtype} {frames.shape}")  # fmt: skip
    n_frames, height, width = frames.shape[:3]
    t, h, w = n_frames // tubelet, height // patch, width // patch
    visible = np.asarray(visible)
    if visible.dtype != bool or visible.size != t * h * w:
        raise ValueError(f"mask_sheet: expected a bool mask of {t}x{h}x{w}={t * h * w} tokens, "
                         f"found {visible.dtype} {visible.shape}")  # fmt: skip
    if parse is not None and np.asarray(parse).shape != frames.shape[:3]:
        raise ValueError(f"mask_sheet: expected parse [T, H, W] = {frames.shape[:3]}, found {np.asarray(parse).shape}")
    if frame_labels is not None and len(frame_labels) != n_frames:
        raise ValueError(f"mask_sheet: expected {n_frames} frame labels, found {len(frame_labels)}")
    return frames, visible.reshape(t, h, w)


def _sheet_rows(
    frames: np.ndarray, grid: np.ndarray, parse: np.ndarray | None, tubelet: int, patch: int
) -> list[tuple[str, list[np.ndarray]]]:
    """The sheet's rows as (name, one ``[H, W, 3]`` panel per tubelet's first frame): crop, parse overlay, masked."""
    from ..face.overlay import overlay_parse

    t = grid.shape[0]
    rows: list[tuple[str, list[np.ndarray]]] = [("crop", [frames[k * tubelet] for k in range(t)])]
    if parse is not None:
        rows.append(("parse", [_patch_grid(overlay_parse(frames[k * tubelet], parse[k * tubelet]), patch)
                               for k in range(t)]))  # fmt: skip
    rows.append(("masked", [mask_frame(frames[k * tubelet], grid[k], patch) for k in range(t)]))
    return rows


def _draw_sheet(
    rows: list[tuple[str, list[np.ndarray]]],
    grid: np.ndarray,
    names: Sequence[str],
    tubelet: int,
    title: str,
    panel_size: tuple[int, int],
    *,
    with_parse: bool,
) -> Image.Image:
    """Draw the title and column heads, each row's label and panels (resized to ``panel_size``), then the legend."""
    from PIL import Image, ImageDraw, ImageFont

    from ..face.parse import LAPA_LABELS, LAPA_PALETTE

    side, panel_h = panel_size
    t = grid.shape[0]  # grid: [t, h, w]
    font = _font(ImageFont, 13)
    pad, label_w, head_h, title_h = 4, 62, 36, 26 if title else 0
    legend_h = 24
    sheet_w = label_w + t * (side + pad) + pad
    sheet_h = title_h + head_h + len(rows) * (panel_h + pad) + pad + legend_h
    sheet = Image.new("RGB", (sheet_w, sheet_h), _PANEL_BG)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad + 2, 7), title, fill=_TEXT, font=font)
    xs = [label_w + pad + k * (side + pad) for k in range(t)]  # left edge of each tubelet's column
    _draw_column_heads(draw, grid, names, tubelet, xs, title_h, font)
    for r, (name, panels) in enumerate(rows):
        y = title_h + head_h + r * (panel_h + pad)
        draw.text((pad + 2, y + panel_h // 2 - 6), name, fill=_TEXT, font=font)
        for x, panel in zip(xs, panels, strict=True):
            img = Image.fromarray(panel)
            if img.size != (side, panel_h):
                img = img.resize((side, panel_h), Image.Resampling.BOX)
            sheet.paste(img, (x, y))
    _draw_legend(draw, (pad + 2, sheet_h - legend_h + 4), LAPA_LABELS if with_parse else (), LAPA_PALETTE, font)
    return sheet


def _draw_column_heads(  # noqa: ANN001
    draw, grid: np.ndarray, names: Sequence[str], tubelet: int, xs: Sequence[int], top: int, font
) -> None:
    """Caption each tubelet's column with its frame range and how many of its ``h * w`` patches are visible."""
    h, w = grid.shape[1:]  # grid: [t, h, w]
    for k, x in enumerate(xs):
        first, last = k * tubelet, k * tubelet + tubelet - 1
        n_vis = int(grid[k].sum())
        draw.text((x + 2, top + 2), f"t={k}  frames {names[first]}-{names[last]}", fill=_TEXT, font=font)
        draw.text((x + 2, top + 17), f"{n_vis}/{h * w} visible", fill=VISIBLE_OUTLINE, font=font)


def _font(image_font, size: int):  # noqa: ANN001, ANN202
    """PIL's bundled font at ``size`` px (needs FreeType), else its fixed bitmap font."""
    try:
        return image_font.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1, or no FreeType
        return image_font.load_default()


def _draw_legend(draw, origin: tuple[int, int], names: Sequence[str], palette: np.ndarray, font) -> None:  # noqa: ANN001
    """Swatches: visible / hidden, then the parse classes."""
    x, y = origin
    entries = [("visible (encoder input)", VISIBLE_OUTLINE, True), ("hidden (reconstructed)", HIDDEN_GREY, False)]
    entries += [(n, tuple(int(v) for v in palette[i]), False) for i, n in enumerate(names) if i > 0]
    for name, colour, hollow in entries:
        if hollow:
            draw.rectangle((x, y + 1, x + 11, y + 12), outline=colour)
        else:
            draw.rectangle((x, y + 1, x + 11, y + 12), fill=colour, outline=(0, 0, 0))
        draw.text((x + 15, y + 1), name, fill=_TEXT, font=font)
        x += 15 + int(draw.textlength(name, font=font)) + 12


def save_mask_sheet(path: str | os.PathLike, frames: np.ndarray, visible: np.ndarray, **kwargs: object) -> Path:
    """Write :func:`mask_sheet` to ``path`` atomically (format from the suffix, e.g. ``.png``); return the path.

    A ``.png`` is written with an adaptive 256-colour palette when ``palette=True`` is passed (much smaller files,
    e.g. for documentation); otherwise in full colour.
    """
    from PIL import Image

    fmt = image_format(path, "save_mask_sheet")
    palette = bool(kwargs.pop("palette", False))
    sheet = mask_sheet(frames, visible, **kwargs)  # type: ignore[arg-type]
    if palette:
        sheet = sheet.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    save_kwargs = {"optimize": True} if fmt == "PNG" else {}
    return atomic_write(path, lambda tmp: sheet.save(tmp, format=fmt, **save_kwargs))


def load_face_clip(
    path: str | os.PathLike,
    *,
    start: int = 0,
    sample_rate: int = 2,
    clip_frames: int = 16,
    size: int = 224,
    crop_face: bool | str = "auto",
    detector: str = "mediapipe",
) -> tuple[np.ndarray, list[int], bool]:
    """Read one clip of a video as square face crops: frames ``start, start + sample_rate, ...`` (the one clip
    sampler, :func:`marlin.data.clips.clip_indices`: a clip that runs past the end repeats the last frame).

    ``crop_face="auto"`` crops unless the video already is ``size`` x ``size`` (a face crop); without cropping, a
    non-square video is cut to its centre square and resized (:func:`marlin.data.clips.center_crop`).

    Returns:
        ``(uint8 [clip_frames, size, size, 3], source frame index per clip frame, whether the face was cropped)``.
    """
    from ..data.clips import center_crop, clip_indices, read_face_clip
    from ..video.io import VideoError, probe_video, read_frames

    if start < 0 or sample_rate < 1 or clip_frames < 1:
        raise ValueError(f"expected start >= 0, sample_rate >= 1, clip_frames >= 1, found {start}, {sample_rate}, "
                         f"{clip_frames}")  # fmt: skip
    if crop_face not in (True, False, "auto"):
        raise ValueError(f"crop_face must be True, False or 'auto', found {crop_face!r}")
    info = probe_video(path)
    if start >= info.n_frames:
        raise VideoError(f"{path}: start={start} is past the end (the video has {info.n_frames} frames)")
    do_crop = (info.width, info.height) != (size, size) if crop_face == "auto" else bool(crop_face)
    indices = clip_indices(info.n_frames, clip_frames, sample_rate, start).tolist()
    if not do_crop:
        return np.stack([center_crop(f, size) for f in read_frames(path, indices)]), indices, False
    return read_face_clip(path, indices, size, detector), indices, True
