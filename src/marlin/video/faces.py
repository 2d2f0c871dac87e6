"""A video's face tracks, confirmed and streamed: decode -> cuts + detect (+ verify) -> track -> crop, at flat memory.

Two passes over the file. Pass 1 (:func:`plan_face_crops`) decodes every frame, finds shot cuts
(:mod:`marlin.video.shots`), detects faces on the frames that will be used and checks some detections with a second
model (:class:`marlin.face.verify.MeshVerifier`). Tracks are built inside each shot only, so no box is ever carried
across a cut, and a track is kept only when it is *confirmed*: its detections score at least
:attr:`FaceChecks.min_score` and at least one of its checked detections passed the verifier. Pass 2
(:func:`iter_face_crops`) decodes again and crops with the smoothed boxes. Only boxes are held between the passes.

What windows a confirmed track yields (its per-window face coverage, ``--min-face-fraction``) is decided by
:func:`marlin.video.pipeline.clip_windows`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..face.crop import MEDIAPIPE_OFFICIAL_FRAMING, crop_face
from ..face.detect import Detection, boxes_array
from ..face.track import FaceTrack, NoFaceError, box_iou, track_face, track_faces
from .io import iter_frames
from .shots import CutDetector, shot_spans


@dataclass(frozen=True)
class FaceChecks:
    """When a detected face counts as a face (defaults measured on the shared face clips; see README "Face tracks")."""

    # Detections scoring below this are dropped: false faces on scenery scored 0.50-0.61; 99% of real faces >= 0.78.
    min_score: float = 0.6
    # A window keeps its features only when the face was detected on this fraction of its examined frames.
    min_face_fraction: float = 0.5
    # Check tracks with the face mesh (a drawn smiley scores 0.83 with the detector; the mesh rejects it).
    verify: bool = True
    # Check the detections of every `verify_every`-th examined frame of a shot, and wherever a new face appears.
    verify_every: int = 8
    # Split tracks at shot cuts, so that no box is borrowed from another scene.
    cuts: bool = True

    def __post_init__(self) -> None:
        for name in ("min_score", "min_face_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"FaceChecks.{name}: expected a value in [0, 1], got {getattr(self, name)}")
        if self.verify_every < 1:
            raise ValueError(f"FaceChecks.verify_every: expected >= 1, got {self.verify_every}")


@dataclass
class FacePlan:
    """Boxes for the frames of one video that will be cropped (the main face, or one face track)."""

    path: Path
    n_frames: int  # frames that actually decoded
    frames: np.ndarray  # [K] frame indices covered by `track`, ascending
    track: FaceTrack  # boxes [K, 4] for those frames, smoothed and filled (inside each shot only)
    framing: dict[str, float] = field(default_factory=lambda: dict(MEDIAPIPE_OFFICIAL_FRAMING))
    cuts: tuple[int, ...] = ()  # first frame of every shot but the first

    @property
    def n_faceless(self) -> int:
        """Frames among `frames` where no face was detected (their box was borrowed from the nearest frame)."""
        return int(self.track.n_missing)

    def shot(self, index: int) -> int:
        """Number of the shot frame `index` belongs to (0 before the first cut)."""
        return int(np.searchsorted(np.asarray(self.cuts, dtype=np.int64), index, side="right"))

    def box(self, index: int) -> np.ndarray | None:
        """Box for any frame index: the planned one, or that of the nearest planned frame *of the same shot*; None
        when the frame's shot has no planned frame (no confirmed face there)."""
        shot = self.shot(index)
        lo, hi = (self.cuts[shot - 1] if shot else 0), (self.cuts[shot] if shot < len(self.cuts) else None)
        a = int(np.searchsorted(self.frames, lo))
        b = len(self.frames) if hi is None else int(np.searchsorted(self.frames, hi))
        if a == b:
            return None
        k = a + int(np.clip(np.searchsorted(self.frames[a:b], index), 0, b - a - 1))
        if k > a and abs(self.frames[k - 1] - index) <= abs(self.frames[k] - index):
            k -= 1
        return self.track.boxes[k]


@dataclass
class _Pass1:
    """What pass 1 saw: examined frames, their confident detections, which detections the verifier passed."""

    n: int = 0
    cuts: list[int] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)
    detections: list[list[Detection]] = field(default_factory=list)
    verified: dict[tuple[int, int], bool] = field(default_factory=dict)  # (position in `frames`, det index) -> ok
    n_raw: int = 0  # detections before the score threshold
    best_score: float = 0.0


def plan_face_crops(
    path: str | os.PathLike,
    detector: Any,
    *,
    select: Callable[[int], bool] | None = None,
    every: int = 1,
    all_faces: bool = False,
    framing: dict[str, float] | None = None,
    checks: FaceChecks | None = None,
    verifier: Any = None,
    progress: Callable[[int], None] | None = None,
    **track_kwargs: Any,
) -> list[FacePlan]:
    """Pass 1: detect faces on the frames `select(index)` accepts that lie on every `every`-th frame of their shot,
    track them inside each shot, and keep the confirmed tracks.

    Returns one plan (the main face of each shot: largest, kept consistent over time) or, with `all_faces`, one per
    confirmed face track. `verifier` is anything with ``verify(frame, box) -> bool``; by default a face mesh
    (:class:`marlin.face.verify.MeshVerifier`) when ``checks.verify`` and mediapipe is installed.
    Raises `marlin.face.NoFaceError` when no face is confirmed, `VideoError` for unreadable files.
    """
    path, checks = Path(path), checks or FaceChecks()
    if verifier is None and checks.verify:
        verifier = _default_verifier()
    seen = _scan(path, detector, select, every, checks, verifier if checks.verify else None, progress)
    shots = shot_spans(seen.n, seen.cuts)
    frames = np.asarray(seen.frames, dtype=np.int64)
    framing = dict(MEDIAPIPE_OFFICIAL_FRAMING if framing is None else framing)
    plans: list[FacePlan] = []
    for lo, hi in shots:
        a, b = int(np.searchsorted(frames, lo)), int(np.searchsorted(frames, hi))
        dets = _confirmed_only(seen, a, b, track_kwargs)
        if not any(dets):
            continue
        if all_faces:
            for t in track_faces(dets, **track_kwargs):
                plans.append(FacePlan(path, seen.n, frames[a + t.start : a + t.stop], t, framing, tuple(seen.cuts)))
        else:
            t = track_face(dets, name=path, **track_kwargs)
            plans.append(FacePlan(path, seen.n, frames[a:b], t, framing, tuple(seen.cuts)))
    if not plans:
        raise NoFaceError(_no_face_reason(path, seen, checks))
    if not all_faces:
        return [_join(plans)]
    plans.sort(key=lambda p: (-int(p.track.detected.sum()), int(p.frames[0])))
    return plans


_VERIFIERS: dict[int, Any] = {}  # process id -> the default verifier, built once per process (not shared across fork)


def _default_verifier() -> Any:
    """This process's face-mesh verifier, kept for the next video: building a mesh graph per video cost ~0.3 s and
    printed MediaPipe's native log lines once per video (its threads log after construction)."""
    pid = os.getpid()
    if pid not in _VERIFIERS:
        try:
            from ..face.verify import MeshVerifier

            _VERIFIERS[pid] = MeshVerifier()
        except ImportError:
            _VERIFIERS[pid] = None  # no mediapipe (e.g. the haar detector without the [face] extra): score, coverage
    return _VERIFIERS[pid]


def _scan(
    path: Path,
    detector: Any,
    select: Callable[[int], bool] | None,
    every: int,
    checks: FaceChecks,
    verifier: Any,
    progress: Callable[[int], None] | None,
) -> _Pass1:
    """Decode every frame once: cuts, detections on the chosen frames, verifier checks."""
    seen = _Pass1()
    cutter = CutDetector() if checks.cuts else None
    shot_start, examined_in_shot = 0, 0
    for i, frame in enumerate(iter_frames(path)):
        seen.n = i + 1
        if cutter is not None and cutter.update(frame):
            seen.cuts.append(i)
            shot_start, examined_in_shot = i, 0
        if (i - shot_start) % every == 0 and (select is None or select(i)):
            raw = detector.detect(frame)
            seen.n_raw += len(raw)
            seen.best_score = max([seen.best_score] + [d.score for d in raw])
            dets = [d for d in raw if d.score >= checks.min_score]
            if verifier is not None and dets and _should_check(seen, examined_in_shot, dets, checks.verify_every):
                pos = len(seen.frames)
                for k, d in enumerate(dets):
                    seen.verified[(pos, k)] = bool(verifier.verify(frame, d.box))
            seen.frames.append(i)
            seen.detections.append(dets)
            examined_in_shot += 1
        if progress is not None:
            progress(i)
    return seen


def _should_check(seen: _Pass1, examined_in_shot: int, dets: Sequence[Detection], every: int) -> bool:
    """Check this frame's detections: on a fixed beat, and whenever a face appears that the last frame did not have."""
    if examined_in_shot % every == 0 or examined_in_shot == 0 or not seen.detections:
        return True
    before = seen.detections[-1]
    if not before:
        return True
    iou = box_iou(boxes_array(dets), boxes_array(before))  # [N, M]
    return bool((iou.max(axis=1) < 0.3).any())


def _confirmed_only(seen: _Pass1, a: int, b: int, track_kwargs: dict[str, Any]) -> list[list[Detection]]:
    """The detections of examined frames ``a:b`` (one shot) that belong to a track the verifier confirmed.

    Without checks (no verifier) every confident detection stays. A track none of whose detections was checked
    counts as unconfirmed: nothing unverified is cropped when a verifier is on.
    """
    dets = seen.detections[a:b]
    if not seen.verified or not any(dets):
        return dets if not seen.verified else [[] for _ in dets]
    keep: list[set[int]] = [set() for _ in dets]
    options = {k: v for k, v in track_kwargs.items() if k in ("iou_threshold", "max_gap", "window", "method", "fill")}
    for t in track_faces(dets, **options):
        members = [(t.start + j, int(d)) for j, d in enumerate(t.picked) if d >= 0]
        if any(seen.verified.get((a + pos, d), False) for pos, d in members):
            for pos, d in members:
                keep[pos].add(d)
    return [[d for k, d in enumerate(frame) if k in keep[pos]] for pos, frame in enumerate(dets)]


def _join(plans: list[FacePlan]) -> FacePlan:
    """One plan of the main face over all shots that have one (their boxes side by side; no box crosses a cut)."""
    if len(plans) == 1:
        return plans[0]
    tracks = [p.track for p in plans]
    detected = np.concatenate([t.detected for t in tracks])
    track = FaceTrack(
        boxes=np.concatenate([t.boxes for t in tracks]),
        detected=detected,
        n_missing=int((~detected).sum()),
        score=float(np.average([t.score for t in tracks], weights=[max(int(t.detected.sum()), 1) for t in tracks])),
        picked=np.concatenate([t.picked for t in tracks]) if all(t.picked is not None for t in tracks) else None,
    )
    first = plans[0]
    return FacePlan(first.path, first.n_frames, np.concatenate([p.frames for p in plans]), track, first.framing,
                    first.cuts)  # fmt: skip


def _no_face_reason(path: Path, seen: _Pass1, checks: FaceChecks) -> str:
    n_examined, n_conf = len(seen.frames), sum(len(d) for d in seen.detections)
    if seen.n_raw == 0:
        return f"no face detected in any of the {n_examined} examined frames of {path}; expected at least one"
    if n_conf == 0:
        return (f"{path}: no confident face: {seen.n_raw} detections in {n_examined} examined frames, all scoring "
                f"below {checks.min_score} (best {seen.best_score:.2f}); lower --min-score to accept them")  # fmt: skip
    failed = sum(not ok for ok in seen.verified.values())
    return (f"{path}: no confirmed face: {n_conf} detections in {n_examined} examined frames, but the face mesh "
            f"found no face in {failed} of the {len(seen.verified)} detections it checked (a face-like drawing, "
            f"logo or pattern?); --no-verify-faces skips this check")  # fmt: skip


def iter_face_crops(
    plan: FacePlan, wanted: set[int] | None = None, size: int = 224, resample: str = "bilinear"
) -> Iterator[tuple[int, np.ndarray]]:
    """Pass 2: yield (frame index, uint8 [size, size, 3] crop) for the wanted frames (default: the planned ones).

    Wanted frames whose shot has no confirmed face are left out (there is no box of their scene to crop them with).
    """
    wanted = set(plan.frames.tolist()) if wanted is None else wanted
    last = max(wanted) if wanted else -1
    for i, frame in enumerate(iter_frames(plan.path, stop=last + 1)):
        if i in wanted:
            box = plan.box(i)
            if box is not None:
                yield i, crop_face(frame, box, size=size, resample=resample, **plan.framing)
