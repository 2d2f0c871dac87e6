"""A synthetic face-like clip dataset for tests, benchmarks and smoke runs: no files, deterministic per index.

Each clip is a coloured "face" (an ellipse with eyes, brows, nose, lips and a hair cap) drifting over a two-colour
background, with the matching LaPa parse map, so every masking strategy (including fasking) can run on it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..models.config import MarlinConfig
from ..utils.seeding import derive_seed

__all__ = ["SyntheticClips"]

# Base RGB colour per LaPa label (0 background .. 10 hair); each clip perturbs them.
_COLOURS = torch.tensor(
    [
        [0.30, 0.45, 0.60],  # background (second colour drawn per clip)
        [0.85, 0.65, 0.52],  # skin
        [0.25, 0.15, 0.10],  # right brow
        [0.25, 0.15, 0.10],  # left brow
        [0.95, 0.95, 0.95],  # right eye
        [0.95, 0.95, 0.95],  # left eye
        [0.75, 0.52, 0.42],  # nose
        [0.70, 0.25, 0.30],  # upper lip
        [0.20, 0.05, 0.05],  # inner mouth
        [0.75, 0.30, 0.35],  # lower lip
        [0.20, 0.12, 0.08],  # hair
    ]
)


class SyntheticClips(Dataset):
    """`size` clips of `config.clip_frames` x `config.img_size`^2: items {"video": float32 [3, T, H, W] in [0, 1],
    "parse": uint8 [T, H, W], "index": int}. Item `i` depends only on (`seed`, `i`)."""

    has_parse = True

    def __init__(self, size: int, config: MarlinConfig, seed: int = 0) -> None:
        if size < 1:
            raise ValueError(f"SyntheticClips size must be >= 1, found {size}")
        self.size = size
        self.frames = config.clip_frames
        self.img_size = config.img_size
        self.seed = seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Tensor | int]:
        if not 0 <= index < self.size:
            raise IndexError(f"SyntheticClips index {index} out of range [0, {self.size})")
        g = torch.Generator().manual_seed(derive_seed(self.seed, "synthetic", index))

        def u(lo: float, hi: float, n: int = 1) -> Tensor:
            return lo + (hi - lo) * torch.rand(n, generator=g)

        t_steps, s = self.frames, self.img_size
        coords = (torch.arange(s, dtype=torch.float32) + 0.5) / s  # [S] in (0, 1)
        yy, xx = coords[:, None], coords[None, :]  # [S, 1], [1, S]
        t = torch.arange(t_steps, dtype=torch.float32)[:, None, None]  # [T, 1, 1]
        centre, radius, velocity = u(0.4, 0.6, 2), u(0.22, 0.32, 2), u(-0.008, 0.008, 2)
        cx, cy = centre[0] + velocity[0] * t, centre[1] + velocity[1] * t  # [T, 1, 1]
        dx, dy = (xx - cx) / radius[0], (yy - cy) / radius[1]  # [T, S, S] in face units
        face = dx**2 + dy**2 <= 1

        parse = torch.zeros(t_steps, s, s, dtype=torch.uint8)
        parse[(dx**2 + dy**2 <= 1.25**2) & (dy < -0.55)] = 10  # hair cap
        parse[face] = 1
        eye_dy, blink = u(-0.3, -0.15), u(0.08, 0.16)
        for label, sign in ((4, -1.0), (5, 1.0)):  # subject's right eye on the image's left
            parse[face & (((dx - sign * 0.4) / 0.2) ** 2 + ((dy - eye_dy) / blink) ** 2 <= 1)] = label
            parse[face & ((dx - sign * 0.4).abs() < 0.22) & ((dy - eye_dy + 0.22).abs() < 0.05)] = label - 2  # brow
        parse[face & (dx.abs() < 0.1) & (dy > -0.05) & (dy < 0.25)] = 6  # nose
        mouth_open = u(0.0, 0.06) * (1 + torch.sin(t * u(0.3, 1.2) + u(0, math.pi)))  # [T, 1, 1]
        lips = face & (dx.abs() < 0.38) & ((dy - 0.5).abs() < 0.07 + mouth_open)
        parse[lips & (dy < 0.5 - mouth_open)] = 7
        parse[lips & (dy > 0.5 + mouth_open)] = 9
        parse[lips & ((dy - 0.5).abs() <= mouth_open)] = 8

        colours = (_COLOURS + 0.08 * (torch.rand(11, 3, generator=g) - 0.5)).clamp(0, 1)  # [11, 3]
        video = colours[parse.long()].permute(3, 0, 1, 2).clone()  # [3, T, S, S]
        background = parse == 0
        second = torch.rand(3, generator=g)[:, None, None, None]  # [3, 1, 1, 1]
        ramp = (xx * 0.6 + yy * 0.4).expand(t_steps, s, s)  # [T, S, S] diagonal gradient
        mixed = video * (1 - ramp) + second * ramp  # [3, T, S, S]
        video = torch.where(background, mixed, video)
        texture = 0.03 * torch.sin(xx * u(10, 30) + yy * u(10, 30) + t * 0.3)  # [T, S, S]
        video = (video + texture).clamp(0, 1).contiguous()
        return {"video": video, "parse": parse, "index": index}
