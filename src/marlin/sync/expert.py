"""The lip-sync expert: does this sound go with these lips? (SyncNet / Wav2Lip's expert, on a MARLIN encoder.)

Two streams map a window of ``clip_frames`` video frames and the mel frames that sound during it
(:func:`marlin.audio.mel.mel_window`) to unit embeddings; in-sync pairs should be close, shifted pairs far apart.

* Visual: the MARLIN encoder over the face-crop clip, with only the *lower half* of the tokens visible (the encoder's
  masking path, as in pretraining: the mouth keeps the positions it had in pretraining, and half the tokens cost
  nothing). Tokens are averaged over space per time step (``clip_frames / tubelet_size`` steps), so the timing of the
  mouth movement inside the window survives pooling; an MLP maps the steps to the embedding.
* Audio: a small 2D conv net on the ``[80, L]`` mel window, pooled to a few frequency bands x the same number of
  time steps, then a linear layer. Windows of other frame rates are resampled to the length of the expert's ``fps``.

Training objective (Wav2Lip's expert): the cosine similarity of the two embeddings, as a logit ``scale * cos + bias``
(learned), against 1 for in-sync and 0 for shifted pairs (binary cross-entropy). Distances for LSE-D / LSE-C are
Euclidean between the unit embeddings (in [0, 2]; not the public SyncNet's scale).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..audio.mel import N_MELS, mel_steps, mel_window
from ..models.config import MarlinConfig
from ..models.encoder import MarlinEncoder

__all__ = ["SYNC_FORMAT", "AudioEncoder", "SyncExpert", "load_expert", "sync_window"]

SYNC_FORMAT = "marlin-sync-v1"
FREQ_BANDS = 5  # frequency bands the audio net keeps apart before its last layer


def lower_half_tokens(config: MarlinConfig) -> Tensor:
    """``[N]`` bool: the tokens of the lower half of the frame (rows ``h >= side / 2``), in the encoder's (t, h, w)
    order."""
    t, h, w = config.grid_size
    rows = torch.arange(h)[None, :, None].expand(t, h, w)
    return (rows >= h // 2).reshape(-1)


def sync_window(mel: Tensor, frame_index: int, clip_frames: int, fps: float, length: int) -> Tensor:
    """The mel window ``[80, length]`` of the `clip_frames`-frame clip starting at video frame `frame_index` of a
    video at `fps`, resampled in time to `length` steps when the video's rate gives another length."""
    w = mel_window(mel, frame_index, clip_frames, fps)
    if w.shape[-1] != length:
        w = F.interpolate(w[None], size=length, mode="linear", align_corners=False)[0]
    return w


class AudioEncoder(nn.Module):
    """Mel window ``[B, 80, L]`` (values in [-4, 4]) -> embedding ``[B, embed_dim]`` (not normalised)."""

    def __init__(self, embed_dim: int, time_steps: int, width: int = 32) -> None:
        super().__init__()
        chans = [1, width, 2 * width, 4 * width, 8 * width]
        strides = [(1, 1), (2, 1), (2, 2), (2, 1)]  # (mel, time): frequency shrinks faster than time
        layers: list[nn.Module] = []
        for c_in, c_out, stride in zip(chans[:-1], chans[1:], strides, strict=True):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(8, c_out), nn.GELU()]
        self.convs = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d((FREQ_BANDS, time_steps))  # coarse bands: which frequencies sound matters
        self.proj = nn.Linear(chans[-1] * FREQ_BANDS * time_steps, embed_dim)

    def forward(self, mel: Tensor) -> Tensor:
        x = self.convs(mel[:, None] / 4.0)  # [B, C, 80', L']
        return self.proj(self.pool(x).flatten(1))  # [B, E]


class SyncExpert(nn.Module):
    """The two streams and the similarity logit (see the module docstring).

    ``forward(video [B, 3, T, S, S] in [0, 1], mels [B, M, 80, L])`` -> logits ``[B, M]``: one visual embedding per
    clip scored against M audio windows (the in-sync one and shifted ones in training), so the costly visual stream
    runs once per clip.
    """

    def __init__(self, config: MarlinConfig, *, embed_dim: int = 128, fps: float = 25.0, audio_width: int = 32,
                 hidden: int = 512, encoder: MarlinEncoder | None = None) -> None:  # fmt: skip
        super().__init__()
        self.config, self.embed_dim, self.fps, self.audio_width, self.hidden = (
            config,
            embed_dim,
            fps,
            audio_width,
            hidden,
        )
        self.meta: dict[str, Any] = {}  # what a loaded checkpoint says besides the weights (training config, steps)
        self.encoder = encoder if encoder is not None else MarlinEncoder(config)
        steps = config.grid_size[0]
        self.register_buffer("visible", lower_half_tokens(config), persistent=False)
        d = config.encoder_embed_dim
        self.visual_head = nn.Sequential(nn.Linear(steps * d, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
        self.audio = AudioEncoder(embed_dim, steps, audio_width)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-5.0))

    @property
    def clip_frames(self) -> int:
        return self.config.clip_frames

    @property
    def mel_length(self) -> int:
        """Mel frames per window at the expert's ``fps`` (51 for 16 frames at 25 fps)."""
        return mel_steps(self.clip_frames, self.fps)

    def window(self, mel: Tensor, frame_index: int, fps: float) -> Tensor:
        """The mel window ``[80, mel_length]`` of the clip starting at video frame `frame_index` of a video at
        `fps` (resampled in time when `fps` differs from the expert's)."""
        return sync_window(mel, frame_index, self.clip_frames, fps, self.mel_length)

    def embed_video(self, video: Tensor) -> Tensor:
        """Clips ``[B, 3, T, S, S]`` in [0, 1] -> unit embeddings ``[B, E]`` from the lower half of the face."""
        b = video.shape[0]
        tokens = self.encoder(video, visible=self.visible.expand(b, -1))  # [B, t * h/2 * w, D]
        steps = self.config.grid_size[0]
        per_step = tokens.view(b, steps, -1, tokens.shape[-1]).mean(2)  # [B, t, D]: space pooled, time kept
        return F.normalize(self.visual_head(per_step.flatten(1)), dim=-1)

    def embed_audio(self, mel: Tensor) -> Tensor:
        """Mel windows ``[B, 80, L]`` -> unit embeddings ``[B, E]``."""
        if mel.dim() != 3 or mel.shape[1] != N_MELS:
            raise ValueError(f"expected mel windows [B, {N_MELS}, L], got {tuple(mel.shape)}")
        return F.normalize(self.audio(mel), dim=-1)

    def logits(self, v: Tensor, a: Tensor) -> Tensor:
        """In-sync logit of embedding pairs (broadcast over leading dims)."""
        return self.logit_scale.exp() * (v * a).sum(-1) + self.logit_bias

    def forward(self, video: Tensor, mels: Tensor) -> Tensor:
        b, m = mels.shape[:2]
        v = self.embed_video(video)  # [B, E]
        a = self.embed_audio(mels.flatten(0, 1)).view(b, m, -1)  # [B, M, E]
        return self.logits(v[:, None], a)  # [B, M]

    def checkpoint(self, **extra: Any) -> dict[str, Any]:
        """A weights-only dict :func:`load_expert` reads back (the encoder config travels with it)."""
        return {
            "format": SYNC_FORMAT,
            "config": self.config.to_dict(),
            "state_dict": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()},
            "embed_dim": self.embed_dim, "fps": self.fps, "audio_width": self.audio_width, "hidden": self.hidden,
            **extra,
        }  # fmt: skip


def load_expert(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> SyncExpert:
    """Read an expert written by ``marlin sync-train`` (weights only, no code execution) into an eval-mode model; its
    other entries (training config, step, validation metrics) are in ``expert.meta``."""
    from ..models.checkpoint import load_tagged_checkpoint

    obj = load_tagged_checkpoint(path, SYNC_FORMAT, "lip-sync expert (from marlin sync-train)")
    expert = SyncExpert(MarlinConfig.from_dict(obj["config"]), embed_dim=int(obj["embed_dim"]), fps=float(obj["fps"]),
                        audio_width=int(obj["audio_width"]), hidden=int(obj["hidden"]))  # fmt: skip
    expert.load_state_dict(obj["state_dict"])
    expert.meta = {k: v for k, v in obj.items() if k != "state_dict"}
    return expert.eval().to(map_location)
