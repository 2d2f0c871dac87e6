"""Is this box really a face? A second, independent look at a detection: MediaPipe's face mesh on the crop.

The detector (BlazeFace) fires on face-like things -- a drawn smiley, a logo, a pattern -- with scores that overlap
real faces' (a drawn smiley: 0.83; real faces in the shared clips: 1% of detections below 0.78). The face mesh, run
on the detection's crop, finds a face in 0 of 4 smiley crops and in all crops of 150 real clips but one (a small,
turned face: 4 of 12). Checking a few detections per track is enough to accept or reject the track, at ~8 ms a check.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .crop import MEDIAPIPE_OFFICIAL_FRAMING, crop_face

__all__ = ["MeshVerifier"]

_FACE_EXTRA = "pip install 'marlin[face]'"


class MeshVerifier:
    """``verify(frame, box)``: True when the face mesh finds a face in the crop of ``box``.

    Args:
        size: side of the crop the mesh looks at (the mesh model works at 192).
        min_score: the mesh's own detection confidence.
    """

    def __init__(self, size: int = 192, min_score: float = 0.5) -> None:
        try:
            from mediapipe.python.solutions import face_mesh
        except ImportError as e:
            raise ImportError(f"face verification needs mediapipe==0.10.21: {_FACE_EXTRA}") from e
        self._module, self.size, self.min_score = face_mesh, int(size), float(min_score)
        self._mesh: Any = None
        self.calls = 0

    def verify(self, frame: np.ndarray, box: np.ndarray | tuple[float, ...]) -> bool:
        """Whether the crop of ``box`` (``x1, y1, x2, y2``) in ``frame`` (uint8 RGB) holds a face."""
        crop = crop_face(frame, np.asarray(box, dtype=np.float64), size=self.size, **MEDIAPIPE_OFFICIAL_FRAMING)
        self.calls += 1
        if self._mesh is not None:
            return self._mesh.process(crop).multi_face_landmarks is not None
        from ..utils.quiet import quiet_native_logs

        with quiet_native_logs():  # the graph's first run prints MediaPipe's native log lines
            self._mesh = self._module.FaceMesh(static_image_mode=True, max_num_faces=1,
                                               min_detection_confidence=self.min_score)  # fmt: skip
            return self._mesh.process(crop).multi_face_landmarks is not None

    def close(self) -> None:
        """Free the mesh graph (it is rebuilt on the next call)."""
        if self._mesh is not None:
            self._mesh.close()
            self._mesh = None

    def __enter__(self) -> MeshVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
