"""Where a MARLIN encoder looks: the attention each token receives in a block, as a map over the clip.

    from marlin.viz.attention import attention_received, save_attention_sheet
    maps = attention_received(model, clips, layer=6)            # [B, T', H', W'], 1 = a uniform share
    save_attention_sheet("attn.png", frames, {"random init": maps_a[0], "pretrained": maps_b[0]})

A token's map value is the attention paid *to* it in that block, averaged over the heads and over every query token,
times the number of tokens: 1 everywhere when attention is uniform, 5 for a token that draws five times its share.
An encoder that has learnt a face should draw attention to the parts that move and differ (eyes, mouth); a random
one attends almost uniformly. The probabilities are recomputed explicitly from the block's own weights (the forward
uses SDPA, which never forms them), so this costs an [N, N] matrix per head: one clip at a time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.layers import Attention

__all__ = ["attention_probs", "attention_received", "attention_sheet", "region_share", "save_attention_sheet"]

# dark blue -> red -> yellow: low attention recedes, high attention stands out on a face
_COLOURS = np.array([[20, 20, 90], [180, 30, 60], [250, 140, 20], [255, 240, 120]], np.float32)


def attention_probs(attn: Attention, x: Tensor) -> Tensor:  # [B, N, D] (after the block's norm1) -> [B, H, N, N]
    """softmax(q k^T / sqrt(d)) of an `Attention` module for its input `x`, per head (rows sum to 1)."""
    b, n, _ = x.shape
    qkv = F.linear(x, attn.qkv.weight, attn.fused_qkv_bias())  # [B, N, 3D]
    q, k, _ = qkv.view(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, d]
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, H, N, N]


@torch.no_grad()
def attention_received(model: torch.nn.Module, video: Tensor, layer: int | None = None) -> Tensor:
    """The attention each token receives in encoder block `layer` (1 = first; default the last), averaged over
    heads and queries, in units of a uniform share: ``[B, C, T, H, W]`` clips -> ``[B, T', H', W']`` (mean 1).

    `model`: a `Marlin` (float32) or its `encoder`. Clips go through one at a time (an [N, N] matrix per head).
    With register tokens the shares count them too (uniform = 1 / (R + N)) and only the patch tokens are returned:
    their mean falls below 1 by what the registers draw.
    """
    encoder = getattr(model, "encoder", model)
    blocks, c = encoder.blocks, encoder.config
    layer = len(blocks) if layer is None else layer
    if not 1 <= layer <= len(blocks):
        raise ValueError(f"layer must be in 1..{len(blocks)} for this {len(blocks)}-block encoder, got {layer}")
    grid = (c.clip_frames // c.tubelet_size, c.img_size // c.patch_size, c.img_size // c.patch_size)
    maps = []
    for clip in video.float():
        x = encoder.add_registers(encoder.embed(clip[None]))  # [1, R + N, D]
        for block in blocks[: layer - 1]:
            x = block(x)
        block = blocks[layer - 1]
        probs = attention_probs(block.attn, block.norm1(x))  # [1, H, R + N, R + N]
        received = probs.mean(dim=(1, 2)) * probs.shape[-1]  # [1, R + N]: received, x (R + N)
        maps.append(encoder.drop_registers(received[..., None])[..., 0])  # [1, N]
    return torch.cat(maps).view(len(maps), *grid)


def region_share(maps: Tensor, region: Tensor) -> Tensor:
    """How many times its share of tokens a region draws: mean map value inside `region` (bool, broadcast to
    ``maps`` [B, T', H', W']) per clip -> [B]; 1 = no more than any other tokens."""
    region = region.expand_as(maps)
    return (maps * region).flatten(1).sum(1) / region.flatten(1).sum(1).clamp(min=1)


def _heat(values: np.ndarray) -> np.ndarray:  # [...] in [0, 1] -> [..., 3] float RGB
    pos = np.clip(values, 0, 1) * (len(_COLOURS) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_COLOURS) - 2)
    frac = (pos - lo)[..., None]
    return _COLOURS[lo] * (1 - frac) + _COLOURS[lo + 1] * frac


def _overlay(frame: np.ndarray, amap: np.ndarray, vmax: float, alpha: float = 0.55) -> np.ndarray:
    """A frame [H, W, 3] uint8 with map [H', W'] (nearest-upsampled, log scale 0..vmax) blended over it."""
    h, w = frame.shape[:2]
    scaled = np.log1p(np.maximum(amap, 0)) / np.log1p(vmax)  # log: a 2x share shows beside a 200x sink
    up = np.kron(scaled, np.ones((h // amap.shape[0], w // amap.shape[1])))  # [H, W]
    return (frame.astype(np.float32) * (1 - alpha) + _heat(up) * alpha).round().clip(0, 255).astype(np.uint8)


def attention_sheet(
    frames: np.ndarray, maps: Mapping[str, Tensor | np.ndarray], *, vmax: float | None = None, gap: int = 2
) -> np.ndarray:
    """One row per map (labelled with its name), one column per time step (the first frame of each tubelet): the
    clip's frames ``[T, H, W, 3]`` uint8 with the map over them. One logarithmic colour scale for every row (0 to
    `vmax`, default the largest value), so rows compare. Returns ``[H', W', 3]`` uint8."""
    from .reconstruct import _add_row_labels

    arrays = {name: np.asarray(m, dtype=np.float32) for name, m in maps.items()}
    if not arrays:
        raise ValueError("attention_sheet needs at least one map")
    steps = next(iter(arrays.values())).shape[0]
    tubelet = max(1, frames.shape[0] // steps)
    vmax = vmax or max(float(m.max()) for m in arrays.values())
    rows = []
    for m in arrays.values():
        tiles = [_overlay(frames[t * tubelet], m[t], vmax) for t in range(steps)]
        sep = np.full((tiles[0].shape[0], gap, 3), 255, np.uint8)
        rows.append(np.concatenate([x for tile in tiles for x in (tile, sep)][:-1], axis=1))
    sep = np.full((gap, rows[0].shape[1], 3), 255, np.uint8)
    image = np.concatenate([x for row in rows for x in (row, sep)][:-1], axis=0)
    margin = max(96, 7 * max(len(name) for name in arrays) + 8)  # the default font is ~6 px a character
    return _add_row_labels(image, list(arrays), frames.shape[1], gap, margin=margin)


def save_attention_sheet(
    path: str | os.PathLike, frames: np.ndarray, maps: Mapping[str, Tensor | np.ndarray], **kwargs: float
) -> Path:
    """`attention_sheet` written as an image (format from the suffix, e.g. ``.png``); returns the path."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(attention_sheet(frames, maps, **kwargs)).save(path)
    return path
