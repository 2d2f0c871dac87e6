"""Contact sheets and box overlays, so a person can check face crops and detections at a glance."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..utils.fileio import atomic_save_image, image_format

__all__ = ["contact_sheet", "save_contact_sheet", "draw_boxes"]


def _as_frames(frames: np.ndarray | Sequence[np.ndarray], where: str) -> list[np.ndarray]:
    """Validate frames (``[T, H, W, 3]`` array or T arrays ``[H, W, 3]`` / ``[H, W]``) into a list of uint8 RGB."""
    out = []
    for t, frame in enumerate(frames):
        arr = np.asarray(frame)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"{where}: expected uint8 frames [H, W, 3], frame {t} is {arr.dtype} {arr.shape}")
        out.append(arr)
    if not out:
        raise ValueError(f"{where}: expected at least one frame, got none")
    return out


def contact_sheet(
    frames: np.ndarray | Sequence[np.ndarray],
    cols: int = 8,
    max_frames: int | None = 16,
    labels: Sequence[str] | None = None,
    tile: int = 160,
    pad: int = 2,
    background: tuple[int, int, int] = (32, 32, 32),
) -> Image.Image:
    """Lay frames out on a grid.

    Args:
        frames: ``uint8 [T, H, W, 3]`` or a sequence of ``[H, W, 3]`` frames (sizes may differ).
        cols: tiles per row.
        max_frames: show at most this many frames, evenly spaced over the video (``None``: all).
        labels: one caption per input frame (``len(labels) == T``), drawn on its tile; ``None``: the frame index.
            Pass ``[""] * T`` for no captions.
        tile: longer side of a tile in pixels (frames are scaled to fit, keeping their aspect ratio).
        pad: gap between tiles in pixels.
        background: RGB colour of the gaps.

    Returns:
        An RGB :class:`PIL.Image.Image`.
    """
    items = _as_frames(frames, "contact_sheet")
    if labels is not None and len(labels) != len(items):
        raise ValueError(f"contact_sheet: expected {len(items)} labels (one per frame), got {len(labels)}")
    if cols < 1 or tile < 1 or pad < 0:
        raise ValueError(f"contact_sheet: expected cols >= 1, tile >= 1, pad >= 0, got {cols}, {tile}, {pad}")
    n = len(items) if max_frames is None else min(len(items), max_frames)
    if n < 1:
        raise ValueError(f"contact_sheet: expected max_frames >= 1, got {max_frames}")
    index = np.unique(np.linspace(0, len(items) - 1, n).round().astype(int))  # evenly spaced, first and last kept

    h0, w0 = items[index[0]].shape[:2]
    scale = tile / max(h0, w0)
    tw, th = max(1, round(w0 * scale)), max(1, round(h0 * scale))
    rows = -(-len(index) // cols)
    ncols = min(cols, len(index))
    sheet = Image.new("RGB", (ncols * tw + (ncols + 1) * pad, rows * th + (rows + 1) * pad), background)
    draw = ImageDraw.Draw(sheet)
    for i, t in enumerate(index):
        img = Image.fromarray(items[t])
        fit = min(tw / img.width, th / img.height)  # fit inside the tile (up or down), keep aspect ratio
        size = (max(1, round(img.width * fit)), max(1, round(img.height * fit)))
        if size != img.size:
            img = img.resize(size, Image.Resampling.BILINEAR)
        x = pad + (i % cols) * (tw + pad)
        y = pad + (i // cols) * (th + pad)
        sheet.paste(img, (x + (tw - img.width) // 2, y + (th - img.height) // 2))
        text = str(t) if labels is None else str(labels[t])
        if text:
            left, top, right, bottom = draw.textbbox((x + 3, y + 2), text)
            draw.rectangle((left - 2, top - 1, right + 2, bottom + 1), fill=(0, 0, 0))
            draw.text((x + 3, y + 2), text, fill=(255, 255, 255))
    return sheet


def save_contact_sheet(path: str | os.PathLike[str], frames: np.ndarray | Sequence[np.ndarray], **kwargs: Any) -> Path:
    """Write :func:`contact_sheet` of ``frames`` to ``path`` atomically (format from the suffix, e.g. ``.png``).

    The image goes to a temporary file in the same folder which is then renamed over ``path``, so a reader never sees
    a half-written file. Parent folders are created. Returns the path written.
    """
    image_format(path, "save_contact_sheet")  # fail before the work, not after
    return atomic_save_image(path, contact_sheet(frames, **kwargs), "save_contact_sheet")


def draw_boxes(
    frame: np.ndarray,
    boxes: Sequence[Any] | np.ndarray,
    labels: Sequence[str] | None = None,
    color: tuple[int, int, int] = (0, 255, 0),
    width: int = 2,
) -> np.ndarray:
    """Return a copy of ``frame`` (``uint8 [H, W, 3]``) with rectangles drawn around ``boxes``.

    ``boxes`` is ``[N, 4]`` ``(x1, y1, x2, y2)`` pixels, or objects with a ``.box`` attribute (detections); their
    ``.score`` is used as the label when ``labels`` is ``None``.
    """
    arr = _as_frames([frame], "draw_boxes")[0]
    items = list(boxes) if not isinstance(boxes, np.ndarray) else list(boxes.reshape(-1, 4))
    if labels is not None and len(labels) != len(items):
        raise ValueError(f"draw_boxes: expected {len(items)} labels (one per box), got {len(labels)}")
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    for i, item in enumerate(items):
        box = getattr(item, "box", item)
        bx1, by1, bx2, by2 = (float(v) for v in box)
        x1, y1, x2, y2 = min(bx1, bx2), min(by1, by2), max(bx1, bx2), max(by1, by2)
        draw.rectangle((x1, y1, x2, y2), outline=color, width=width)
        if labels is not None:
            text = str(labels[i])
        else:
            text = f"{item.score:.2f}" if hasattr(item, "score") else ""
        if text:
            draw.text((x1 + width + 1, y1 + width), text, fill=color)
    return np.asarray(img)


def write_store_previews(root: str | os.PathLike, out_dir: str | os.PathLike, *, ids: Sequence[str] | None = None,
                         n_frames: int = 8) -> list[Path]:  # fmt: skip
    """One PNG per item for a quick look: evenly spaced crops with the face parse overlaid (plain crops without
    parse maps). Returns the files written to `out_dir/<item id>.png`."""
    from ..data.store import ClipStore
    from ..face.overlay import save_parse_overlay_sheet

    store = ClipStore(root)
    wanted = None if ids is None else set(ids)
    written = []
    for item in store.items:
        if wanted is not None and item.id not in wanted:
            continue
        frames = np.unique(np.linspace(0, item.n_frames - 1, n_frames).round().astype(int))
        crops = store.read_video(item, frames)  # [K, S, S, 3]
        path = Path(out_dir) / f"{item.id}.png"
        if item.has_parse:
            save_parse_overlay_sheet(path, crops, store.read_parse(item, frames), cols=len(frames))
        else:
            save_contact_sheet(path, crops, cols=len(frames), labels=[f"frame {i * item.frame_step}" for i in frames])
        written.append(path)
    return written
