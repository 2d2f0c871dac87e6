"""Token masks for MARLIN pre-training: face-guided ("Fasking") and the VideoMAE baselines.

Convention (project-wide): a mask is a boolean *visibility* mask of shape ``[B, N]``, ``N = t * h * w`` tokens ordered
time-major ``(t, h, w)``. ``True`` means the token is visible to the encoder, ``False`` means it is hidden and must be
reconstructed by the decoder. Such tensors are named ``visible``. With the defaults (16 frames, tubelet 2, 224 px,
patch 16) the token grid is ``8 x 14 x 14 = 1568`` and ``mask_ratio=0.9`` leaves ``156`` visible tokens.

Every strategy first builds a raw visibility grid, then :func:`normalize_visible` hides or reveals random tokens so
that every sample has exactly :func:`num_visible` visible tokens (a fixed count lets the encoder batch the gather).

============  ==========================================================================================
strategy      raw visibility, per clip, before normalisation
============  ==========================================================================================
fasking       per tubelet, from the parse map of its first frame: start all hidden and reveal the patches of
              background, skin, then the five components (right eye, left eye, nose, mouth, hair) in a
              random order, label by label, until at least ``1 - mask_ratio`` of the ``h * w`` patches are
              visible. The components are the last to be revealed, so they are mostly hidden.
fasking_opp   the same walk in the opposite order: the five components (random order), skin, background.
random        all visible (the normalisation alone picks the visible tokens uniformly at random).
tube          ``ceil(h * w * (1 - mask_ratio))`` random patches visible, the same in every tubelet.
frame         ``ceil(t * (1 - mask_ratio))`` random time steps (tubelets) fully visible.
============  ==========================================================================================

Face-parsing labels follow LaPa (11 classes): 0 background, 1 skin, 2 right brow, 3 left brow, 4 right eye,
5 left eye, 6 nose, 7 upper lip, 8 inner mouth, 9 lower lip, 10 hair. Regions group them as in the official code:
right eye ``[2, 4]``, left eye ``[3, 5]``, nose ``[6]``, mouth ``[7, 8, 9]``, hair ``[10]``, skin ``[1]``,
background ``[0]``.

Faithfulness notes (checked against the official MARLIN data loader):

* The walk checks the visible fraction after each *label* (not after each whole region) and stops as soon as it
  reaches ``1 - mask_ratio``; a patch is revealed when any of its pixels carries the label. Whole labels are
  revealed, so a frame may overshoot the budget; the normalisation removes the excess.
* A frame whose parse map carries no face label (none of 1..9, e.g. an all-background map written when no face was
  detected) is all visible, as the official code does for a frame without a parsing result; the normalisation then
  makes it a random mask.
* Where a raw mask has fewer visible tokens than the target, the normalisation reveals random hidden tokens (the
  official code crashes there). With labels in 0..10 and the strategies above this cannot happen; it only matters
  for masks built elsewhere and passed to :func:`normalize_visible`.
* Counts use ``floor`` / ``ceil`` of ``n * (1 - mask_ratio)`` as the official code does, with a 1e-6 guard against
  float noise (``10 * (1 - 0.9)`` is ``0.999...``); the defaults give the official 156 / 20 / 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "COMPONENT_REGIONS",
    "FACE_LABELS",
    "FACE_STRATEGIES",
    "Masker",
    "NUM_LABELS",
    "REGION_LABELS",
    "STRATEGIES",
    "face_guided_visible",
    "frame_visible",
    "generate_visible",
    "normalize_visible",
    "num_visible",
    "patch_has_label",
    "token_grid",
    "tube_visible",
    "visible_indices",
]

STRATEGIES: tuple[str, ...] = ("fasking", "fasking_opp", "random", "tube", "frame")
FACE_STRATEGIES: tuple[str, ...] = ("fasking", "fasking_opp")  # the ones that need parse maps

NUM_LABELS = 11  # LaPa classes 0..10
FACE_LABELS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9)  # skin and facial components; a frame needs one of them

# Region name -> parse labels, in the official order (the first five are the shuffled components).
REGION_LABELS: dict[str, tuple[int, ...]] = {
    "right_eye": (2, 4),
    "left_eye": (3, 5),
    "nose": (6,),
    "mouth": (7, 8, 9),
    "hair": (10,),
    "skin": (1,),
    "background": (0,),
}
COMPONENT_REGIONS: tuple[str, ...] = ("right_eye", "left_eye", "nose", "mouth", "hair")

_EPS = 1e-6  # guard for floor/ceil of n * (1 - mask_ratio) against float noise


def _check_ratio(mask_ratio: float) -> None:
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), found {mask_ratio}")


def num_visible(n_tokens: int, mask_ratio: float) -> int:
    """Number of visible tokens per sample after normalisation: ``floor(n_tokens * (1 - mask_ratio))``."""
    _check_ratio(mask_ratio)
    n = int(math.floor(n_tokens * (1.0 - mask_ratio) + _EPS))
    if n < 1:
        raise ValueError(f"mask_ratio={mask_ratio} leaves no visible token out of {n_tokens}; expected at least one")
    return n


def _num_visible_ceil(n_units: int, mask_ratio: float) -> int:
    """``ceil(n_units * (1 - mask_ratio))``: units kept by the tube / frame strategies and the face-walk budget."""
    _check_ratio(mask_ratio)
    return max(1, int(math.ceil(n_units * (1.0 - mask_ratio) - _EPS)))


def token_grid(clip_frames: int = 16, tubelet: int = 2, img_size: int = 224, patch: int = 16) -> tuple[int, int, int]:
    """Token grid ``(t, h, w)`` of a clip; e.g. ``(8, 14, 14)`` for the defaults."""
    for name, value in (("clip_frames", clip_frames), ("tubelet", tubelet), ("img_size", img_size), ("patch", patch)):
        if value < 1:
            raise ValueError(f"{name} must be a positive int, found {value}")
    if clip_frames % tubelet:
        raise ValueError(f"clip_frames must be divisible by tubelet={tubelet}, found clip_frames={clip_frames}")
    if img_size % patch:
        raise ValueError(f"img_size must be divisible by patch, found img_size={img_size}, patch={patch}")
    return clip_frames // tubelet, img_size // patch, img_size // patch


def _or_fold(x: Tensor, dim: int) -> Tensor:
    """Bitwise-OR reduce ``x`` over ``dim`` by repeated halving (log2(n) vectorised steps); keeps ``dim`` as size 1."""
    n = x.shape[dim]
    while n > 1:
        half = n // 2
        folded = x.narrow(dim, 0, half) | x.narrow(dim, half, half)
        if n % 2:  # odd: fold the last slice into the first
            first = folded.narrow(dim, 0, 1)
            first |= x.narrow(dim, n - 1, 1)
        x, n = folded, half
    return x


def _patch_label_bits(parse: Tensor, patch: int, chunk: int = 16) -> Tensor:
    """Per patch, the set of labels present as a bitmask (bit ``l`` set iff some pixel carries label ``l``).

    One pass over the pixels instead of one per label: each pixel becomes ``1 << label`` and every patch is
    OR-reduced. Maps are processed ``chunk`` at a time so the int16 intermediates stay in cache (4x faster for a
    batch of 32 clips than one pass over the whole batch). Raises ValueError for labels outside ``[0, NUM_LABELS)``.

    Args:
        parse: ``[..., H, W]`` integer labels, ``H`` and ``W`` divisible by ``patch`` (not checked here).
        patch: patch side in pixels.
        chunk: maps per step.

    Returns:
        ``[..., H // patch, W // patch]`` int16.
    """
    *lead, height, width = parse.shape
    h, w = height // patch, width // patch
    one = torch.ones((), dtype=torch.int16, device=parse.device)
    out = []
    for maps in parse.reshape(-1, height, width).split(chunk):  # [m, H, W]
        _check_label_range(maps)
        bits = torch.bitwise_left_shift(one, maps.to(torch.int16))  # [m, H, W]
        bits = bits.reshape(-1, h, patch, w, patch)  # [m, h, p, w, p]
        out.append(_or_fold(_or_fold(bits, 2), 4))  # [m, h, 1, w, 1]; rows first: long contiguous halves
    return torch.cat(out).reshape(*lead, h, w)


def _label_bitmask(labels: Sequence[int]) -> int:
    mask = 0
    for label in labels:
        mask |= 1 << int(label)
    return mask


def patch_has_label(parse: Tensor, labels: Sequence[int], patch: int) -> Tensor:
    """Whether any pixel of each patch carries one of ``labels``.

    Args:
        parse: ``[..., H, W]`` integer labels, ``H`` and ``W`` divisible by ``patch``.
        labels: the labels to look for.
        patch: patch side in pixels.

    Returns:
        ``[..., H // patch, W // patch]`` bool.
    """
    if parse.ndim < 2 or parse.shape[-2] % patch or parse.shape[-1] % patch:
        raise ValueError(f"parse must be [..., H, W] with H, W divisible by patch={patch}, found {tuple(parse.shape)}")
    *lead, height, width = parse.shape
    h, w = height // patch, width // patch
    hit = torch.isin(parse, torch.as_tensor(list(labels), dtype=parse.dtype, device=parse.device))  # [..., H, W]
    return hit.reshape(*lead, h, patch, w, patch).any(dim=-1).any(dim=-2)  # [..., h, w]


def _check_label_dtype(parse: Tensor) -> None:
    if parse.dtype.is_floating_point or parse.dtype.is_complex or parse.dtype == torch.bool:
        raise ValueError(f"parse must hold integer labels, found dtype {parse.dtype}")


def _check_label_range(parse: Tensor) -> None:
    if parse.numel():
        lo, hi = torch.aminmax(parse)
        if int(lo) < 0 or int(hi) >= NUM_LABELS:
            raise ValueError(f"parse labels must be in [0, {NUM_LABELS - 1}], found min {int(lo)} and max {int(hi)}")


def _label_walk_steps(batch_size: int, order: str, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Per clip, the step at which each label is revealed: ``[B, NUM_LABELS]`` long, a permutation of 0..10."""
    regions = list(REGION_LABELS)
    width = max(len(v) for v in REGION_LABELS.values())
    padded = [list(v) + [-1] * (width - len(v)) for v in REGION_LABELS.values()]
    table = torch.tensor(padded, dtype=torch.long, device=device)  # [7, 3] labels per region, -1 padded
    n_comp = len(COMPONENT_REGIONS)
    perm = torch.rand(batch_size, n_comp, generator=generator, device=device).argsort(dim=1)  # [B, 5] component order
    skin = torch.full((batch_size, 1), regions.index("skin"), dtype=torch.long, device=device)
    background = torch.full((batch_size, 1), regions.index("background"), dtype=torch.long, device=device)
    if order == "fasking":
        region_order = torch.cat([background, skin, perm], dim=1)  # [B, 7]
    else:
        region_order = torch.cat([perm, skin, background], dim=1)  # [B, 7]
    seq = table[region_order].reshape(batch_size, -1)  # [B, 7 * 3], labels in walk order, -1 pads
    seq = seq[seq >= 0].reshape(batch_size, NUM_LABELS)  # [B, 11]; row-major masking keeps each row's order
    step = torch.arange(NUM_LABELS, device=device).expand(batch_size, -1)  # [B, 11]
    return torch.empty_like(seq).scatter_(1, seq, step)  # [B, 11]: step[b, label]


def face_guided_visible(
    parse: Tensor,
    *,
    order: str = "fasking",
    mask_ratio: float = 0.9,
    tubelet: int = 2,
    patch: int = 16,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Raw face-guided visibility (before normalisation), one walk per tubelet from its first frame's parse map.

    Args:
        parse: ``[B, T, H, W]`` integer LaPa labels (0..10), on the device the mask should live on.
        order: ``"fasking"`` (background, skin, then the components: components stay hidden) or ``"fasking_opp"``
            (components first, then skin, background). The component order is drawn once per clip.
        mask_ratio: target hidden fraction; the walk stops once ``ceil(h * w * (1 - mask_ratio))`` patches of the
            frame are visible.
        tubelet: frames per tubelet; frames ``0, tubelet, 2 * tubelet, ...`` are used.
        patch: patch side in pixels.
        generator: RNG for the component order (must live on ``parse.device``).

    Returns:
        ``[B, T // tubelet, H // patch, W // patch]`` bool, True = visible.
    """
    if order not in FACE_STRATEGIES:
        raise ValueError(f"order must be 'fasking' or 'fasking_opp', found {order!r}")
    if parse.ndim != 4:
        raise ValueError(f"parse must be [B, T, H, W], found shape {tuple(parse.shape)}")
    batch, frames, height, width = parse.shape
    if frames % tubelet:
        raise ValueError(f"parse frames must be divisible by tubelet={tubelet}, found T={frames}")
    if height % patch or width % patch:
        raise ValueError(f"parse H and W must be divisible by patch={patch}, found {height}x{width}")
    _check_ratio(mask_ratio)
    _check_label_dtype(parse)
    key = parse[:, ::tubelet]  # [B, t, H, W] first frame of each tubelet (a view)
    t, h, w = frames // tubelet, height // patch, width // patch
    need = _num_visible_ceil(h * w, mask_ratio)  # visible patches that end a frame's walk

    bits = _patch_label_bits(key, patch).reshape(batch, t, h * w)  # [B, t, h*w] label sets
    step = _label_walk_steps(batch, order, generator, parse.device).to(torch.int16)  # [B, 11]
    # Step at which each patch is first revealed: the earliest-walked label it contains (every patch has one).
    # A loop over the 11 labels on patch-level data is ~50x faster than a [B, t, h*w, 11] broadcast + amin.
    first = torch.full_like(bits, NUM_LABELS)  # [B, t, h*w]
    for label in range(NUM_LABELS):
        has = (bits & (1 << label)) != 0  # [B, t, h*w]
        first = torch.where(has, torch.minimum(first, step[:, label, None, None]), first)
    # The walk stops at the first step whose cumulative reveal reaches `need`: the need-th smallest `first`.
    stop = first.kthvalue(need, dim=-1, keepdim=True).values  # [B, t, 1]
    visible = first <= stop  # [B, t, h*w]
    has_face = (bits & _label_bitmask(FACE_LABELS)).ne(0).any(dim=-1, keepdim=True)  # [B, t, 1]
    visible = visible | ~has_face  # no face in the frame -> all visible
    return visible.reshape(batch, t, h, w)


def _random_subset(batch_size: int, n: int, k: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``[B, n]`` bool with exactly ``k`` True per row, uniformly at random."""
    noise = torch.rand(batch_size, n, generator=generator, device=device)  # [B, n]
    idx = noise.topk(k, dim=1).indices  # [B, k]
    return torch.zeros(batch_size, n, dtype=torch.bool, device=device).scatter_(1, idx, True)


def tube_visible(
    batch_size: int,
    grid: tuple[int, int, int],
    mask_ratio: float = 0.9,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Tube masking (VideoMAE): ``ceil(h * w * (1 - mask_ratio))`` random patches, repeated over time.

    Returns ``[B, t, h, w]`` bool (before normalisation).
    """
    t, h, w = grid
    n_keep = _num_visible_ceil(h * w, mask_ratio)
    keep = _random_subset(batch_size, h * w, n_keep, generator, torch.device(device or "cpu"))  # [B, h*w]
    return keep.reshape(batch_size, 1, h, w).expand(batch_size, t, h, w).clone()  # [B, t, h, w]


def frame_visible(
    batch_size: int,
    grid: tuple[int, int, int],
    mask_ratio: float = 0.9,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Frame masking: ``ceil(t * (1 - mask_ratio))`` random time steps (tubelets) fully visible.

    Returns ``[B, t, h, w]`` bool (before normalisation).
    """
    t, h, w = grid
    n_keep = _num_visible_ceil(t, mask_ratio)
    keep = _random_subset(batch_size, t, n_keep, generator, torch.device(device or "cpu"))  # [B, t]
    return keep.reshape(batch_size, t, 1, 1).expand(batch_size, t, h, w).clone()  # [B, t, h, w]


def normalize_visible(visible: Tensor, n_visible: int, generator: torch.Generator | None = None) -> Tensor:
    """Make every row have exactly ``n_visible`` visible tokens.

    Rows with too many visible tokens keep a uniformly random subset of them; rows with too few keep all of them and
    reveal uniformly random hidden ones (the official code crashes in that case).

    Args:
        visible: ``[B, N]`` bool.
        n_visible: target count, ``1 <= n_visible <= N``.
        generator: RNG (on ``visible.device``).

    Returns:
        ``[B, N]`` bool, a new tensor.
    """
    if visible.ndim != 2 or visible.dtype != torch.bool:
        raise ValueError(f"visible must be a [B, N] bool tensor, found {visible.dtype} {tuple(visible.shape)}")
    batch, n = visible.shape
    if not 1 <= n_visible <= n:
        raise ValueError(f"n_visible must be in [1, {n}], found {n_visible}")
    # Visible tokens score in [1, 2), hidden ones in [0, 1): the top n_visible prefer visible, ties broken at random.
    score = torch.rand(batch, n, generator=generator, device=visible.device) + visible  # [B, N]
    idx = score.topk(n_visible, dim=1).indices  # [B, n_visible]
    return torch.zeros_like(visible).scatter_(1, idx, True)


def generate_visible(
    strategy: str,
    batch_size: int,
    *,
    parse: Tensor | None = None,
    mask_ratio: float = 0.9,
    clip_frames: int = 16,
    tubelet: int = 2,
    img_size: int = 224,
    patch: int = 16,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Visibility masks for a batch: the one entry point.

    Args:
        strategy: one of :data:`STRATEGIES`.
        batch_size: B.
        parse: ``[B, clip_frames, img_size, img_size]`` integer LaPa labels; required by the face strategies
            (give an all-zero map for a clip without a detected face: it becomes a random mask), ignored otherwise.
        mask_ratio: hidden fraction; every row ends with exactly ``num_visible(N, mask_ratio)`` visible tokens.
        clip_frames, tubelet, img_size, patch: clip and token geometry.
        generator: RNG for reproducible masks (on the output device).
        device: output device for the non-face strategies (default: ``parse.device`` if given, else CPU); the face
            strategies always use ``parse.device``.

    Returns:
        ``[B, N]`` bool, ``N = (clip_frames // tubelet) * (img_size // patch) ** 2`` in ``(t, h, w)`` order,
        True = visible.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, found {strategy!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, found {batch_size}")
    grid = token_grid(clip_frames, tubelet, img_size, patch)
    n_tokens = grid[0] * grid[1] * grid[2]
    n_visible = num_visible(n_tokens, mask_ratio)
    if device is not None:
        dev = torch.device(device)
    else:
        dev = parse.device if parse is not None else torch.device("cpu")

    if strategy in FACE_STRATEGIES:
        expected = (batch_size, clip_frames, img_size, img_size)
        if parse is None:
            raise ValueError(f"strategy {strategy!r} needs parse maps of shape {expected}, found None")
        if tuple(parse.shape) != expected:
            raise ValueError(f"parse must have shape {expected}, found {tuple(parse.shape)}")
        raw = face_guided_visible(
            parse, order=strategy, mask_ratio=mask_ratio, tubelet=tubelet, patch=patch, generator=generator
        )
    elif strategy == "tube":
        raw = tube_visible(batch_size, grid, mask_ratio, generator, dev)
    elif strategy == "frame":
        raw = frame_visible(batch_size, grid, mask_ratio, generator, dev)
    else:  # random
        raw = torch.ones(batch_size, *grid, dtype=torch.bool, device=dev)
    return normalize_visible(raw.reshape(batch_size, n_tokens), n_visible, generator)  # [B, N]


def visible_indices(visible: Tensor) -> tuple[Tensor, Tensor]:
    """Token indices of a normalised mask, ascending: ``(idx_visible [B, n_vis], idx_hidden [B, N - n_vis])`` long.

    The model itself selects with the boolean mask (``x[visible]``, the same ascending order); these indices are
    for code that needs positions, e.g. to scatter predictions back. Every row must have the same number of visible
    tokens (see :func:`normalize_visible`).
    """
    if visible.ndim != 2 or visible.dtype != torch.bool:
        raise ValueError(f"visible must be a [B, N] bool tensor, found {visible.dtype} {tuple(visible.shape)}")
    batch = visible.shape[0]
    counts = visible.sum(dim=1)  # [B]
    n_vis = int(counts[0]) if batch else 0
    if bool((counts != n_vis).any()):
        raise ValueError(f"visible must have the same count per row, found counts {counts.unique().tolist()}")
    # Stable sort of "hidden" (0 for visible, 1 for hidden) keeps each group in ascending index order.
    order = torch.sort((~visible).to(torch.uint8), dim=1, stable=True).indices  # [B, N]
    return order[:, :n_vis], order[:, n_vis:]


@dataclass(frozen=True)
class Masker:
    """A masking strategy bound once to a model's token geometry, so that call sites pass only the batch.

    ``Masker.for_config(config, "fasking", 0.9)(batch_size, parse=parse, generator=g)`` equals
    :func:`generate_visible` with the config's ``clip_frames`` / ``tubelet_size`` / ``img_size`` / ``patch_size``.
    """

    strategy: str
    mask_ratio: float = 0.9
    clip_frames: int = 16
    tubelet: int = 2
    img_size: int = 224
    patch: int = 16

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, found {self.strategy!r}")
        _check_ratio(self.mask_ratio)

    @classmethod
    def for_config(cls, config: Any, strategy: str, mask_ratio: float = 0.9) -> Masker:
        """Geometry from a :class:`marlin.MarlinConfig`."""
        return cls(strategy, mask_ratio, config.clip_frames, config.tubelet_size, config.img_size, config.patch_size)

    @property
    def needs_parse(self) -> bool:
        return self.strategy in FACE_STRATEGIES

    def __call__(
        self,
        batch_size: int,
        *,
        parse: Tensor | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """``[B, N]`` bool visibility masks; see :func:`generate_visible`."""
        return generate_visible(
            self.strategy, batch_size, parse=parse if self.needs_parse else None, mask_ratio=self.mask_ratio,
            clip_frames=self.clip_frames, tubelet=self.tubelet, img_size=self.img_size, patch=self.patch,
            generator=generator, device=device,
        )  # fmt: skip

    def seeded(self, seeds: Sequence[int], parse: Tensor | None = None) -> Tensor:
        """One mask per seed, ``[len(seeds), N]``, each from its own generator: a sample's mask is a function of its
        seed alone, whatever batch, process or worker it is drawn in."""
        rows = [
            self(1, parse=parse[i : i + 1] if parse is not None else None, generator=torch.Generator().manual_seed(s))
            for i, s in enumerate(seeds)
        ]
        return torch.cat(rows)  # [B, N]
