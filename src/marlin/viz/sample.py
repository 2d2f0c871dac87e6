"""A real face clip available offline: a short camera move over the portrait that matplotlib ships.

matplotlib (a dependency of the `[face]` extra, through mediapipe) ships `grace_hopper.jpg`, the official US Navy
portrait of Grace Hopper (a US government work). `make_sample_clip` turns it into a video with a slow pan, zoom and a
slight tilt inside a larger frame, so face detection, tracking and cropping have real work to do.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np


def sample_face_image() -> np.ndarray:
    """The shipped portrait as uint8 [600, 512, 3] RGB."""
    try:
        from matplotlib import cbook
    except ImportError as e:
        raise ImportError("the sample face ships with matplotlib: pip install 'marlin[face]'") from e
    from PIL import Image

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as im:
        return np.asarray(im.convert("RGB"))


def sample_frames(n_frames: int = 75, width: int = 640, height: int = 480) -> np.ndarray:
    """uint8 [T, H, W, 3]: the portrait moving across a grey-gradient background (pan, zoom 0.6-0.75, tilt +-4 deg)."""
    from PIL import Image

    face = Image.fromarray(sample_face_image())
    yy, xx = np.mgrid[0:height, 0:width]
    background = np.stack([60 + 40 * xx / width, 70 + 30 * yy / height, 90 + 20 * xx / width], -1).astype(np.uint8)
    frames = np.empty((n_frames, height, width, 3), np.uint8)
    for t in range(n_frames):
        phase = 2 * math.pi * t / max(n_frames, 1)
        scale = 0.675 + 0.075 * math.sin(phase)
        im = face.resize((int(face.width * scale), int(face.height * scale)), Image.BILINEAR)
        im = im.rotate(4 * math.sin(2 * phase), resample=Image.BILINEAR, expand=False, fillcolor=(70, 75, 95))
        canvas = Image.fromarray(background.copy())
        x = int((width - im.width) / 2 + 0.25 * (width - im.width) * math.sin(phase))
        y = int((height - im.height) / 2 + 20 * math.cos(phase))
        canvas.paste(im, (x, y))
        frames[t] = np.asarray(canvas)
    return frames


def make_sample_clip(path: str | os.PathLike, n_frames: int = 75, fps: int = 25) -> Path:
    """Write the sample clip (3 s at 25 fps, 640x480, H.264) to `path` and return it."""
    from ..video.io import write_video

    return write_video(path, sample_frames(n_frames), fps=fps)
