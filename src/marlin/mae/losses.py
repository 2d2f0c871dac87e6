"""The MARLIN pretraining objective: masked-patch reconstruction plus a WGAN-style patch critic.

    rec      = mean((pred - target) ** 2)                 over hidden patches, targets raw [0, 1] pixels (official)
    critic   = mean(D(fake)) - mean(D(real))              [+ gp_weight * gradient_penalty]
    gen_adv  = -mean(D(pred))
    gen      = rec + adv_weight * gen_adv

``fake`` are the predicted hidden patches, ``real`` the true ones; ``D`` scores each patch independently
(:class:`marlin.mae.critic.PatchCritic`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .patches import hidden_patches, normalize_patches, patchify

__all__ = [
    "critic_loss",
    "generator_adv_loss",
    "gradient_penalty",
    "masked_targets",
    "reconstruction_loss",
]


def masked_targets(
    video: Tensor, visible: Tensor, tubelet: int, patch: int, *, normalize: bool = False, eps: float = 1e-6
) -> Tensor:
    """Targets of the hidden tokens: ``[B, C, T, H, W]``, ``[B, N]`` bool -> ``[B, N_hidden, C*t*p*p]`` float32.

    ``normalize=False`` gives the raw pixels (the released MARLIN models); ``normalize=True`` standardises every
    channel of every patch (VideoMAE's normalised targets).
    """
    with torch.no_grad():
        patches = patchify(video.float(), tubelet, patch)  # [B, N, D]
        target = hidden_patches(patches, visible)  # [B, N_hidden, D]
        if normalize:
            target = normalize_patches(target, video.shape[1], eps)[0]
    return target


def reconstruction_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over every value of every hidden patch (``nn.MSELoss()``), computed in float32."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    return F.mse_loss(pred.float(), target.float())


def critic_loss(real_scores: Tensor, fake_scores: Tensor) -> Tensor:
    """Wasserstein critic loss ``mean(D(fake)) - mean(D(real))`` (the critic learns to score real patches higher)."""
    return fake_scores.float().mean() - real_scores.float().mean()


def generator_adv_loss(fake_scores: Tensor) -> Tensor:
    """Generator side of the adversarial game: ``-mean(D(pred))``."""
    return -fake_scores.float().mean()


def gradient_penalty(critic: Callable[[Tensor], Tensor], real: Tensor, fake: Tensor, alpha: Tensor | float) -> Tensor:
    """WGAN-GP: ``mean((|grad_x D(x)|_2 - 1) ** 2)`` per patch at ``x = alpha * real + (1 - alpha) * fake``.

    As in the official code ``alpha`` is one interpolation factor for the whole batch (a scalar), not one per sample.
    ``fake`` should be detached; the result is differentiable with respect to the critic's parameters.

    Args:
        critic: maps ``[..., D]`` patches to ``[..., 1]`` scores.
        real, fake: ``[B, N, D]`` patches.
        alpha: scalar in [0, 1].
    """
    x = (alpha * real + (1 - alpha) * fake).detach().requires_grad_(True)  # [B, N, D]
    scores = critic(x)  # [B, N, 1]
    (grad,) = torch.autograd.grad(scores.sum(), x, create_graph=True)  # [B, N, D]
    return ((grad.float().flatten(0, -2).norm(2, dim=1) - 1) ** 2).mean()
