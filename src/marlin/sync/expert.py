"""The lip-sync expert: does this sound go with these lips? (SyncNet / Wav2Lip's expert, on a MARLIN encoder.)

Two streams map a window of ``clip_frames`` video frames and the mel frames that sound during it
(:func:`marlin.audio.mel.mel_window`) to unit embeddings; in-sync pairs should be close, shifted pairs far apart.

* Visual (``visual="encoder"``): the MARLIN encoder over the face-crop clip, with only the *lower half* of the tokens
  visible (the encoder's masking path, as in pretraining: the mouth keeps the positions it had in pretraining, and
  half the tokens cost nothing). Tokens are averaged over space per time step (``clip_frames / tubelet_size``
  steps), so the timing of the mouth movement inside the window survives pooling; an MLP maps the steps to the
  embedding. ``visual="pixels"`` is the raw-pixel baseline's stream (no image features): the lower half of each
  frame, grey and 4x downsampled, one linear map per time step instead of the encoder (same MLP after it).
* Audio: a small 2D conv net on the ``[80, L]`` mel window, pooled to a few frequency bands x the same number of
  time steps, then a linear layer. Windows of other frame rates are resampled to the length of the expert's ``fps``.

Both embeddings pass a batch norm before they are normalised to unit length. Why: what tells an in-sync window from
a shifted one is a small part of each embedding (the mouth is a small part of the face, one window's sound differs
little from the next one's), and without the norm a large component shared by every clip dominates the cosine. At
initialisation two different audio windows had cosine 0.94; the loss then stayed at ln 2 (chance) for 600 steps on a
synthetic task, with the encoder and with raw pixels alike. Centring and scaling each dimension over the batch
removes the shared component; the same task then trains to a held-out AUC of 0.99 in 300 steps
(``tests/test_sync.py``). In eval mode the norm uses its running statistics, so scores do not depend on the batch.

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

__all__ = [
    "SYNC_FORMAT",
    "VISUAL_STREAMS",
    "AudioEncoder",
    "MelSteps",
    "PixelStream",
    "SyncExpert",
    "load_expert",
    "lower_half_tokens",
    "sync_window",
]

SYNC_FORMAT = "marlin-sync-v2"  # v1 (no embedding norms, never learned) is not read
FREQ_BANDS = 5  # frequency bands the audio net keeps apart before its last layer
VISUAL_STREAMS = ("encoder", "pixels")
PIXEL_POOL = 4  # the pixel stream's downsampling: 112 px crops -> 14 x 28 lower halves


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


class MelSteps(nn.Module):
    """Mel window ``[B, 80, L]`` (values in [-4, 4]) -> features per time step ``[B, time_steps, out_dim]``: a small 2D
    conv net pooled to a few frequency bands x `time_steps` steps (the expert's audio trunk; the lip generator's audio
    stream)."""

    def __init__(self, time_steps: int, width: int = 32) -> None:
        super().__init__()
        chans = [1, width, 2 * width, 4 * width, 8 * width]
        strides = [(1, 1), (2, 1), (2, 2), (2, 1)]  # (mel, time): frequency shrinks faster than time
        layers: list[nn.Module] = []
        for c_in, c_out, stride in zip(chans[:-1], chans[1:], strides, strict=True):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(8, c_out), nn.GELU()]
        self.convs = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d((FREQ_BANDS, time_steps))  # coarse bands: which frequencies sound matters
        self.out_dim = chans[-1] * FREQ_BANDS

    def grid(self, mel: Tensor) -> Tensor:
        """``[B, 80, L]`` -> ``[B, C, bands, time_steps]``."""
        return self.pool(self.convs(mel[:, None] / 4.0))

    def forward(self, mel: Tensor) -> Tensor:
        return self.grid(mel).permute(0, 3, 1, 2).flatten(2)  # [B, t, C * bands]


class AudioEncoder(MelSteps):
    """Mel window ``[B, 80, L]`` (values in [-4, 4]) -> embedding ``[B, embed_dim]`` (not normalised)."""

    def __init__(self, embed_dim: int, time_steps: int, width: int = 32) -> None:
        super().__init__(time_steps, width)
        self.proj = nn.Linear(self.out_dim * time_steps, embed_dim)

    def forward(self, mel: Tensor) -> Tensor:
        return self.proj(self.grid(mel).flatten(1))  # [B, E]


class PixelStream(nn.Module):
    """The raw-pixel visual stream: clip ``[B, 3, T, S, S]`` -> per time step features ``[B, t, D]``.

    The lower half of each frame, grey and average-pooled by ``PIXEL_POOL``, the ``tubelet_size`` frames of each time
    step concatenated and mapped by one linear layer: no pretrained or learned image features, the baseline an
    encoder's lip features must beat."""

    def __init__(self, config: MarlinConfig) -> None:
        super().__init__()
        side = config.img_size // PIXEL_POOL
        if side < 2:
            raise ValueError(f"the pixel stream needs img_size >= {2 * PIXEL_POOL}, got {config.img_size}")
        self.tubelet = config.tubelet_size
        self.proj = nn.Linear(self.tubelet * (side - side // 2) * side, config.encoder_embed_dim)

    def forward(self, video: Tensor) -> Tensor:
        b, _, t = video.shape[:3]
        grey = F.avg_pool2d(video.mean(1), PIXEL_POOL)  # [B, T, S/4, S/4]
        lower = grey[:, :, grey.shape[2] // 2 :]  # [B, T, S/8, S/4]
        steps = lower.reshape(b, t // self.tubelet, -1)  # [B, t, tubelet * S/8 * S/4]
        return self.proj(steps * 2.0 - 1.0)


class SyncExpert(nn.Module):
    """The two streams and the similarity logit (see the module docstring).

    ``forward(video [B, 3, T, S, S] in [0, 1], mels [B, M, 80, L])`` -> logits ``[B, M]``: one visual embedding per
    clip scored against M audio windows (the in-sync one and shifted ones in training), so the costly visual stream
    runs once per clip.
    """

    def __init__(self, config: MarlinConfig, *, embed_dim: int = 128, fps: float = 25.0, audio_width: int = 32,
                 hidden: int = 512, encoder: MarlinEncoder | None = None, visual: str = "encoder") -> None:  # fmt: skip
        super().__init__()
        if visual not in VISUAL_STREAMS:
            raise ValueError(f"visual stream must be one of {VISUAL_STREAMS}, got {visual!r}")
        self.config, self.embed_dim, self.fps, self.visual = config, embed_dim, fps, visual
        self.audio_width, self.hidden = audio_width, hidden
        self.meta: dict[str, Any] = {}  # what a loaded checkpoint says besides the weights (training config, steps)
        if visual == "pixels":
            self.encoder, self.pixels = None, PixelStream(config)
        else:
            self.encoder, self.pixels = encoder if encoder is not None else MarlinEncoder(config), None
        steps = config.grid_size[0]
        self.register_buffer("visible", lower_half_tokens(config), persistent=False)
        d = config.encoder_embed_dim
        self.visual_head = nn.Sequential(nn.Linear(steps * d, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
        self.audio = AudioEncoder(embed_dim, steps, audio_width)
        self.video_norm, self.audio_norm = nn.BatchNorm1d(embed_dim), nn.BatchNorm1d(embed_dim)  # why: module doc
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
        if self.pixels is not None:
            per_step = self.pixels(video)  # [B, t, D]
        else:
            tokens = self.encoder(video, visible=self.visible.expand(b, -1))  # [B, t * h/2 * w, D]
            steps = self.config.grid_size[0]
            per_step = tokens.view(b, steps, -1, tokens.shape[-1]).mean(2)  # [B, t, D]: space pooled, time kept
        return F.normalize(self.video_norm(self.visual_head(per_step.flatten(1))), dim=-1)

    def embed_audio(self, mel: Tensor) -> Tensor:
        """Mel windows ``[B, 80, L]`` -> unit embeddings ``[B, E]``."""
        if mel.dim() != 3 or mel.shape[1] != N_MELS:
            raise ValueError(f"expected mel windows [B, {N_MELS}, L], got {tuple(mel.shape)}")
        return F.normalize(self.audio_norm(self.audio(mel)), dim=-1)

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
            "visual": self.visual, **extra,
        }  # fmt: skip


def load_expert(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> SyncExpert:
    """Read an expert written by ``marlin sync-train`` (weights only, no code execution) into an eval-mode model; its
    other entries (training config, step, validation metrics) are in ``expert.meta``."""
    from ..models.checkpoint import load_tagged_checkpoint

    obj = load_tagged_checkpoint(path, SYNC_FORMAT, "lip-sync expert (from marlin sync-train)")
    expert = SyncExpert(MarlinConfig.from_dict(obj["config"]), embed_dim=int(obj["embed_dim"]), fps=float(obj["fps"]),
                        audio_width=int(obj["audio_width"]), hidden=int(obj["hidden"]),
                        visual=str(obj["visual"]))  # fmt: skip
    expert.load_state_dict(obj["state_dict"])
    expert.meta = {k: v for k, v in obj.items() if k != "state_dict"}
    return expert.eval().to(map_location)
