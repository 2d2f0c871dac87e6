"""Offline face detectors whose weights ship inside a PyPI wheel (nothing is downloaded at run time).

Backends:

* ``"mediapipe"`` -- MediaPipe 0.10.21 legacy ``solutions.face_detection`` (BlazeFace). ``model="short"`` is the
  short-range model (faces within ~2 m, and the only one that finds tight face crops), ``model="full"`` the full-range
  model (small / far faces), ``model="auto"`` (default) runs short-range and falls back to full-range on frames where
  it finds nothing. Needs the ``[face]`` extra: ``pip install 'marlin[face]'``.
* ``"haar"`` -- OpenCV's frontal-face Haar cascade bundled in ``cv2.data``. A slower, less accurate fallback; OpenCV
  comes with the ``[face]`` extra.

Frames are ``uint8`` RGB arrays ``[H, W, 3]``; boxes are ``(x1, y1, x2, y2)`` in pixels of that frame, as floats, and
may extend past the frame border when a face is cut by it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = [
    "Detection",
    "FaceDetector",
    "MediaPipeDetector",
    "HaarDetector",
    "create_detector",
    "detect_video",
    "check_frame",
    "boxes_array",
]

_FACE_EXTRA = "pip install 'marlin[face]'"


@dataclass(frozen=True)
class Detection:
    """One detected face.

    Attributes:
        box: ``(x1, y1, x2, y2)`` in pixels (floats; may lie partly outside the frame).
        score: detector confidence, higher is better (in ``[0, 1]`` for both bundled backends).
        keypoints: optional ``[K, 2]`` pixel ``(x, y)`` landmarks. MediaPipe gives K=6: right eye, left eye, nose tip,
            mouth centre, right ear tragion, left ear tragion (right/left from the subject's point of view).
    """

    box: tuple[float, float, float, float]
    score: float
    keypoints: np.ndarray | None = field(default=None, compare=False)  # arrays have no single truth value

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@runtime_checkable
class FaceDetector(Protocol):
    """Anything that finds faces in one RGB frame. Backends are also context managers that free their models."""

    def detect(self, frame: np.ndarray) -> list[Detection]:
        """Faces in ``frame`` (``uint8 [H, W, 3]`` RGB), in no particular order; empty when there is none."""
        ...


def check_frame(frame: Any, where: str = "frame") -> np.ndarray:
    """Return ``frame`` as a C-contiguous ``uint8 [H, W, 3]`` array, or raise a one-line ``ValueError``."""
    arr = np.asarray(frame)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{where}: expected a uint8 RGB array [H, W, 3], got dtype {arr.dtype} shape {arr.shape}")
    return np.ascontiguousarray(arr)


class MediaPipeDetector:
    """MediaPipe BlazeFace detector (legacy solutions API). One graph per model, built lazily and reused per frame.

    Args:
        model: ``"short"`` (short-range), ``"full"`` (full-range) or ``"auto"``: short-range first, full-range only
            on frames where short-range finds no face (short-range misses small faces, full-range misses tight crops).
        min_score: minimum detection confidence in ``[0, 1]``.
    """

    name = "mediapipe"

    def __init__(self, model: str = "auto", min_score: float = 0.5) -> None:
        if model not in ("short", "full", "auto"):
            raise ValueError(f"MediaPipeDetector: expected model 'short', 'full' or 'auto', got {model!r}")
        if not 0.0 <= min_score <= 1.0:
            raise ValueError(f"MediaPipeDetector: expected min_score in [0, 1], got {min_score}")
        try:
            from mediapipe.python.solutions import face_detection
        except ImportError as e:
            raise ImportError(f"the 'mediapipe' face detector needs mediapipe==0.10.21: {_FACE_EXTRA}") from e
        self._module = face_detection
        self.model = model
        self.min_score = float(min_score)
        self._graphs: dict[int, Any] = {}  # model_selection (0 short, 1 full) -> FaceDetection graph

    def _graph(self, selection: int) -> Any:
        if selection not in self._graphs:
            self._graphs[selection] = self._module.FaceDetection(
                model_selection=selection, min_detection_confidence=self.min_score
            )
        return self._graphs[selection]

    def _run(self, frame: np.ndarray, selection: int) -> list[Detection]:
        h, w = frame.shape[:2]
        if selection in self._graphs:
            result = self._graphs[selection].process(frame)
        else:  # the first run of a graph: MediaPipe's native log lines stay off the terminal
            from ..utils.quiet import quiet_native_logs

            with quiet_native_logs():
                result = self._graph(selection).process(frame)
        out = []
        for det in result.detections or ():
            rel = det.location_data.relative_bounding_box
            x1, y1 = rel.xmin * w, rel.ymin * h
            box = (float(x1), float(y1), float(x1 + rel.width * w), float(y1 + rel.height * h))
            kps = det.location_data.relative_keypoints
            keypoints = np.array([(k.x * w, k.y * h) for k in kps], dtype=np.float32) if len(kps) else None
            out.append(Detection(box=box, score=float(det.score[0]) if det.score else 0.0, keypoints=keypoints))
        return out

    def detect(self, frame: np.ndarray) -> list[Detection]:
        frame = check_frame(frame, f"{type(self).__name__}.detect")
        if self.model == "full":
            return self._run(frame, 1)
        dets = self._run(frame, 0)
        if not dets and self.model == "auto":
            dets = self._run(frame, 1)
        return dets

    def close(self) -> None:
        """Free the MediaPipe graphs; the detector can still be used (graphs are rebuilt on demand)."""
        for graph in self._graphs.values():
            graph.close()
        self._graphs.clear()

    def __enter__(self) -> MediaPipeDetector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MediaPipeDetector(model={self.model!r}, min_score={self.min_score})"


class HaarDetector:
    """OpenCV Haar-cascade frontal face detector (fallback: no keypoints, frontal faces only, slower).

    Frames whose longer side exceeds ``max_side`` are downscaled before detection (boxes are mapped back), which keeps
    720p frames at tens of milliseconds. The score is ``sigmoid(level_weight)`` of the cascade's last stage: monotone
    in confidence, but not a calibrated probability.

    Args:
        cascade: file name inside ``cv2.data.haarcascades``, or a path to a cascade XML.
        scale_factor, min_neighbors: ``cv2.CascadeClassifier.detectMultiScale`` parameters.
        min_size: smallest face side to report, as a fraction of the (downscaled) frame's shorter side.
        max_side: downscale frames whose longer side is larger than this (``None``: never).
    """

    name = "haar"

    def __init__(
        self,
        cascade: str = "haarcascade_frontalface_default.xml",
        scale_factor: float = 1.1,
        min_neighbors: int = 5,
        min_size: float = 0.08,
        max_side: int | None = 640,
    ) -> None:
        try:
            import cv2
        except ImportError as e:
            raise ImportError(f"the 'haar' face detector needs OpenCV: {_FACE_EXTRA}") from e
        path = Path(cascade)
        if not path.is_file():
            path = Path(cv2.data.haarcascades) / cascade
        classifier = cv2.CascadeClassifier(str(path))
        if classifier.empty():
            raise FileNotFoundError(f"HaarDetector: expected a Haar cascade XML, could not load {path}")
        self._cv2 = cv2
        self._classifier = classifier
        self.cascade = str(path)
        self.scale_factor = float(scale_factor)
        self.min_neighbors = int(min_neighbors)
        self.min_size = float(min_size)
        self.max_side = max_side

    def detect(self, frame: np.ndarray) -> list[Detection]:
        cv2 = self._cv2
        frame = check_frame(frame, f"{type(self).__name__}.detect")
        gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        scale = 1.0
        if self.max_side is not None and max(gray.shape) > self.max_side:
            scale = self.max_side / max(gray.shape)
            gray = cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        gray = cv2.equalizeHist(gray)
        side = max(1, int(self.min_size * min(gray.shape)))
        rects, _, weights = self._classifier.detectMultiScale3(
            gray,
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors,
            minSize=(side, side),
            outputRejectLevels=True,
        )
        out = []
        rects = np.asarray(rects, dtype=np.float64).reshape(-1, 4)  # [N, 4] x, y, w, h
        weights = np.asarray(weights, dtype=np.float64).reshape(-1)  # [N]
        for (x, y, w, h), weight in zip(rects, weights, strict=True):
            box = (x / scale, y / scale, (x + w) / scale, (y + h) / scale)
            out.append(Detection(box=tuple(float(v) for v in box), score=1.0 / (1.0 + math.exp(-float(weight)))))
        return out

    def close(self) -> None:
        """Nothing to free (kept for the common detector interface)."""

    def __enter__(self) -> HaarDetector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"HaarDetector(cascade={self.cascade!r}, max_side={self.max_side})"


_BACKENDS = {"mediapipe": MediaPipeDetector, "haar": HaarDetector}


def create_detector(name: str = "mediapipe", **kwargs: Any) -> MediaPipeDetector | HaarDetector:
    """Build a bundled detector backend by name (``"mediapipe"`` or ``"haar"``); ``kwargs`` go to its constructor."""
    if name not in _BACKENDS:
        raise ValueError(f"create_detector: expected one of {sorted(_BACKENDS)}, got {name!r}")
    return _BACKENDS[name](**kwargs)


def detect_video(
    frames: Iterable[np.ndarray] | np.ndarray,
    detector: FaceDetector | str = "mediapipe",
    **kwargs: Any,
) -> list[list[Detection]]:
    """Detect faces in every frame of a video.

    Args:
        frames: ``uint8 [T, H, W, 3]`` array or any iterable of ``[H, W, 3]`` frames (a decoder generator works, so
            a long video need not be held in memory).
        detector: a detector object (left open: the caller owns it) or a backend name, in which case one is created
            with ``kwargs`` and closed afterwards.

    Returns:
        One list of :class:`Detection` per frame (empty where no face was found).
    """
    if isinstance(detector, str):
        with create_detector(detector, **kwargs) as det:
            return [det.detect(frame) for frame in frames]
    if kwargs:
        raise TypeError(f"detect_video: keyword arguments {sorted(kwargs)} only apply when detector is a name")
    return [detector.detect(frame) for frame in frames]


def boxes_array(detections: Sequence[Detection]) -> np.ndarray:
    """Stack detection boxes into a float ``[N, 4]`` array (``[0, 4]`` when empty)."""
    return np.array([d.box for d in detections], dtype=np.float64).reshape(-1, 4)
