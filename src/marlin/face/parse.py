"""Offline 11-class face parsing in the LaPa convention, built from MediaPipe's bundled models.

MARLIN's facial-guided masking needs a per-frame face-parsing map. No pip face parser runs offline, so this module
rasterises one from the two MediaPipe 0.10.21 solutions whose weights ship inside the wheel:

* ``face_mesh`` (478 landmarks with ``refine_landmarks=True``) gives the face oval, eyes, brows, lips and nose. Every
  polygon is derived in code from MediaPipe's own connection sets (``FACEMESH_FACE_OVAL``, ``FACEMESH_LEFT_EYE``, ...);
  only a handful of named landmarks (mouth corners, lip midpoints, nose tip, chin, forehead) are hardcoded.
* ``selfie_segmentation`` gives the person mask. Person pixels outside the face oval and above the nose tip are hair,
  unless their colour matches the face's skin (forehead above the mesh, ears); person pixels below the nose tip are
  neck or body, i.e. background for MARLIN.

Labels follow LaPa (see :data:`LAPA_LABELS`). "Right"/"left" are the *subject's*: the subject's right eye is on the
image's left side. MediaPipe names its sets the same way (``FACEMESH_RIGHT_EYE`` holds landmark 33, the outer corner
of the eye that appears on the image's left), so the mapping is direct.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import numpy as np

__all__ = [
    "LAPA_LABELS",
    "LAPA_PALETTE",
    "FaceParser",
    "FaceRegions",
    "LapaClass",
    "ParseConfig",
    "chains_from_edges",
    "face_mesh_regions",
    "rasterise_labels",
]


class LapaClass(IntEnum):
    """LaPa face-parsing class ids (subject's right/left)."""

    BACKGROUND = 0
    SKIN = 1
    RIGHT_BROW = 2
    LEFT_BROW = 3
    RIGHT_EYE = 4
    LEFT_EYE = 5
    NOSE = 6
    UPPER_LIP = 7
    INNER_MOUTH = 8
    LOWER_LIP = 9
    HAIR = 10


#: Class names indexed by label id.
LAPA_LABELS: tuple[str, ...] = tuple(c.name.lower() for c in LapaClass)

#: RGB colour per label id, ``[11, 3]`` uint8; background is black. Left/right pairs share a hue at two shades.
LAPA_PALETTE: np.ndarray = np.array(
    [
        (0, 0, 0),  # background
        (255, 204, 153),  # skin
        (153, 102, 51),  # right brow
        (102, 51, 0),  # left brow
        (0, 153, 255),  # right eye
        (0, 255, 255),  # left eye
        (255, 102, 0),  # nose
        (255, 0, 102),  # upper lip
        (153, 0, 204),  # inner mouth
        (204, 0, 0),  # lower lip
        (0, 204, 0),  # hair
    ],
    dtype=np.uint8,
)
LAPA_PALETTE.setflags(write=False)

# Named face-mesh landmarks (MediaPipe canonical face model indices).
_MOUTH_CORNERS_OUTER = (61, 291)  # subject's right, left outer lip corners
_MOUTH_CORNERS_INNER = (78, 308)  # subject's right, left inner lip corners
_UPPER_LIP_OUTER_MID, _UPPER_LIP_INNER_MID = 0, 13  # philtrum edge, upper-lip inner edge at the midline
_NOSE_TIP, _CHIN, _FOREHEAD = 1, 152, 10


def chains_from_edges(edges: Iterable[tuple[int, int]]) -> list[tuple[list[int], bool]]:
    """Split an undirected edge set into ordered vertex chains.

    Returns ``(vertices, closed)`` per connected component: a closed loop (every vertex of degree 2) or an open path
    from one degree-1 end to the other. Components are sorted by their smallest vertex so the result is deterministic.
    Raises ``ValueError`` on a branching component (a vertex of degree > 2), which no polygon can be read from.
    """
    adj: dict[int, list[int]] = {}
    for a, b in edges:
        adj.setdefault(a, []).append(b)
        adj.setdefault(b, []).append(a)
    branching = sorted(v for v, n in adj.items() if len(n) > 2)
    if branching:
        raise ValueError(f"chains_from_edges: expected vertices of degree <= 2, found branching at {branching[:5]}")

    seen: set[int] = set()
    chains: list[tuple[list[int], bool]] = []
    for start in sorted(adj):
        if start in seen:
            continue
        # Collect the component, then walk it from an open end if it has one.
        comp, stack = {start}, [start]
        while stack:
            for n in adj[stack.pop()]:
                if n not in comp:
                    comp.add(n)
                    stack.append(n)
        ends = sorted(v for v in comp if len(adj[v]) == 1)
        first = ends[0] if ends else min(comp)
        path, prev, cur = [first], None, first
        while True:
            nxt = [n for n in adj[cur] if n != prev]
            if not nxt or nxt[0] == first:
                break
            prev, cur = cur, min(nxt)
            path.append(cur)
        seen |= comp
        chains.append((path, not ends))
    return chains


@dataclass(frozen=True)
class FaceRegions:
    """Landmark indices of every parsed region, in polygon order.

    ``oval``/``*_eye``/``lips_*`` are closed loops; a brow is two open paths (its upper and lower contours, in either
    order and direction) joined into a band at raster time; ``nose`` is a point set whose convex hull is painted.
    """

    oval: tuple[int, ...]
    right_eye: tuple[int, ...]
    left_eye: tuple[int, ...]
    right_brow: tuple[tuple[int, ...], tuple[int, ...]]
    left_brow: tuple[tuple[int, ...], tuple[int, ...]]
    lips_outer: tuple[int, ...]
    lips_inner: tuple[int, ...]
    nose: tuple[int, ...]
    mouth_corners_outer: tuple[int, int] = _MOUTH_CORNERS_OUTER
    mouth_corners_inner: tuple[int, int] = _MOUTH_CORNERS_INNER
    upper_lip_outer_mid: int = _UPPER_LIP_OUTER_MID
    upper_lip_inner_mid: int = _UPPER_LIP_INNER_MID
    nose_tip: int = _NOSE_TIP
    chin: int = _CHIN
    forehead: int = _FOREHEAD


def _single_loop(edges: Iterable[tuple[int, int]], name: str) -> tuple[int, ...]:
    chains = chains_from_edges(edges)
    if len(chains) != 1 or not chains[0][1]:
        raise ValueError(f"face_mesh_regions: expected {name} to be one closed loop, found {len(chains)} chain(s)")
    return tuple(chains[0][0])


def _two_paths(edges: Iterable[tuple[int, int]], name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    chains = chains_from_edges(edges)
    if len(chains) != 2 or any(closed for _, closed in chains):
        raise ValueError(f"face_mesh_regions: expected {name} to be two open paths, found {len(chains)} chain(s)")
    return tuple(chains[0][0]), tuple(chains[1][0])


@functools.cache
def face_mesh_regions() -> FaceRegions:
    """Derive the region polygons from MediaPipe's face-mesh connection sets (needs the ``[face]`` extra)."""
    fm = _import_mediapipe().solutions.face_mesh
    lip_loops = chains_from_edges(fm.FACEMESH_LIPS)
    if len(lip_loops) != 2 or not all(closed for _, closed in lip_loops):
        raise ValueError(f"face_mesh_regions: expected FACEMESH_LIPS to be two closed loops, found {len(lip_loops)}")
    inner = [loop for loop, _ in lip_loops if _UPPER_LIP_INNER_MID in loop]
    outer = [loop for loop, _ in lip_loops if _UPPER_LIP_OUTER_MID in loop]
    if len(inner) != 1 or len(outer) != 1 or inner[0] == outer[0]:
        raise ValueError("face_mesh_regions: could not tell the inner lip loop from the outer one in FACEMESH_LIPS")
    return FaceRegions(
        oval=_single_loop(fm.FACEMESH_FACE_OVAL, "FACEMESH_FACE_OVAL"),
        right_eye=_single_loop(fm.FACEMESH_RIGHT_EYE, "FACEMESH_RIGHT_EYE"),
        left_eye=_single_loop(fm.FACEMESH_LEFT_EYE, "FACEMESH_LEFT_EYE"),
        right_brow=_two_paths(fm.FACEMESH_RIGHT_EYEBROW, "FACEMESH_RIGHT_EYEBROW"),
        left_brow=_two_paths(fm.FACEMESH_LEFT_EYEBROW, "FACEMESH_LEFT_EYEBROW"),
        lips_outer=tuple(outer[0]),
        lips_inner=tuple(inner[0]),
        nose=tuple(sorted({i for edge in fm.FACEMESH_NOSE for i in edge})),
    )


@dataclass
class ParseConfig:
    """Rasterisation settings (all lengths are fractions of the inter-ocular distance, so they scale with the face).

    Attributes:
        person_threshold: selfie-segmentation probability above which a pixel belongs to the person.
        brow_thickness: extra half-thickness added around each brow band; MediaPipe's brow contours sit inside the
            hairs, so a little dilation makes them match LaPa's thick brows.
        eye_dilation: optional dilation of the eyelid contour (0 keeps MediaPipe's lid-margin polygon).
        skin_from_colour: classify person pixels above the nose tip outside the oval as skin when their colour matches
            the face (high foreheads, ears) instead of calling all of them hair.
        skin_colour_distance: chroma (Cr, Cb) Mahalanobis distance, against skin sampled on the same frame's cheeks
            (between the nose tip and the eyes), under which such a pixel can count as skin.
        skin_max_darker: ... and how many luminance standard deviations darker than that skin it may be.
        skin_reach: how far outside the oval skin may extend (ears, upper forehead); farther person pixels are hair.
        clip_skin_to_person: drop oval pixels the person mask rejects (background peeking past a turned cheek).
        hairline_margin: oval pixels higher than this above the brows may be relabelled hair (hairline, fringe) when
            their colour is not skin and they join hair outside the oval.
        hair_smoothing: radius of the morphological clean-up of the hair/skin split.
        hair_min_area: hair regions with less than this fraction of the face-oval area outside the oval become skin.
    """

    person_threshold: float = 0.5
    brow_thickness: float = 0.03
    eye_dilation: float = 0.0
    skin_from_colour: bool = True
    skin_colour_distance: float = 3.0
    skin_max_darker: float = 2.0
    skin_reach: float = 0.35
    clip_skin_to_person: bool = True
    hairline_margin: float = 0.15
    hair_smoothing: float = 0.04
    hair_min_area: float = 0.01


def _fill(canvas: np.ndarray, points: np.ndarray, value: int) -> None:
    """Fill one polygon (``[K, 2]`` float pixel xy) into ``canvas`` with sub-pixel precision."""
    import cv2

    shift = 4
    pts = np.round(points * (1 << shift)).astype(np.int32)[None]  # [1, K, 2]
    cv2.fillPoly(canvas, pts, int(value), lineType=cv2.LINE_8, shift=shift)


def _band(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Join two open contours ``[K, 2]`` into one polygon, orienting ``b`` so the closing edges do not cross."""
    straight = np.linalg.norm(a[-1] - b[0]) + np.linalg.norm(b[-1] - a[0])
    flipped = np.linalg.norm(a[-1] - b[-1]) + np.linalg.norm(b[0] - a[0])
    return np.concatenate([a, b if straight < flipped else b[::-1]])


def _arcs(loop: tuple[int, ...], corners: tuple[int, int], through: int) -> tuple[list[int], list[int]]:
    """Split a closed loop at two corner vertices; return (arc containing ``through``, other arc), both corner to
    corner starting at ``corners[0]``."""
    i = loop.index(corners[0])
    rolled = list(loop[i:]) + list(loop[:i])  # starts at corners[0]
    k = rolled.index(corners[1])
    fwd = rolled[: k + 1]  # corners[0] -> corners[1] one way round
    back = [rolled[0]] + rolled[k:][::-1]  # ... and the other way
    return (fwd, back) if through in fwd else (back, fwd)


def _dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    import cv2

    r = int(round(radius))
    if r <= 0:
        return mask
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def rasterise_labels(
    landmarks: np.ndarray,
    shape: tuple[int, int],
    regions: FaceRegions,
    person: np.ndarray | None = None,
    frame: np.ndarray | None = None,
    config: ParseConfig | None = None,
) -> np.ndarray:
    """Paint an ``[H, W]`` uint8 LaPa label map from face-mesh landmarks.

    Args:
        landmarks: ``[N, 2]`` landmark positions in pixels (x, y), indexed as in ``regions``.
        shape: ``(H, W)`` of the output.
        regions: polygon indices, normally :func:`face_mesh_regions`.
        person: optional ``[H, W]`` bool person mask; without it no hair is painted and skin is not clipped.
        frame: optional ``[H, W, 3]`` uint8 RGB frame, used to tell skin from hair by colour above the face oval.
        config: rasterisation settings.
    """
    _import_cv2()  # fail early, with an install hint, when OpenCV is missing
    cfg = config or ParseConfig()
    h, w = shape
    lm = np.asarray(landmarks, dtype=np.float64)  # [N, 2] (x, y) pixels
    r_eye, l_eye = _eye_centres(lm, regions)
    iod = max(float(np.linalg.norm(r_eye - l_eye)), 1.0)  # inter-ocular distance: the length scale

    labels = np.zeros((h, w), dtype=np.uint8)  # [H, W]
    oval = _paint_skin(labels, lm, regions, person, cfg.clip_skin_to_person)  # [H, W] 0/1
    # Features, painted over skin in order: nose, eyes, brows, lips, inner mouth.
    _paint_nose(labels, lm, regions)
    _paint_eyes(labels, lm, regions, cfg.eye_dilation * iod)
    _paint_brows(labels, lm, regions, cfg.brow_thickness * iod)
    _paint_mouth(labels, lm, regions)
    if person is not None:
        _paint_head(labels, lm, regions, oval, person, frame, cfg, iod)
    return labels


def _eye_centres(lm: np.ndarray, regions: FaceRegions) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[2]`` positions of the right and left eye contours: they set the face's length scale and eye line."""
    return lm[list(regions.right_eye)].mean(0), lm[list(regions.left_eye)].mean(0)


def _paint_skin(
    labels: np.ndarray, lm: np.ndarray, regions: FaceRegions, person: np.ndarray | None, clip_to_person: bool
) -> np.ndarray:
    """Paint the face oval as skin, clipped to the person mask if asked; returns the unclipped ``[H, W]`` uint8 oval."""
    oval = np.zeros(labels.shape, dtype=np.uint8)  # [H, W]
    _fill(oval, lm[list(regions.oval)], 1)
    oval_mask = oval.astype(bool)
    if person is not None and clip_to_person:
        oval_mask &= person
    labels[oval_mask] = LapaClass.SKIN
    return oval


def _paint_nose(labels: np.ndarray, lm: np.ndarray, regions: FaceRegions) -> None:
    """Paint the nose as the convex hull of its landmarks, which are an unordered point set rather than a contour."""
    import cv2

    hull = cv2.convexHull(lm[list(regions.nose)].astype(np.float32))[:, 0]  # [K, 2]
    _fill(labels, hull.astype(np.float64), LapaClass.NOSE)


def _paint_eyes(labels: np.ndarray, lm: np.ndarray, regions: FaceRegions, dilation: float) -> None:
    """Paint both eyes from their lid contours, grown by ``dilation`` px when positive (the contours hug the lids)."""
    for loop, cls in ((regions.right_eye, LapaClass.RIGHT_EYE), (regions.left_eye, LapaClass.LEFT_EYE)):
        if dilation > 0:
            eye = np.zeros(labels.shape, dtype=np.uint8)  # [H, W]
            _fill(eye, lm[list(loop)], 1)
            labels[_dilate(eye, dilation)] = cls
        else:
            _fill(labels, lm[list(loop)], cls)


def _paint_brows(labels: np.ndarray, lm: np.ndarray, regions: FaceRegions, thickness: float) -> None:
    """Paint both brows as the band between their two contours, grown by ``thickness`` px to match LaPa's brows."""
    for (edge_a, edge_b), cls in ((regions.right_brow, LapaClass.RIGHT_BROW), (regions.left_brow, LapaClass.LEFT_BROW)):
        brow = np.zeros(labels.shape, dtype=np.uint8)  # [H, W]
        _fill(brow, _band(lm[list(edge_a)], lm[list(edge_b)]), 1)
        labels[_dilate(brow, thickness)] = cls


def _paint_mouth(labels: np.ndarray, lm: np.ndarray, regions: FaceRegions) -> None:
    """Paint each lip as the band between its outer and inner arcs, then the inner mouth over both."""
    up_out, lo_out = _arcs(regions.lips_outer, regions.mouth_corners_outer, regions.upper_lip_outer_mid)
    up_in, lo_in = _arcs(regions.lips_inner, regions.mouth_corners_inner, regions.upper_lip_inner_mid)
    _fill(labels, np.concatenate([lm[up_out], lm[up_in[::-1]]]), LapaClass.UPPER_LIP)
    _fill(labels, np.concatenate([lm[lo_out], lm[lo_in[::-1]]]), LapaClass.LOWER_LIP)
    _fill(labels, lm[list(regions.lips_inner)], LapaClass.INNER_MOUTH)


def _height_above(tip: np.ndarray, up: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``[H, W]`` signed px of every pixel above ``tip`` along the unit ``up`` axis: head above 0, neck below."""
    h, w = shape
    xs = (np.arange(w, dtype=np.float32) - tip[0]) * up[0]  # [W]
    ys = (np.arange(h, dtype=np.float32) - tip[1]) * up[1]  # [H]
    return ys[:, None] + xs[None, :]  # [H, W]


def _paint_head(
    labels: np.ndarray,
    lm: np.ndarray,
    regions: FaceRegions,
    oval: np.ndarray,
    person: np.ndarray,
    frame: np.ndarray | None,
    cfg: ParseConfig,
    iod: float,
) -> None:
    """Paint person pixels above the nose tip outside the oval as hair or skin; neck and body stay background."""
    # Head: person pixels above the nose tip along the face's chin->forehead axis. Outside the oval they are hair or
    # skin (forehead above the mesh, ears); neck and body below the tip stay background.
    up = lm[regions.forehead] - lm[regions.chin]
    up /= max(float(np.linalg.norm(up)), 1e-6)
    tip = lm[regions.nose_tip]
    height = _height_above(tip, up, labels.shape)  # [H, W] signed px above the nose tip
    outside = person & ~oval.astype(bool) & (height > 0)
    if not outside.any():
        return
    if cfg.skin_from_colour and frame is not None:
        brows = lm[list(regions.right_brow[0] + regions.right_brow[1] + regions.left_brow[0] + regions.left_brow[1])]
        brow_top = float(((brows - tip) @ up).max())  # px above the nose tip
        r_eye, l_eye = _eye_centres(lm, regions)
        eye_height = float(((r_eye + l_eye) / 2 - tip) @ up)
        hair = _hair_by_colour(labels, oval, outside, height, frame, brow_top, eye_height, cfg, iod)
    else:
        hair = outside
    labels[outside & ~hair] = LapaClass.SKIN
    labels[hair & ((labels == LapaClass.BACKGROUND) | (labels == LapaClass.SKIN))] = LapaClass.HAIR


def _hair_by_colour(
    labels: np.ndarray,
    oval: np.ndarray,
    outside: np.ndarray,
    height: np.ndarray,
    frame: np.ndarray,
    brow_top: float,
    eye_height: float,
    cfg: ParseConfig,
    iod: float,
) -> np.ndarray:
    """``[H, W]`` bool hair: head pixels not coloured like the cheeks, in regions big enough to be hair, not specks.

    ``brow_top`` and ``eye_height`` are px above the nose tip, like ``height``; the hairline may come down to
    ``hairline_margin`` above the brows, and the cheeks between the nose tip and the eyes give the skin colour.
    """
    import cv2

    forehead = (labels == LapaClass.SKIN) & (height > brow_top + cfg.hairline_margin * iod)
    # Cheeks between the nose tip and the eyes: skin, and clear of beards, fringes and the mouth.
    sample = (labels == LapaClass.SKIN) & (height > 0) & (height < eye_height)
    # Skin beyond the mesh (upper forehead, ears) stays within reach of the oval; farther out it is hair.
    reach = cv2.distanceTransform(1 - oval, cv2.DIST_L2, 3) <= cfg.skin_reach * iod  # [H, W]
    candidates = outside | forehead
    skin_like = _skin_like(frame, sample, candidates & reach, cfg.skin_colour_distance, cfg.skin_max_darker)
    hairish = candidates & ~skin_like
    hairish = _smooth(hairish, cfg.hair_smoothing * iod)
    # Hair inside the oval (hairline, fringe) must join a sizeable hair region outside it.
    min_area = cfg.hair_min_area * max(int(oval.sum()), 1)
    return _components_reaching(hairish & candidates, outside, min_area)


def _smooth(mask: np.ndarray, radius: float) -> np.ndarray:
    """Morphological close then open with a disc: fills pinholes and removes specks smaller than ``radius``."""
    import cv2

    r = int(round(radius))
    if r <= 0:
        return mask
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    m = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, kernel)
    return cv2.morphologyEx(m, cv2.MORPH_OPEN, kernel).astype(bool)


def _components_reaching(mask: np.ndarray, region: np.ndarray, min_area: float) -> np.ndarray:
    """Connected components of ``mask`` with at least ``min_area`` of their pixels inside ``region``."""
    import cv2

    n, comp = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    inside = np.bincount(comp[region & mask], minlength=n)  # [n] pixels of each component inside region
    keep = inside >= max(min_area, 1)
    keep[0] = False
    return keep[comp]


def _skin_like(
    frame: np.ndarray, skin: np.ndarray, candidates: np.ndarray, max_distance: float, max_darker: float
) -> np.ndarray:
    """``[H, W]`` bool: candidates coloured like the ``skin`` sample of the same frame.

    A pixel is skin-like when its chroma (Cr, Cb) is within ``max_distance`` (Mahalanobis) of the sample and it is
    not darker than the sample's mean luminance by more than ``max_darker`` standard deviations. Brightness is tested
    one-sidedly because foreheads catch more light than cheeks, while hair is mostly darker than skin.
    """
    import cv2

    ycc = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2YCrCb).astype(np.float32)  # [H, W, 3]
    sample = ycc[skin]  # [S, 3]
    if len(sample) < 50:
        return np.zeros_like(candidates)
    # Robust fit: keep the central 80% by luminance (drops specular highlights and shadowed creases).
    lo, hi = np.percentile(sample[:, 0], [10, 90])
    sample = sample[(sample[:, 0] >= lo) & (sample[:, 0] <= hi)]
    mean, std_y = sample.mean(0), float(sample[:, 0].std()) + 2.0
    d = sample[:, 1:] - mean[1:]  # [S, 2]
    (a, b), (_, e) = (d.T @ d) / max(len(d) - 1, 1) + np.eye(2) * 1.0  # chroma covariance; floor for flat chroma
    det = a * e - b * b
    c = ycc[candidates]  # [C, 3]
    dcr, dcb = c[:, 1] - mean[1], c[:, 2] - mean[2]  # [C]
    dist2 = (e * dcr * dcr - 2 * b * dcr * dcb + a * dcb * dcb) / det  # Mahalanobis^2 via the 2x2 inverse
    out = np.zeros_like(candidates)
    out[candidates] = (dist2 < max_distance**2) & (c[:, 0] > mean[0] - max_darker * std_y)
    return out


def _import_mediapipe() -> Any:
    try:
        import mediapipe as mp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("marlin.face.parse needs mediapipe: pip install 'marlin[face]'") from e
    return mp


def _import_cv2() -> Any:
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "marlin.face.parse needs OpenCV (installed with mediapipe): pip install 'marlin[face]'"
        ) from e
    return cv2


def _check_frame(frame: np.ndarray, where: str) -> np.ndarray:
    if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[-1] != 3 or frame.dtype != np.uint8:
        desc = f"{type(frame).__name__} {getattr(frame, 'shape', '')} {getattr(frame, 'dtype', '')}".strip()
        raise ValueError(f"{where}: expected an [H, W, 3] uint8 RGB frame, got {desc}")
    return np.ascontiguousarray(frame)


class FaceParser:
    """Per-frame LaPa face parser over MediaPipe face mesh + selfie segmentation (a context manager).

    With ``static_image_mode=False`` (the default) the face mesh tracks landmarks from frame to frame, which is
    faster and steadier on video; call :meth:`reset` between unrelated clips. Frames with no face parse to all
    background and are counted in :attr:`n_missing` (out of :attr:`n_frames`); :attr:`last_found` holds the
    per-frame ``[T]`` bool result of the latest :meth:`parse` / :meth:`parse_frames` call.

    Example::

        with FaceParser() as parser:
            labels = parser.parse_frames(frames)  # [T, H, W] uint8
            print(parser.n_missing, "of", parser.n_frames, "frames had no face")
    """

    def __init__(
        self,
        *,
        static_image_mode: bool = False,
        min_detection_confidence: float = 0.5,
        min_tracking_confidence: float = 0.5,
        selfie_model: int = 0,
        config: ParseConfig | None = None,
    ) -> None:
        """Build the two MediaPipe graphs (a few hundred ms; reuse one parser across clips and call :meth:`reset`).

        Args:
            static_image_mode: run detection on every frame instead of tracking (for unrelated stills).
            min_detection_confidence: face-mesh detector threshold.
            min_tracking_confidence: face-mesh tracking threshold (below it the detector runs again).
            selfie_model: selfie-segmentation model, 0 general (square inputs) or 1 landscape.
            config: rasterisation settings.
        """
        mp = _import_mediapipe()
        self.config = config or ParseConfig()
        self.regions = face_mesh_regions()
        self.n_frames = 0
        self.n_missing = 0
        self.last_found = np.zeros(0, dtype=bool)
        self._warm: set[int] = set()  # graphs that ran once (their native log lines are out of the way)
        from ..utils.quiet import quiet_native_logs

        # Building a graph starts threads that print MediaPipe's native log lines, some only once the graph first
        # runs: build both and run each once on a blank frame (no face: no tracking state) in one quiet window.
        with quiet_native_logs():
            self._mesh: Any = mp.solutions.face_mesh.FaceMesh(
                static_image_mode=static_image_mode,
                max_num_faces=1,
                refine_landmarks=True,
                min_detection_confidence=min_detection_confidence,
                min_tracking_confidence=min_tracking_confidence,
            )
            self._selfie: Any = mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=selfie_model)
            blank = np.zeros((32, 32, 3), dtype=np.uint8)
            self._mesh.process(blank)
            self._selfie.process(blank)
        self._warm.update((0, 1))

    def __enter__(self) -> FaceParser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the MediaPipe graphs."""
        for graph in (self._mesh, self._selfie):
            if graph is not None:
                graph.close()
        self._mesh = self._selfie = None
        self._warm.clear()

    def reset(self) -> None:
        """Forget the tracked face (call between unrelated clips)."""
        self._graphs()[0].reset()

    def _graphs(self) -> tuple[Any, Any]:
        if self._mesh is None:
            raise RuntimeError("FaceParser: used after close()")
        return self._mesh, self._selfie

    def _process(self, which: int, frame: np.ndarray) -> Any:
        """Run graph `which` (0 mesh, 1 selfie); its first run keeps MediaPipe's native log lines off the terminal."""
        graph = self._graphs()[which]
        if which in self._warm:
            return graph.process(frame)
        from ..utils.quiet import quiet_native_logs

        with quiet_native_logs():
            out = graph.process(frame)
        self._warm.add(which)
        return out

    def landmarks(self, frame: np.ndarray) -> np.ndarray | None:
        """``[478, 2]`` face-mesh landmarks in pixels (x, y) for an RGB frame, or None when no face is found."""
        frame = _check_frame(frame, "FaceParser.landmarks")
        result = self._process(0, frame)
        if not result.multi_face_landmarks:
            return None
        h, w = frame.shape[:2]
        pts = result.multi_face_landmarks[0].landmark
        return np.array([(p.x * w, p.y * h) for p in pts], dtype=np.float64)  # [478, 2]

    def person_mask(self, frame: np.ndarray) -> np.ndarray:
        """``[H, W]`` bool person mask from selfie segmentation."""
        frame = _check_frame(frame, "FaceParser.person_mask")
        prob = self._process(1, frame).segmentation_mask  # [H, W] float32 in [0, 1]
        return prob > self.config.person_threshold

    def _parse_one(self, frame: np.ndarray) -> tuple[np.ndarray, bool]:
        frame = _check_frame(frame, "FaceParser.parse")
        self.n_frames += 1
        lm = self.landmarks(frame)
        if lm is None:
            self.n_missing += 1
            return np.zeros(frame.shape[:2], dtype=np.uint8), False
        labels = rasterise_labels(lm, frame.shape[:2], self.regions, self.person_mask(frame), frame, self.config)
        return labels, True

    def parse(self, frame: np.ndarray) -> np.ndarray:
        """Parse one ``[H, W, 3]`` uint8 RGB frame into ``[H, W]`` uint8 LaPa labels (all 0 when no face)."""
        labels, found = self._parse_one(frame)
        self.last_found = np.array([found])
        return labels

    def parse_frames(self, frames: np.ndarray | Iterable[np.ndarray]) -> np.ndarray:
        """Parse ``[T, H, W, 3]`` uint8 RGB frames (in temporal order) into ``[T, H, W]`` uint8 labels."""
        out, found = [], []
        for frame in frames:
            labels, ok = self._parse_one(frame)
            out.append(labels)
            found.append(ok)
        if not out:
            raise ValueError("FaceParser.parse_frames: expected at least one frame, got none")
        self.last_found = np.array(found, dtype=bool)
        return np.stack(out)  # [T, H, W]
