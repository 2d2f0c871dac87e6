"""Clips <-> patch sequences, in the layout the MARLIN decoder predicts.

A clip ``[B, C, T, H, W]`` is cut into tubelets of ``t x p x p`` pixels (``t`` frames, ``p`` pixels square). Tokens are
ordered time-major ``(nt, nh, nw)`` like the encoder's Conv3d embedding, and the ``C * t * p * p`` values of one token
are ordered ``(c, t, h, w)`` (channel outermost), as in the released decoder head and the official training targets.
With the released geometry a clip is ``[B, 1568, 1536]``.

Targets for the masked-autoencoder loss are the *hidden* tokens of a visibility mask (True = visible, see
:mod:`marlin.mae.masking`), kept in token order, in the order in which :class:`marlin.Marlin` returns its predictions.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "hidden_patches",
    "merge_hidden",
    "normalize_patches",
    "patchify",
    "unnormalize_patches",
    "unpatchify",
]


def patchify(video: Tensor, tubelet: int, patch: int) -> Tensor:
    """Cut a clip into token patches.

    Args:
        video: ``[B, C, T, H, W]`` with ``T % tubelet == 0`` and ``H, W`` divisible by ``patch``.
        tubelet: frames per token.
        patch: pixels per token side.

    Returns:
        ``[B, N, C * tubelet * patch * patch]``, tokens in ``(t, h, w)`` order, values in ``(c, t, h, w)`` order.
    """
    if video.ndim != 5:
        raise ValueError(f"video must be [B, C, T, H, W], found shape {tuple(video.shape)}")
    b, c, t, h, w = video.shape
    if t % tubelet or h % patch or w % patch:
        raise ValueError(
            f"video [B, C, T, H, W] = {tuple(video.shape)} must have T divisible by tubelet={tubelet} and H, W "
            f"divisible by patch={patch}"
        )
    nt, nh, nw = t // tubelet, h // patch, w // patch
    x = video.reshape(b, c, nt, tubelet, nh, patch, nw, patch)  # [B, C, nt, t, nh, p, nw, p]
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # [B, nt, nh, nw, C, t, p, p]
    return x.reshape(b, nt * nh * nw, c * tubelet * patch * patch)  # [B, N, C*t*p*p]


def unpatchify(patches: Tensor, grid: tuple[int, int, int], tubelet: int, patch: int, channels: int = 3) -> Tensor:
    """Inverse of :func:`patchify`.

    Args:
        patches: ``[B, N, C * tubelet * patch * patch]`` with ``N = nt * nh * nw``.
        grid: token grid ``(nt, nh, nw)``.
        tubelet, patch, channels: patch geometry.

    Returns:
        ``[B, C, nt * tubelet, nh * patch, nw * patch]``.
    """
    nt, nh, nw = grid
    want = (nt * nh * nw, channels * tubelet * patch * patch)
    if patches.ndim != 3 or tuple(patches.shape[1:]) != want:
        raise ValueError(f"patches must be [B, {want[0]}, {want[1]}] for grid {grid}, found {tuple(patches.shape)}")
    b = patches.shape[0]
    x = patches.reshape(b, nt, nh, nw, channels, tubelet, patch, patch)  # [B, nt, nh, nw, C, t, p, p]
    x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)  # [B, C, nt, t, nh, p, nw, p]
    return x.reshape(b, channels, nt * tubelet, nh * patch, nw * patch)


def normalize_patches(patches: Tensor, channels: int = 3, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """Per-patch, per-channel standardisation (the VideoMAE ``normlize_target`` option).

    Each channel of each patch is shifted to zero mean and divided by its unbiased standard deviation + ``eps``.

    Args:
        patches: ``[..., C * k]`` values in ``(c, ...)`` order.
        channels: C.
        eps: added to the standard deviation.

    Returns:
        ``(normalized [..., C * k], mean [..., C, 1], std [..., C, 1])``; ``normalized * std + mean`` is the input.
    """
    x = patches.unflatten(-1, (channels, -1))  # [..., C, k]
    mean = x.mean(dim=-1, keepdim=True)  # [..., C, 1]
    std = x.var(dim=-1, unbiased=True, keepdim=True).sqrt() + eps  # [..., C, 1]
    return ((x - mean) / std).flatten(-2), mean, std


def unnormalize_patches(normalized: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Inverse of :func:`normalize_patches` given the statistics it returned: ``[..., C * k]``."""
    channels = mean.shape[-2]
    return (normalized.unflatten(-1, (channels, -1)) * std + mean).flatten(-2)


def hidden_patches(patches: Tensor, visible: Tensor) -> Tensor:
    """The patches of the hidden tokens, in token order: ``[B, N, D]``, ``[B, N]`` bool -> ``[B, N_hidden, D]``.

    Every row of ``visible`` must hide the same number of tokens (masks from :mod:`marlin.mae.masking` do).
    """
    if visible.dtype != torch.bool or tuple(visible.shape) != tuple(patches.shape[:2]):
        raise ValueError(
            f"visible must be a bool [B, N] = {list(patches.shape[:2])} mask, found {visible.dtype} "
            f"{tuple(visible.shape)}"
        )
    b, _, d = patches.shape
    return patches[~visible].view(b, -1, d)  # [B, N_hidden, D]


def merge_hidden(patches: Tensor, hidden: Tensor, visible: Tensor) -> Tensor:
    """Put ``hidden`` [B, N_hidden, D] (e.g. predictions) at the hidden positions of ``patches`` [B, N, D].

    Returns a new ``[B, N, D]`` tensor: visible tokens from ``patches``, hidden ones from ``hidden``.
    """
    out = patches.clone()
    out[~visible] = hidden.reshape(-1, patches.shape[-1]).to(out.dtype)
    return out
