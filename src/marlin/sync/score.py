"""Scoring the audio-visual sync of a video with the expert (``marlin sync``): offset, LSE-D and LSE-C.

As SyncNet's evaluation (``syncnet_python``, used for Wav2Lip's LSE metrics): every window of ``clip_frames``
consecutive frames (every ``stride`` frames) is embedded once; its distance to the audio windows shifted by
``k = -max_offset .. max_offset`` frames is measured; the distances are averaged over windows per offset. Then

* ``offset`` = the k of the smallest mean distance. Sign: a positive offset means the *sound is late*: the audio of
  video frame f is heard at frame f + k (delay the video, or advance the audio, by k frames to fix it).
* ``lse_d`` (LSE-D) = that smallest mean distance (lower: lips and sound agree better),
* ``lse_c`` (LSE-C, confidence) = median over offsets minus the minimum (higher: the best offset stands out; near 0
  the expert sees no relation, e.g. no visible face or no speech).

The same three numbers are given per window. Windows are those whose audio stays inside the video for every offset
when the video is long enough (``clip_frames + 2 max_offset`` frames); shorter videos use every window and pad the
audio with silence (``padded``). Distances are Euclidean between unit embeddings, in [0, 2]: compare them between
videos scored by the same expert, not with the public SyncNet's numbers.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import load_video_audio, read_frames_for_sync
from .expert import SyncExpert

__all__ = [
    "SyncScore",
    "embed_windows",
    "offset_distances",
    "plot_distances",
    "score_video",
    "summarise",
    "window_starts",
]


@dataclass
class SyncScore:
    """The sync of one video (see the module docstring); `distances[i]` is the mean distance at `offsets[i]`."""

    path: str
    n_frames: int
    fps: float
    offset: int
    lse_d: float
    lse_c: float
    offsets: list[int]
    distances: list[float]
    windows: list[dict[str, float]] = field(default_factory=list)  # start, offset, lse_d, lse_c per window
    padded: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def window_starts(n_frames: int, clip_frames: int, max_offset: int, stride: int) -> tuple[list[int], bool]:
    """(starts, padded): the scored windows, those whose audio stays inside the video at every offset; every window
    (``padded``: shifted audio partly silence) when the video is too short for any."""
    last = n_frames - clip_frames
    starts = [s for s in range(0, last + 1, stride) if max_offset <= s <= last - max_offset]
    return (starts, False) if starts else (list(range(0, last + 1, stride)), True)


@torch.no_grad()
def embed_windows(expert: SyncExpert, frames: torch.Tensor, starts: list[int], batch_size: int = 16,
                  device: torch.device | str = "cpu") -> torch.Tensor:  # fmt: skip
    """Visual embeddings ``[W, E]`` of the clips starting at `starts` of `frames` (uint8 ``[3, N, S, S]``)."""
    t, out = expert.clip_frames, []
    for i in range(0, len(starts), batch_size):
        clips = torch.stack([frames[:, s : s + t] for s in starts[i : i + batch_size]])
        out.append(expert.embed_video(clips.to(device).float().div_(255.0)).cpu())
    return torch.cat(out)


@torch.no_grad()
def offset_distances(expert: SyncExpert, v: torch.Tensor, starts: list[int], mel: torch.Tensor, fps: float,
                     offsets: list[int], device: torch.device | str = "cpu") -> np.ndarray:  # fmt: skip
    """``[W, K]`` Euclidean distances between window ``w``'s visual embedding `v[w]` and the audio window that starts
    ``offsets[k]`` frames after it in `mel`; each audio window is embedded once."""
    audio_starts = sorted({s + k for s in starts for k in offsets})
    mels = torch.stack([expert.window(mel, a, fps) for a in audio_starts])  # [A, 80, L]
    a = torch.cat([expert.embed_audio(mels[i : i + 256].to(device)).cpu() for i in range(0, len(mels), 256)])
    row = {s: i for i, s in enumerate(audio_starts)}
    idx = torch.tensor([[row[s + k] for k in offsets] for s in starts])  # [W, K]
    return (v[:, None] - a[idx]).norm(dim=-1).numpy().astype(np.float64)  # [W, K]


def summarise(path: str, n_frames: int, fps: float, starts: list[int], offsets: list[int], dist: np.ndarray,
              padded: bool) -> SyncScore:  # fmt: skip
    """Offset, LSE-D and LSE-C of a video (and of each window) from its ``[W, K]`` distances."""
    mean = dist.mean(0)  # [K]
    best = int(mean.argmin())
    windows = [{"start": s, "offset": offsets[int(d.argmin())], "lse_d": float(d.min()),
                "lse_c": float(np.median(d) - d.min())} for s, d in zip(starts, dist, strict=True)]  # fmt: skip
    return SyncScore(path=str(path), n_frames=n_frames, fps=fps, offset=offsets[best], lse_d=float(mean[best]),
                     lse_c=float(np.median(mean) - mean[best]), offsets=offsets, distances=[float(x) for x in mean],
                     windows=windows, padded=padded)  # fmt: skip


@torch.no_grad()
def score_video(expert: SyncExpert, path: str | os.PathLike, *, max_offset: int = 15, stride: int = 1,
                batch_size: int = 16, crop_face: bool = True, detector: str = "mediapipe",
                device: torch.device | str = "cpu") -> SyncScore:  # fmt: skip
    """The sync of one video: offset, LSE-D, LSE-C overall and per window (see the module docstring)."""
    if max_offset < 0 or stride < 1:
        raise ValueError(f"expected max_offset >= 0 and stride >= 1, got {max_offset}, {stride}")
    device = torch.device(device)
    expert.eval()
    va = load_video_audio(path)
    t = expert.clip_frames
    if va.n_frames < t:
        raise ValueError(f"{path}: {va.n_frames} frames, fewer than the expert's {t}-frame window")
    frames = read_frames_for_sync(path, range(va.n_frames), expert.config.img_size, crop_face, detector)
    starts, padded = window_starts(va.n_frames, t, max_offset, stride)
    v = embed_windows(expert, frames, starts, batch_size, device)  # [W, E]
    offsets = list(range(-max_offset, max_offset + 1))
    dist = offset_distances(expert, v, starts, va.mel, va.fps, offsets, device)
    return summarise(str(path), va.n_frames, va.fps, starts, offsets, dist, padded)


def plot_distances(scores: list[SyncScore], path: str | os.PathLike) -> Path:
    """Mean distance vs offset, one line per video, to a PNG: matplotlib when installed, else a plain PIL drawing."""
    from PIL import Image

    from ..utils.fileio import atomic_save_image

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return atomic_save_image(path, Image.fromarray(_pil_plot(scores)))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for s in scores:
        ax.plot(s.offsets, s.distances, marker=".", label=f"{Path(s.path).name}: offset {s.offset:+d}, "
                f"LSE-D {s.lse_d:.3f}, LSE-C {s.lse_c:.3f}")  # fmt: skip
        ax.axvline(s.offset, color=ax.lines[-1].get_color(), alpha=0.3, linestyle="--")
    ax.set(xlabel="offset (frames; > 0: the sound is late)", ylabel="mean embedding distance",
           title="audio-visual sync: distance vs offset")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return atomic_save_image(path, Image.fromarray(image))


def _pil_plot(scores: list[SyncScore], width: int = 640, height: int = 360) -> np.ndarray:
    """The same plot without matplotlib: axes box, one polyline per video, the best offsets marked."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = 50, 20, width - 20, height - 40
    draw.rectangle((left, top, right, bottom), outline="black")
    values = [d for s in scores for d in s.distances] or [0.0, 1.0]
    lo, hi = min(values), max(values) + 1e-9
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    for i, s in enumerate(scores):
        k0, k1 = s.offsets[0], max(s.offsets[-1], s.offsets[0] + 1)
        pts = [(left + (k - k0) / (k1 - k0) * (right - left), bottom - (d - lo) / (hi - lo) * (bottom - top))
               for k, d in zip(s.offsets, s.distances, strict=True)]  # fmt: skip
        draw.line(pts, fill=colours[i % len(colours)], width=2)
        draw.text((left + 5, top + 5 + 12 * i), f"{Path(s.path).name}: offset {s.offset:+d}", fill=colours[i % 6])
    draw.text((left, bottom + 10), "offset (frames) -> ; y: mean embedding distance", fill="black")
    return np.asarray(img)
