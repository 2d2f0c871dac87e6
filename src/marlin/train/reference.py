"""A plain restatement of the official MARLIN training iteration, for equality tests and benchmarks.

The official Lightning module runs, per batch::

    repeat d_steps:  zero critic grads; pred = G(x, mask); loss_D(cat(pred, target)) [+ gp]; backward; step critic
    repeat g_steps:  zero generator grads; pred = G(x, mask); rec + adv_weight * -mean(D(pred)); backward; step G

i.e. a full encoder/decoder forward per player, and the critic loss back-propagated through the (undetached)
predictions into the encoder/decoder, whose gradients are then discarded. `marlin.train.Pretrainer.train_step` must
produce the same updates with one forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..mae.losses import critic_loss, generator_adv_loss, gradient_penalty, masked_targets, reconstruction_loss

__all__ = ["two_forward_step"]


def two_forward_step(
    model: nn.Module,
    critic: nn.Module,
    g_opt: torch.optim.Optimizer,
    d_opt: torch.optim.Optimizer,
    video: Tensor,
    visible: Tensor,
    *,
    tubelet: int,
    patch: int,
    adv_weight: float = 0.01,
    gp_weight: float = 0.0,
    d_steps: int = 1,
    g_steps: int = 1,
    alpha: Tensor | None = None,
) -> dict[str, float]:
    """One official-style iteration on one batch; returns the last critic / generator losses."""
    target = masked_targets(video, visible, tubelet, patch)
    out: dict[str, float] = {}
    for _ in range(d_steps):
        d_opt.zero_grad()
        pred = model(video, visible)  # [B, N_hidden, P], not detached (as the official d-step)
        scores = critic(torch.cat([pred, target]))
        fake, real = scores.chunk(2)
        loss = critic_loss(real, fake)
        out["loss/critic"] = loss.item()
        if gp_weight > 0:
            gp = gradient_penalty(critic, target, pred.detach(), alpha if alpha is not None else torch.rand(1))
            out["loss/gp"] = gp.item()
            loss = loss + gp_weight * gp
        loss.backward()
        d_opt.step()
    for _ in range(g_steps):
        g_opt.zero_grad()
        pred = model(video, visible)
        rec = reconstruction_loss(pred, target)
        adv = generator_adv_loss(critic(pred))
        loss = rec + adv_weight * adv
        loss.backward()
        g_opt.step()
        out.update({"loss/rec": rec.item(), "loss/adv": adv.item(), "loss/gen": loss.item()})
    return out
