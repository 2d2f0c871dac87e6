"""The lip generator: draws the lower half of a face window so that the mouth speaks the given sound (Wav2Lip's
generator, with a MARLIN encoder as its face encoder).

Inputs per window of ``clip_frames`` frames (face crops, ``[B, 3, T, S, S]`` in [0, 1]):

* `target`: the frames to redraw. The encoder sees only their *upper-half* tokens (its masking path, as in
  pretraining: the lower half is never read, so nothing of the true mouth leaks in). With ``still_upper`` it sees the
  upper half of the window's middle frame in every frame instead: the face's place and pose, none of its motion.
  Why: the upper half moves with the mouth (cheeks, nose, the crop itself), and a generator trained on pixels alone
  learns that cue rather than the sound; ours reached the same held-out error with the sound of another clip as
  with its own (0.00187 both), and kept the original lips when dubbing.
* `reference`: a still frame of the same face repeated over the window (another moment's in training, see
  :mod:`marlin.lipsync.data`; the window's middle frame in dubbing). The encoder sees its lower-half tokens: what
  this person's mouth, teeth and skin look like.
* `mel`: the window's mel spectrogram ``[B, 80, L]`` (:func:`marlin.sync.expert.sync_window`), mapped to one
  feature per time step (``clip_frames / tubelet_size`` steps) by the expert's audio trunk
  (:class:`marlin.sync.expert.MelSteps`).

A MARLIN decoder gets the upper-half tokens as its visible tokens and predicts the pixels of every lower-half token;
each hidden token's input is the mask token + its position + the reference token at the same place + the sound of
its time step. The output is a *residual on the reference pixels* (``reference patch + prediction``): at
initialisation the generator copies the reference mouth (sharp, the right person), and training only has to move it
to the shape the sound asks for. :func:`compose` puts the drawn lower half under the target's upper half.

With ``refine`` > 0 a small conv net (:class:`BorderRefiner`) then redraws the residual as whole lower-face frames,
across the patch borders. Why: the decoder draws each 16 px patch from its own token, so neighbouring patches need not
meet (the "seams" of ``benchmarks/lipsync_eval.py``), and sound guidance, which scales the residual up, scales the
seams with it (ours: seam ratio 1.16 plain, 1.30 at guidance 3). Its last layer starts at zero: a generator trained
without it continues unchanged (``marlin lipsync-train --init G --refine C``).

Sound guidance (classifier-free guidance, with the sound as the condition): ``guidance`` w > 0 draws
``r(sound) + w * (r(sound) - r(silence))`` for the residual ``r``, where silence is :data:`SILENCE_MEL`, the floor of
:func:`marlin.audio.mel.log_mel`. Why: a pixel loss draws the *average* of the mouths a sound allows, soft and half
open, so a dubbed mouth moves in time with the sound but too little for a sync expert to be sure; the difference to
the mouth drawn for silence is what the sound adds, and w scales it up. Trained with ``sound_dropout``
(:mod:`marlin.lipsync.train`), the generator has learnt what to draw for silence; the encoder runs once, the small
decoder twice.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from ..mae.patches import merge_hidden, patchify, unpatchify
from ..models.config import MarlinConfig
from ..models.decoder import MarlinDecoder
from ..models.encoder import MarlinEncoder
from ..sync.expert import MelSteps, lower_half_tokens

__all__ = ["LIPSYNC_FORMAT", "SILENCE_MEL", "BorderRefiner", "LipGenerator", "MouthCritic", "load_generator"]

LIPSYNC_FORMAT = "marlin-lipsync-v1"
SILENCE_MEL = -4.0  # log_mel of digital silence (its floor): the "no sound" input of sound dropout and guidance


class BorderRefiner(nn.Module):
    """A residual conv net over the decoder's drawing laid out as lower-face frames: ``forward(drawn [B, 3, T, H, W],
    reference [B, 3, T, H, W])`` -> ``drawn + net(drawn, reference)``, same shape (`drawn`: the generator's residual on
    the reference pixels; `reference`: the reference's lower face). The first layer also looks one frame back and
    ahead (tubelets are drawn two frames at a time); the last starts at zero, so a new refiner changes nothing."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        c = channels
        self.net = nn.Sequential(
            nn.Conv3d(6, c, 3, padding=1), nn.GELU(),
            nn.Conv3d(c, c, (1, 3, 3), padding=(0, 1, 1)), nn.GELU(),
            nn.Conv3d(c, 3, (1, 3, 3), padding=(0, 1, 1)),
        )  # fmt: skip
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, drawn: Tensor, reference: Tensor) -> Tensor:
        # channels-last: ~4x faster than the default layout on CPUs (oneDNN), and cuDNN's preferred one
        x = torch.cat([drawn, reference.to(drawn.dtype)], 1).contiguous(memory_format=torch.channels_last_3d)
        return drawn + self.net(x)


class LipGenerator(nn.Module):
    """Encoder + audio trunk + decoder (see the module docstring).

    ``forward(target, reference, mel)`` -> predicted lower-half patches ``[B, N_lower, patch_dim]`` (raw pixels in
    about [0, 1], ``(c, t, h, w)`` order as :func:`marlin.mae.patches.patchify`); :meth:`generate` returns whole
    windows.
    """

    def __init__(self, config: MarlinConfig, *, encoder: MarlinEncoder | None = None, fps: float = 25.0,
                 audio_width: int = 32, still_upper: bool = False, refine: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.config, self.fps, self.audio_width, self.still_upper = config, fps, audio_width, still_upper
        self.meta: dict[str, Any] = {}
        self.encoder = encoder if encoder is not None else MarlinEncoder(config)
        d, dd = config.encoder_embed_dim, config.decoder_embed_dim
        t, h, w = config.grid_size
        self.decoder = MarlinDecoder(config)
        self.enc_to_dec = nn.Linear(d, dd, bias=False)
        self.ref_to_dec = nn.Linear(d, dd)
        self.audio = MelSteps(t, audio_width)
        self.audio_to_dec = nn.Linear(self.audio.out_dim, dd)
        lower = lower_half_tokens(config)  # [N]
        self.register_buffer("lower", lower, persistent=False)
        self.register_buffer("lower_step", (torch.arange(t * h * w) // (h * w))[lower], persistent=False)  # [N_lower]
        nn.init.zeros_(self.decoder.head.weight)  # start as a copy of the reference (the residual is zero)
        nn.init.zeros_(self.decoder.head.bias)
        self.refiner: BorderRefiner | None = None
        if refine:
            self.add_refiner(refine)

    @property
    def refine(self) -> int:
        """Channels of the :class:`BorderRefiner` (0: none, the decoder's patches are the drawing)."""
        return 0 if self.refiner is None else self.refiner.net[0].out_channels

    def add_refiner(self, channels: int) -> None:
        """Give a generator a new :class:`BorderRefiner` (which leaves its drawing unchanged until trained)."""
        if channels < 1:
            raise ValueError(f"refiner channels must be >= 1, got {channels}")
        device = self.decoder.head.weight.device
        self.refiner = BorderRefiner(channels).to(device)

    @property
    def clip_frames(self) -> int:
        return self.config.clip_frames

    @property
    def top(self) -> int:
        """The first pixel row the generator redraws (the lower half of the token rows, as ``lower``)."""
        return (self.config.grid_size[1] // 2) * self.config.patch_size

    @property
    def mel_length(self) -> int:
        from ..audio.mel import mel_steps

        return mel_steps(self.clip_frames, self.fps)

    def forward(self, target: Tensor, reference: Tensor, mel: Tensor, guidance: float = 0.0) -> Tensor:
        b, t = target.shape[:3:2]
        upper, lower = (~self.lower).expand(b, -1), self.lower.expand(b, -1)  # [B, N]
        face = target[:, :, t // 2 : t // 2 + 1].expand_as(target) if self.still_upper else target  # [B, 3, T, S, S]
        seen = self.enc_to_dec(self.encoder(face, visible=upper))  # [B, N_upper, Dd]
        ref = self.ref_to_dec(self.encoder(reference, visible=lower))  # [B, N_lower, Dd]
        ref_lower = reference[..., self.top :, :]  # [B, 3, T, S - top, S]
        residual = self._residual(seen, upper, ref, mel, ref_lower)  # [B, N_lower, patch_dim]
        if guidance:
            silent = self._residual(seen, upper, ref, torch.full_like(mel, SILENCE_MEL), ref_lower)
            residual = residual + guidance * (residual - silent)
        c = self.config
        ref_pixels = patchify(reference, c.tubelet_size, c.patch_size)[:, self.lower]  # [B, N_lower, patch_dim]
        return ref_pixels + residual

    def _residual(self, seen: Tensor, upper: Tensor, ref: Tensor, mel: Tensor, ref_lower: Tensor) -> Tensor:
        """The drawing ``[B, N_lower, patch_dim]`` from the encoded upper half ``[B, N_upper, Dd]``, the reference
        tokens ``[B, N_lower, Dd]`` and the mel window ``[B, 80, L]``: the decoder's patches, redrawn across their
        borders by the refiner (when there is one, which also sees the reference's lower face `ref_lower`)."""
        sound = self.audio_to_dec(self.audio(mel))  # [B, t, Dd]
        patches = self.decoder(seen, upper, hidden_extra=ref + sound[:, self.lower_step])  # [B, N_lower, patch_dim]
        if self.refiner is None:
            return patches
        c = self.config
        t, h, w = c.grid_size
        grid = (t, h - h // 2, w)  # the lower half's tokens, in the same (t, h, w) order as self.lower
        frames = unpatchify(patches, grid, c.tubelet_size, c.patch_size, c.in_chans)  # [B, 3, T, S - top, S]
        return patchify(self.refiner(frames, ref_lower), c.tubelet_size, c.patch_size)  # [B, N_lower, patch_dim]

    def compose(self, target: Tensor, lower_patches: Tensor) -> Tensor:
        """The target windows ``[B, 3, T, S, S]`` with their lower half replaced by `lower_patches` (clamped to
        [0, 1])."""
        c = self.config
        patches = patchify(target, c.tubelet_size, c.patch_size)  # [B, N, patch_dim]
        upper = (~self.lower).expand(len(target), -1)  # [B, N]: the target keeps these tokens
        merged = merge_hidden(patches, lower_patches.clamp(0, 1).to(patches.dtype), upper)
        return unpatchify(merged, c.grid_size, c.tubelet_size, c.patch_size, c.in_chans)

    def generate(self, target: Tensor, reference: Tensor, mel: Tensor, guidance: float = 0.0) -> Tensor:
        """Whole windows ``[B, 3, T, S, S]``: the target's upper half over the drawn lower half (`guidance`: the
        module docstring)."""
        return self.compose(target, self(target, reference, mel, guidance))

    def checkpoint(self, **extra: Any) -> dict[str, Any]:
        """A weights-only dict :func:`load_generator` reads back (the encoder config travels with it)."""
        return {"format": LIPSYNC_FORMAT, "config": self.config.to_dict(), "fps": self.fps,
                "audio_width": self.audio_width, "still_upper": self.still_upper, "refine": self.refine,
                "state_dict": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}, **extra}  # fmt: skip


class MouthCritic(nn.Module):
    """The adversarial term's critic: one score per lower-face frame (a WGAN critic: no sigmoid, no normalisation
    layers, as the gradient penalty asks), from a small conv net whose patch scores are averaged.

    Why a conv net over the whole lower face rather than pretraining's per-patch MLP: what a generator fooling its
    sync expert draws sits *between* patches (seams along the patch grid, stripes across the lips); the per-patch
    critic barely told such frames from real ones (critic loss -0.03 after 100 steps, the seams stayed).

    ``forward`` takes frames flattened to ``[..., 3 * height * width]`` (the layout of
    :func:`marlin.lipsync.losses.critic_frames`, and of :func:`marlin.mae.losses.gradient_penalty`'s "patches": the
    penalty is then per frame) and returns ``[..., 1]``.
    """

    def __init__(self, height: int, width: int, channels: int = 32) -> None:
        super().__init__()
        self.frame_shape = (3, height, width)
        c = channels
        self.net = nn.Sequential(
            nn.Conv2d(3, c, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(c, 2 * c, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * c, 4 * c, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * c, 1, 3, 1, 1),
        )  # fmt: skip

    def forward(self, frames: Tensor) -> Tensor:
        lead = frames.shape[:-1]
        scores = self.net(frames.reshape(-1, *self.frame_shape))  # [M, 1, h, w]: one score per region
        return scores.mean((1, 2, 3)).reshape(*lead, 1)


def load_generator(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> LipGenerator:
    """Read a generator written by ``marlin lipsync-train`` (weights only) into an eval-mode model; its other entries
    (training config, step, validation metrics) are in ``generator.meta``."""
    from ..models.checkpoint import load_tagged_checkpoint

    obj = load_tagged_checkpoint(path, LIPSYNC_FORMAT, "lip generator (from marlin lipsync-train)")
    config = MarlinConfig.from_dict(obj["config"])
    gen = LipGenerator(config, fps=float(obj["fps"]), audio_width=int(obj["audio_width"]),
                       still_upper=bool(obj.get("still_upper", False)), refine=int(obj.get("refine", 0)))  # fmt: skip
    gen.load_state_dict(obj["state_dict"])
    gen.meta = {k: v for k, v in obj.items() if k != "state_dict"}
    return gen.eval().to(map_location)
