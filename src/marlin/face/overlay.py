"""Visual checks for face parsing: colour overlays, contact sheets with a legend, atomic PNG writes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from marlin.face.parse import LAPA_LABELS, LAPA_PALETTE
from marlin.utils.fileio import atomic_save_image, image_format

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["overlay_parse", "parse_overlay_sheet", "save_parse_overlay_sheet"]


def _check_palette(labels: np.ndarray, palette: np.ndarray, where: str) -> None:
    if labels.size and int(labels.max()) >= len(palette):
        raise ValueError(f"{where}: expected label ids < {len(palette)} (palette size), found {int(labels.max())}")


def overlay_parse(
    frame: np.ndarray, labels: np.ndarray, alpha: float = 0.5, palette: np.ndarray = LAPA_PALETTE
) -> np.ndarray:
    """Blend class colours over an RGB frame; background (label 0) pixels are left untouched.

    Args:
        frame: ``[H, W, 3]`` uint8 RGB.
        labels: ``[H, W]`` integer label map.
        alpha: weight of the class colour (0 = frame only, 1 = colours only).
        palette: ``[C, 3]`` uint8 colour per label id.

    Returns:
        ``[H, W, 3]`` uint8 RGB.
    """
    frame, labels = np.asarray(frame), np.asarray(labels)
    if frame.ndim != 3 or frame.shape[-1] != 3 or labels.shape != frame.shape[:2]:
        raise ValueError(
            f"overlay_parse: expected frame [H, W, 3] and labels [H, W], got {tuple(frame.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay_parse: expected alpha in [0, 1], got {alpha}")
    _check_palette(labels, palette, "overlay_parse")
    colours = np.asarray(palette, dtype=np.float32)[labels]  # [H, W, 3]
    blended = (1.0 - alpha) * frame.astype(np.float32) + alpha * colours
    out = np.where((labels > 0)[..., None], np.round(blended), frame)
    return out.astype(np.uint8)


def _legend(width: int, names: Sequence[str], palette: np.ndarray) -> Image.Image:
    """A white strip of colour swatches and class names, wrapped to ``width`` pixels."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    swatch, pad, row_h = 12, 6, 18
    entries = [
        (name, tuple(int(c) for c in palette[i]), 18 + int(probe.textlength(name, font=font)) + pad)
        for i, name in enumerate(names)
    ]
    rows: list[list[tuple[str, tuple[int, ...], int]]] = [[]]
    used = pad
    for entry in entries:
        if rows[-1] and used + entry[2] > width:
            rows.append([])
            used = pad
        rows[-1].append(entry)
        used += entry[2]
    strip = Image.new("RGB", (width, pad + row_h * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for r, row in enumerate(rows):
        x, y = pad, pad // 2 + r * row_h
        for name, colour, w in row:
            draw.rectangle((x, y + 2, x + swatch, y + 2 + swatch), fill=colour, outline=(0, 0, 0))
            draw.text((x + swatch + 4, y + 2), name, fill=(0, 0, 0), font=font)
            x += w
    return strip


def parse_overlay_sheet(
    frames: np.ndarray | Sequence[np.ndarray],
    labels: np.ndarray | Sequence[np.ndarray],
    cols: int = 8,
    alpha: float = 0.5,
    legend: bool = True,
    palette: np.ndarray = LAPA_PALETTE,
    names: Sequence[str] = LAPA_LABELS,
) -> Image.Image:
    """Tile parse overlays of ``[T, H, W, 3]`` frames into a grid (``cols`` wide), with an optional legend strip.

    Returns:
        A PIL RGB image of size ``(cols' * W, rows * H [+ legend])`` where ``cols' = min(cols, T)``.
    """
    from PIL import Image

    if len(frames) != len(labels) or len(frames) == 0:
        raise ValueError(
            f"parse_overlay_sheet: expected as many label maps as frames (>= 1), got {len(labels)} and {len(frames)}"
        )
    if cols < 1:
        raise ValueError(f"parse_overlay_sheet: expected cols >= 1, got {cols}")
    tiles = [overlay_parse(f, lab, alpha, palette) for f, lab in zip(frames, labels, strict=True)]
    h, w = tiles[0].shape[:2]
    if any(t.shape[:2] != (h, w) for t in tiles):
        raise ValueError(f"parse_overlay_sheet: expected all frames {h}x{w}, found mixed sizes")
    ncols = min(cols, len(tiles))
    nrows = -(-len(tiles) // ncols)
    grid = np.zeros((nrows * h, ncols * w, 3), dtype=np.uint8)  # [rows*H, cols*W, 3]
    for i, tile in enumerate(tiles):
        r, c = divmod(i, ncols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = tile
    sheet = Image.fromarray(grid)
    if not legend:
        return sheet
    strip = _legend(sheet.width, names, palette)
    out = Image.new("RGB", (sheet.width, sheet.height + strip.height), (255, 255, 255))
    out.paste(sheet, (0, 0))
    out.paste(strip, (0, sheet.height))
    return out


def save_parse_overlay_sheet(
    path: str | os.PathLike[str],
    frames: np.ndarray | Sequence[np.ndarray],
    labels: np.ndarray | Sequence[np.ndarray],
    **kwargs: object,
) -> Path:
    """Write :func:`parse_overlay_sheet` to ``path`` atomically (temp file in the same folder, then rename).

    The image format follows the suffix (``.png`` recommended). Extra keyword arguments go to the sheet builder.
    """
    image_format(path, "save_parse_overlay_sheet")  # fail before the work, not after
    sheet = parse_overlay_sheet(frames, labels, **kwargs)  # type: ignore[arg-type]
    return atomic_save_image(path, sheet, "save_parse_overlay_sheet")
