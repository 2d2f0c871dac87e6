"""The lip generator's losses, as pure functions: a pixel loss on the drawn lower half (squared or absolute error),
the sync loss of a frozen lip-sync expert (Wav2Lip's ``-log P(in sync)``), and what the adversarial term's critic
sees (:func:`critic_frames`; the WGAN losses themselves are :mod:`marlin.mae.losses`', as in pretraining)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..sync.expert import SyncExpert

__all__ = ["PIXEL_LOSSES", "critic_frames", "drop_sound", "expert_input", "jitter_windows", "pixel_loss", "sync_loss"]

PIXEL_LOSSES = ("mse", "l1")


def pixel_loss(pred: Tensor, truth: Tensor, kind: str = "mse") -> Tensor:
    """Mean squared (``"mse"``) or absolute (``"l1"``) pixel error of lower-half patches ``[B, N_lower, patch_dim]``.

    Why MSE by default, where Wav2Lip uses L1: most lower-face pixels of a window equal those of the reference (skin
    stays skin), so the median, which L1 fits, is "copy the reference" for them, and L1's gradient (a sign) barely
    moves away from it. On the synthetic talking-mouth task L1 stayed at the copying error for 150 steps, even on one
    fixed batch, while MSE cut the squared error to 0.20 of the copying error."""
    if kind not in PIXEL_LOSSES:
        raise ValueError(f"pixel loss must be one of {PIXEL_LOSSES}, got {kind!r}")
    if pred.shape != truth.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and truth {tuple(truth.shape)} must have the same shape")
    diff = pred.float() - truth.float()
    return diff.square().mean() if kind == "mse" else diff.abs().mean()


def expert_input(expert: SyncExpert, video: Tensor) -> Tensor:
    """Windows ``[B, 3, T, S, S]`` resized to the expert's side when it differs (differentiable)."""
    side = expert.config.img_size
    if video.shape[-1] == side:
        return video
    b, c, t = video.shape[:3]
    flat = video.transpose(1, 2).flatten(0, 1)  # [B*T, 3, S, S]
    flat = F.interpolate(flat, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    return flat.unflatten(0, (b, t)).transpose(1, 2)  # [B, 3, T, side, side]


def jitter_windows(video: Tensor, max_shift: int, generator: torch.Generator | None = None) -> Tensor:
    """Each window ``[B, 3, T, S, S]`` moved by its own random whole-pixel offset in ``[-max_shift, max_shift]``
    along both axes (the same for all its frames: the motion is kept), edges repeated; differentiable.

    Why: a generator trained against a fixed expert learns patterns that fool exactly that network (ours drew
    checkerboards); the expert sees each drawn mouth at a random offset instead, so only changes that keep their
    meaning when moved, such as the shape of the mouth, lower the loss (Expectation over Transformation)."""
    if max_shift <= 0:
        return video
    b, s = video.shape[0], video.shape[-1]
    shifts = torch.randint(-max_shift, max_shift + 1, (b, 2), generator=generator).tolist()  # [B, (dy, dx)]
    padded = F.pad(video.flatten(1, 2), (max_shift,) * 4, mode="replicate").unflatten(1, video.shape[1:3])
    out = [padded[i, ..., max_shift - dy : max_shift - dy + s, max_shift - dx : max_shift - dx + s]
           for i, (dy, dx) in enumerate(shifts)]  # fmt: skip
    return torch.stack(out)  # [B, 3, T, S, S]


def sync_loss(expert: SyncExpert, video: Tensor, mel: Tensor) -> tuple[Tensor, Tensor]:
    """(loss, P(in sync) per window ``[B]``): ``-log sigmoid(logit)`` of windows ``[B, 3, T, S, S]`` in [0, 1]
    against their mel windows ``[B, 80, L]``, averaged; gradients reach the video, the expert stays as it is (its
    parameters should not require grad, and it should be in eval mode: its batch norms then use running stats)."""
    logits = expert(expert_input(expert, video), mel[:, None])[:, 0].float()  # [B]
    return F.softplus(-logits).mean(), logits.sigmoid().detach()


def critic_frames(video: Tensor, top: int, jitter: int = 0, generator: torch.Generator | None = None) -> Tensor:
    """The lower faces (rows from `top` down) of windows ``[B, 3, T, S, S]`` moved by up to `jitter` pixels first
    (:func:`jitter_windows`), one flattened frame per row: ``[B, T, 3 * (S - top) * S]``.

    Why moved: the generator draws each patch on its own, so its flaws sit on the patch grid; at a random offset
    the critic cannot learn the grid's place instead of what it looks like."""
    lower = jitter_windows(video, jitter, generator)[..., top:, :]  # [B, 3, T, S - top, S]
    return lower.transpose(1, 2).flatten(2)  # [B, T, 3 * (S - top) * S]


def drop_sound(mel: Tensor, p: float, silence: float, generator: torch.Generator | None = None) -> Tensor:
    """Mel windows ``[B, 80, L]`` with each window replaced, with probability `p`, by constant `silence`
    (classifier-free guidance's condition dropout): the generator then also learns what to draw without sound, the
    reference point sound guidance (:class:`marlin.lipsync.model.LipGenerator`) extrapolates from."""
    if p <= 0:
        return mel
    drop = torch.rand(mel.shape[0], generator=generator) < p  # [B]
    return torch.where(drop.to(mel.device)[:, None, None], torch.full_like(mel, silence), mel)
