"""Per-frame face tools: detection, tracking, cropping, parsing. Submodules load on first use, so importing this is
cheap. (A whole video's face track -- decode, detect, track, crop -- is :mod:`marlin.video.faces`.)

Detection needs the ``[face]`` extra (``pip install 'marlin[face]'``); tracking and cropping need only numpy and PIL.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Detection": "detect",
    "FaceDetector": "detect",
    "MediaPipeDetector": "detect",
    "HaarDetector": "detect",
    "create_detector": "detect",
    "detect_video": "detect",
    "FaceTrack": "track",
    "NoFaceError": "track",
    "track_face": "track",
    "track_faces": "track",
    "smooth_boxes": "track",
    "crop_face": "crop",
    "crop_frames": "crop",
    "square_boxes": "crop",
    "MEDIAPIPE_OFFICIAL_FRAMING": "crop",
    "MeshVerifier": "verify",
    "FaceParser": "parse",
    "LAPA_LABELS": "parse",
    "LAPA_PALETTE": "parse",
    "overlay_parse": "overlay",
    "parse_overlay_sheet": "overlay",
    "save_parse_overlay_sheet": "overlay",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
