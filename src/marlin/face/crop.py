"""Square face crops, as MARLIN's preprocessing makes them.

The crop is the square of side ``max(w, h) * (1 + margin)`` centred on the face box (optionally moved down by
``shift_y * max(w, h)``), snapped to whole pixels; parts of it outside the frame are zero (black), so a face at the
border stays centred instead of the square sliding inward. It is resized to ``size`` x ``size`` with PIL (an
area-aware filter: no aliasing when shrinking large faces).

The official crops are cut around RetinaFace boxes, which are larger than MediaPipe's and sit higher on the head.
Running MediaPipe (short-range) on the official ``cropped01-05.mp4`` samples, its square box has a median side of
177-205 px in the 224 px crop (official side / MediaPipe side = 1.09-1.27, median 1.19) and its centre lies 0.04-0.14
(median 0.09) of its side below the crop centre. :data:`MEDIAPIPE_OFFICIAL_FRAMING` turns MediaPipe boxes into crops
framed like the official ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from .detect import check_frame

__all__ = ["MEDIAPIPE_OFFICIAL_FRAMING", "square_boxes", "crop_face", "crop_frames"]

#: ``crop_face`` / ``crop_frames`` keyword arguments that frame MediaPipe boxes like the official MARLIN crops.
MEDIAPIPE_OFFICIAL_FRAMING: dict[str, float] = {"margin": 0.2, "shift_y": -0.09}

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


def square_boxes(boxes: np.ndarray, margin: float = 0.0, shift_y: float = 0.0) -> np.ndarray:
    """Integer square crop windows for face boxes.

    Args:
        boxes: ``[..., 4]`` face boxes ``(x1, y1, x2, y2)`` in pixels.
        margin: extra fraction of the side (0.25 adds 12.5% of the side on each edge).
        shift_y: move the centre down by this fraction of ``max(w, h)`` of the box (negative: up).

    Returns:
        ``int64 [..., 4]`` ``(x1, y1, x2, y2)`` with ``x2 - x1 == y2 - y1 >= 1``; may extend outside the frame.
    """
    if margin <= -1:
        raise ValueError(f"square_boxes: expected margin > -1, got {margin}")
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.shape[-1:] != (4,):
        raise ValueError(f"square_boxes: expected boxes of shape [..., 4], got {boxes.shape}")
    if not np.isfinite(boxes).all():
        raise ValueError("square_boxes: expected finite boxes, found NaN or inf")
    wh = boxes[..., 2:] - boxes[..., :2]  # [..., 2]
    centre = (boxes[..., :2] + boxes[..., 2:]) / 2  # [..., 2]
    centre[..., 1] += shift_y * wh.max(-1)
    side = np.maximum(np.rint(wh.max(-1) * (1 + margin)), 1)  # [...]
    top_left = np.floor(centre - side[..., None] / 2 + 0.5)  # [..., 2], rounded half up
    return np.concatenate([top_left, top_left + side[..., None]], axis=-1).astype(np.int64)


def _crop_square(frame: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Cut the integer square ``window`` out of ``frame`` ``[H, W, 3]``, zero-padding what lies outside it."""
    h, w = frame.shape[:2]
    x1, y1, x2, y2 = (int(v) for v in window)
    side = x2 - x1
    out = np.zeros((side, side, 3), dtype=np.uint8)
    sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)  # part of the window inside the frame
    if sx1 < sx2 and sy1 < sy2:
        out[sy1 - y1 : sy2 - y1, sx1 - x1 : sx2 - x1] = frame[sy1:sy2, sx1:sx2]
    return out


def _resize(square: np.ndarray, size: int, resample: str) -> np.ndarray:
    if square.shape[0] == size:
        return square
    return np.asarray(Image.fromarray(square).resize((size, size), _RESAMPLE[resample]))


def crop_face(
    frame: np.ndarray,
    box: Sequence[float] | np.ndarray,
    size: int = 224,
    margin: float = 0.0,
    shift_y: float = 0.0,
    resample: str = "bilinear",
) -> np.ndarray:
    """Crop the face in ``box`` out of ``frame`` as a square ``uint8 [size, size, 3]`` image.

    Args:
        frame: ``uint8 [H, W, 3]`` RGB frame.
        box: ``(x1, y1, x2, y2)`` face box in pixels.
        size: output side in pixels.
        margin: enlarge the square side by this fraction (0: side = ``max(w, h)`` of the box).
        shift_y: move the square's centre down by this fraction of ``max(w, h)`` (negative: up).
        resample: PIL filter: ``"bilinear"`` (default), ``"bicubic"``, ``"lanczos"`` or ``"box"``.
    """
    frame = check_frame(frame, "crop_face")
    _check_size_resample("crop_face", size, resample)
    return _resize(_crop_square(frame, square_boxes(box, margin, shift_y)), size, resample)


def crop_frames(
    frames: np.ndarray | Sequence[np.ndarray],
    boxes: np.ndarray,
    size: int = 224,
    margin: float = 0.0,
    shift_y: float = 0.0,
    resample: str = "bilinear",
) -> np.ndarray:
    """Crop one face box per frame: ``frames`` ``[T, H, W, 3]`` (or T arrays) and ``boxes`` ``[T, 4]`` ->
    ``uint8 [T, size, size, 3]``. Same arguments as :func:`crop_face`."""
    _check_size_resample("crop_frames", size, resample)
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) != len(frames):
        raise ValueError(f"crop_frames: expected boxes [T={len(frames)}, 4], got shape {boxes.shape}")
    windows = square_boxes(boxes, margin, shift_y)  # [T, 4]
    out = np.empty((len(frames), size, size, 3), dtype=np.uint8)
    for t, (frame, window) in enumerate(zip(frames, windows, strict=True)):
        out[t] = _resize(_crop_square(check_frame(frame, f"crop_frames: frame {t}"), window), size, resample)
    return out


def _check_size_resample(where: str, size: int, resample: str) -> None:
    if int(size) != size or size < 1:
        raise ValueError(f"{where}: expected a positive integer size, got {size}")
    if resample not in _RESAMPLE:
        raise ValueError(f"{where}: expected resample in {sorted(_RESAMPLE)}, got {resample!r}")
