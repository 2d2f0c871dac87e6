"""Dubbing: redraw the mouth of a face video so that it speaks another sound track (``marlin lipsync``).

:func:`dub_crops` works on face crops: the video is cut into windows of ``clip_frames`` frames (the last one aligned
to the end), its reference is its middle frame held still (as in training, one frame: the person's mouth, teeth and
skin, but none of the original mouth's movement, which belongs to the old sound) and it gets the mel window of the
new sound at its frames. :func:`dub_video` does it for a video file: the main face is
detected and tracked as ``marlin extract --crop-face`` does, the crops are dubbed, the drawn lower face is pasted back
into each frame with feathered edges, and the new sound is muxed in. The output lasts as long as the sound; when the
sound is longer than the video, the video loops (as Wav2Lip does). Frames without a face are left as they are.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..sync.expert import sync_window
from .model import LipGenerator

__all__ = ["DubResult", "dub_crops", "dub_video", "paste_lower", "window_starts_covering"]

log = logging.getLogger("marlin")


def window_starts_covering(n_frames: int, length: int) -> list[int]:
    """Starts of `length`-frame windows that cover ``0 .. n_frames - 1``: every `length` frames, the last one
    aligned to the end (it overlaps the one before when `n_frames` is not a multiple)."""
    if n_frames < length:
        raise ValueError(f"{n_frames} frames, fewer than one {length}-frame window")
    starts = list(range(0, n_frames - length + 1, length))
    if starts[-1] != n_frames - length:
        starts.append(n_frames - length)
    return starts


@torch.no_grad()
def dub_crops(gen: LipGenerator, crops: Tensor, mel: Tensor, fps: float, *, batch_size: int = 8,
              device: torch.device | str = "cpu", guidance: float = 0.0) -> Tensor:  # fmt: skip
    """Face crops uint8 ``[3, N, S, S]`` (S = the generator's side) and the new sound's mel ``[80, M]`` (column 0 at
    frame 0, :func:`marlin.audio.mel.log_mel`) -> the crops with the lower face redrawn, uint8 ``[3, N, S, S]``
    (`guidance`: sound guidance, :class:`marlin.lipsync.model.LipGenerator`)."""
    if crops.dtype != torch.uint8 or crops.dim() != 4 or crops.shape[-1] != gen.config.img_size:
        raise ValueError(f"expected uint8 crops [3, N, {gen.config.img_size}, {gen.config.img_size}], got "
                         f"{crops.dtype} {tuple(crops.shape)}")  # fmt: skip
    gen.eval()
    device, t = torch.device(device), gen.clip_frames
    starts = window_starts_covering(crops.shape[1], t)
    out = crops.clone()
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        video = torch.stack([crops[:, s : s + t] for s in chunk]).to(device).float().div_(255.0)  # [b, 3, T, S, S]
        still = video[:, :, t // 2 : t // 2 + 1].expand_as(video)  # the middle frame, held
        mels = torch.stack([sync_window(mel, s, t, fps, gen.mel_length) for s in chunk]).to(device)  # [b, 80, L]
        drawn = gen.generate(video, still, mels, guidance).mul_(255.0).round_().clamp_(0, 255).to(torch.uint8).cpu()
        for s, window in zip(chunk, drawn, strict=True):
            out[:, s : s + t] = window
    return out


def _feather(side: int, top: float, edge: float) -> np.ndarray:
    """``[side, side, 1]`` blend weights: 0 above row ``top * side``, 1 inside, ramps of ``edge * side`` pixels at
    the top of the region and at the left, right and bottom borders (no visible seam)."""
    ramp = max(1, round(edge * side))
    y = np.arange(side, dtype=np.float32)
    rows = np.clip((y - top * side) / ramp, 0, 1) * np.clip((side - 1 - y) / ramp, 0, 1)
    cols = np.clip(y / ramp, 0, 1) * np.clip((side - 1 - y) / ramp, 0, 1)
    return (rows[:, None] * cols[None, :])[..., None]


def paste_lower(frame: np.ndarray, crop: np.ndarray, window: np.ndarray, top: float, edge: float = 0.06) -> np.ndarray:
    """`frame` ``[H, W, 3]`` uint8 with the part of `crop` (``[S, S, 3]``, cut from the integer square `window`
    ``(x1, y1, x2, y2)``) below row fraction `top` pasted back at its place, feathered over ``edge`` of the side."""
    x1, y1, x2, y2 = (int(v) for v in window)
    side = x2 - x1
    h, w = frame.shape[:2]
    sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    if sx1 >= sx2 or sy1 >= sy2:
        return frame
    big = np.asarray(Image.fromarray(crop).resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32)
    alpha = _feather(side, top, edge)
    part = (slice(sy1 - y1, sy2 - y1), slice(sx1 - x1, sx2 - x1))
    out = frame.copy()
    region = out[sy1:sy2, sx1:sx2].astype(np.float32)
    out[sy1:sy2, sx1:sx2] = np.rint(region + alpha[part] * (big[part] - region)).astype(np.uint8)
    return out


@dataclass(frozen=True)
class DubResult:
    """What :func:`dub_video` wrote."""

    path: Path
    n_frames: int  # frames written (the sound's length at the video's frame rate)
    fps: float
    looped: bool  # the sound outlasts the video, which was looped
    faceless: int  # frames written unchanged (no face there)


def _looped(n_video: int, n_out: int) -> list[int]:
    return [j % n_video for j in range(n_out)]


def dub_video(gen: LipGenerator, video: str | os.PathLike, audio: str | os.PathLike, out: str | os.PathLike, *,
              detector: str = "mediapipe", batch_size: int = 8, device: torch.device | str = "cpu",
              guidance: float = 0.0) -> DubResult:  # fmt: skip
    """Write `out`: `video` with its main face's mouth redrawn to speak the sound of `audio` (any media file with
    sound), and that sound (see the module docstring)."""
    from ..audio.mel import SAMPLE_RATE, log_mel
    from ..face.crop import square_boxes
    from ..face.detect import create_detector
    from ..video.faces import iter_face_crops, plan_face_crops
    from ..video.io import iter_frames, probe_video, read_audio, write_video

    info = probe_video(video)
    fps = float(info.fps)
    wav, _ = read_audio(audio, SAMPLE_RATE)
    n_out = int(len(wav) / SAMPLE_RATE * fps)
    if n_out < gen.clip_frames:
        raise ValueError(f"{audio}: {len(wav) / SAMPLE_RATE:.2f} s of sound, shorter than one "
                         f"{gen.clip_frames}-frame window at {fps:g} fps")  # fmt: skip
    with create_detector(detector) as det:
        plan = plan_face_crops(video, det)[0]
    size = gen.config.img_size
    crops = np.zeros((plan.n_frames, size, size, 3), np.uint8)
    has_face = np.zeros(plan.n_frames, bool)
    for i, crop in iter_face_crops(plan, set(range(plan.n_frames)), size=size):
        crops[i], has_face[i] = crop, True
    order = _looped(plan.n_frames, n_out)
    loops = " (the video loops)" if n_out > plan.n_frames else ""
    log.info("lipsync %s: %d frames at %g fps (%d without a face), sound of %s: %d frames%s", video, plan.n_frames,
             fps, int((~has_face).sum()), audio, n_out, loops)  # fmt: skip
    seq = torch.from_numpy(crops[order]).permute(3, 0, 1, 2)  # [3, n_out, S, S]
    dubbed = dub_crops(gen, seq, log_mel(wav), fps, batch_size=batch_size, device=device, guidance=guidance)
    dubbed = dubbed.permute(1, 2, 3, 0).numpy()  # [n_out, S, S, 3]
    top = gen.top / gen.config.img_size  # the generator redraws the rows from here down

    def frames() -> Iterator[np.ndarray]:
        j = 0
        while j < n_out:
            for i, frame in enumerate(iter_frames(video, stop=plan.n_frames)):
                if j >= n_out:
                    return
                box = plan.box(i) if has_face[i] else None
                yield frame if box is None else paste_lower(frame, dubbed[j], square_boxes(box, **plan.framing), top)
                j += 1

    path = write_video(out, frames(), fps=fps, audio=(wav[: round(n_out / fps * SAMPLE_RATE)], SAMPLE_RATE))
    return DubResult(Path(path), n_out, fps, n_out > plan.n_frames, int((~has_face[order]).sum()))
