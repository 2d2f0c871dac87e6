"""Training data: datasets, the collate function and a sampler that makes runs independent of the world size.

Dataset contract: a map-style dataset whose items are dicts ``{"video": float32 [3, T, H, W] in [0, 1],
"parse": uint8 [T, H, W] (face strategies only; absent or None otherwise), "index": int (optional)}`` and that has a
class attribute ``has_parse`` saying whether parse maps come with the clips.

Sample order: the run reads one endless stream, the concatenation of a fresh permutation of the dataset per epoch
(seeded by (seed, epoch)). Optimiser step ``s`` consumes stream positions ``[s * G, (s + 1) * G)`` with ``G`` the
global batch; rank ``r`` micro-step ``m`` takes the contiguous slice ``r * b * accum + m * b + [0, b)``. So every
sample is seen exactly once per epoch over all ranks (batches may straddle an epoch boundary; nothing is dropped
or padded), and 1 process with batch 8 reads the same samples at the same positions as 2 processes with batch 4 or
1 process with batch 4 and accumulation 2 — which, with masks seeded from (seed, step, position), makes those runs
equal, and makes a resumed run read exactly what the uninterrupted one would.
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset, Sampler

from ..train.config import PretrainConfig
from ..utils.distributed import derive_seed
from .synthetic import SyntheticClips

__all__ = [
    "StoreUnion",
    "StreamBatchSampler",
    "VIDEO_EXTENSIONS",
    "VideoFolderClips",
    "build_dataset",
    "collate_clips",
    "global_positions",
    "read_clip",
]

log = logging.getLogger("marlin")

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v")


# ---- reading clips --------------------------------------------------------------------------------------------------
def count_frames(path: str | Path) -> int:
    """Frames of the first video stream (from the header, else by demuxing packets)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if stream.frames:
            return int(stream.frames)
        return sum(1 for packet in container.demux(stream) if packet.size)


def read_clip(path: str | Path, indices: Sequence[int], img_size: int) -> Tensor:
    """Frames `indices` of a video, centre-cropped to a square and resized: uint8 ``[3, len(indices), S, S]``.

    Decodes sequentially up to the last index (no seeking, so every container gives the same frames); an index past
    the end repeats the last decoded frame.
    """
    import av

    wanted = sorted(set(indices))
    last = wanted[-1]
    frames: dict[int, Tensor] = {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        prev = None
        for i, frame in enumerate(container.decode(stream)):
            if i in frames or i in wanted:
                frames[i] = torch.from_numpy(frame.to_ndarray(format="rgb24"))  # [H, W, 3]
            prev = frame
            if i >= last:
                break
        if not frames and prev is None:
            raise ValueError(f"{path}: no decodable video frames")
        tail = torch.from_numpy(prev.to_ndarray(format="rgb24")) if prev is not None else None
    clip = torch.stack([frames.get(i, tail) for i in indices])  # [T, H, W, 3] uint8
    _, h, w, _ = clip.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    clip = clip[:, top : top + side, left : left + side].permute(3, 0, 1, 2)  # [3, T, side, side]
    if side != img_size:
        x = clip.float().transpose(0, 1)  # [T, 3, side, side]
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", antialias=True, align_corners=False)
        clip = x.round().clamp(0, 255).to(torch.uint8).transpose(0, 1)  # [3, T, S, S]
    return clip.contiguous()


class VideoFolderClips(Dataset):
    """Windows of `clip_frames` frames, `sample_rate` apart, cut every `window_stride` frames from video files.

    Frames are centre-cropped to a square and resized to `img_size`; no parse maps (use the tube / random / frame
    strategies). A video shorter than one window gives one window whose tail repeats its last frame. `cache=True`
    keeps decoded windows in memory (uint8) for small datasets that are read many times.
    """

    has_parse = False

    def __init__(
        self,
        paths: Sequence[str | Path],
        clip_frames: int = 16,
        sample_rate: int = 2,
        img_size: int = 224,
        window_stride: int = 16,
        cache: bool = False,
    ) -> None:
        if not paths:
            raise ValueError("VideoFolderClips needs at least one video file, found none")
        self.clip_frames, self.sample_rate, self.img_size = clip_frames, sample_rate, img_size
        span = (clip_frames - 1) * sample_rate + 1
        self.windows: list[tuple[Path, int]] = []
        for p in paths:
            n = count_frames(p)
            if n < 1:
                log.warning("%s: no frames, skipped", p)
                continue
            starts = range(0, max(1, n - span + 1), window_stride)
            self.windows.extend((Path(p), s) for s in starts)
        if not self.windows:
            raise ValueError(f"no readable video frames in {len(paths)} file(s) (first: {paths[0]})")
        self.cache: dict[int, Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.windows)

    def frame_indices(self, index: int) -> list[int]:
        start = self.windows[index][1]
        return [start + k * self.sample_rate for k in range(self.clip_frames)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        clip = self.cache.get(index) if self.cache is not None else None
        if clip is None:
            clip = read_clip(self.windows[index][0], self.frame_indices(index), self.img_size)  # [3, T, S, S] uint8
            if self.cache is not None:
                self.cache[index] = clip
        return {"video": clip.float() / 255.0, "index": index}


# ---- building ------------------------------------------------------------------------------------------------------
def expand_video_sources(source: str) -> list[Path]:
    """Video files from a comma-separated list of directories (searched recursively), globs and files."""
    files: list[Path] = []
    for part in (s.strip() for s in source.split(",")):
        if not part:
            continue
        path = Path(part).expanduser()
        if any(c in part for c in "*?["):
            found = [Path(f) for f in sorted(glob.glob(str(path), recursive=True))]
        elif path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.suffix.lower() in VIDEO_EXTENSIONS)
        elif path.is_file():
            found = [path]
        else:
            raise FileNotFoundError(f"{part}: no such file or directory")
        if not found:
            raise ValueError(f"{part}: no video files found (extensions {', '.join(VIDEO_EXTENSIONS)})")
        files.extend(found)
    return files


def build_dataset(cfg: PretrainConfig, source: str | None = None, *, cache: bool | None = None) -> Dataset:
    """The dataset named by `source` (default `cfg.data.source`): a `marlin prepare` store (its train split, with
    parse maps for face-guided masking), "synthetic", or video files (a directory / glob / comma list)."""
    cache = cfg.data.cache if cache is None else cache
    source = source or cfg.data.source
    parts = [s.strip() for s in source.split(",") if s.strip()]
    stores = [p for p in parts if (Path(p).expanduser() / "store.json").is_file()]
    if stores:
        if len(stores) != len(parts):
            raise ValueError(f"{source}: mix of `marlin prepare` stores and video files; use one kind per run")
        from .store import PretrainDataset

        sets = [
            PretrainDataset.from_config(
                Path(p).expanduser(), cfg.model, stride=cfg.data.temporal_sample_rate, seed=cfg.seed
            )
            for p in stores
        ]
        return sets[0] if len(sets) == 1 else StoreUnion(sets)
    m = cfg.model
    if source == "synthetic":
        return SyntheticClips(cfg.data.synthetic_size, m, seed=cfg.seed)
    return VideoFolderClips(
        expand_video_sources(source),
        clip_frames=m.clip_frames,
        sample_rate=cfg.data.temporal_sample_rate,
        img_size=m.img_size,
        window_stride=cfg.data.window_stride,
        cache=cache,
    )


class StoreUnion(ConcatDataset):
    """Several `marlin prepare` stores read as one dataset (e.g. GRID + talking heads); parse maps if all have them."""

    def __init__(self, datasets: Sequence[Dataset]) -> None:
        super().__init__(datasets)
        self.has_parse = all(getattr(d, "has_parse", False) for d in datasets)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(super().__getitem__(index))
        if "index" in item:
            item["index"] = index  # position in the union, not in the member store
        if not self.has_parse:
            item.pop("parse", None)
        return item

    def set_epoch(self, epoch: int) -> None:
        for d in self.datasets:
            if hasattr(d, "set_epoch"):
                d.set_epoch(epoch)


def collate_clips(items: list[dict[str, Any]]) -> dict[str, Tensor | None]:
    """Stack items into ``{"video": [B, 3, T, H, W], "parse": [B, T, H, W] or None, "index": [B] or None}``."""
    video = torch.stack([it["video"] for it in items])
    parses = [it.get("parse") for it in items]
    parse = torch.stack(parses) if all(p is not None for p in parses) else None
    index = torch.tensor([it["index"] for it in items]) if all("index" in it for it in items) else None
    return {"video": video, "parse": parse, "index": index}


# ---- sampling ------------------------------------------------------------------------------------------------------
def global_positions(step: int, micro: int, batch_size: int, accum_steps: int, rank: int, world_size: int) -> Tensor:
    """Stream positions of one micro-batch: ``[batch_size]`` long (see the module docstring)."""
    global_batch = batch_size * accum_steps * world_size
    first = step * global_batch + rank * batch_size * accum_steps + micro * batch_size
    return torch.arange(first, first + batch_size)


class StreamBatchSampler(Sampler[list[int]]):
    """Yields this rank's micro-batches of dataset indices from `start_step` on (see the module docstring)."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        accum_steps: int = 1,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start_step: int = 0,
        total_steps: int | None = None,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"the dataset is empty (num_samples={num_samples})")
        self.n, self.b, self.accum = num_samples, batch_size, accum_steps
        self.rank, self.world, self.seed = rank, world_size, seed
        self.start_step, self.total_steps = start_step, total_steps
        self._perms: dict[int, Tensor] = {}

    def steps_per_epoch(self) -> float:
        return self.n / (self.b * self.accum * self.world)

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def indices(self, positions: Tensor) -> list[int]:
        return [int(self._perm(int(p) // self.n)[int(p) % self.n]) for p in positions]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while self.total_steps is None or step < self.total_steps:
            for micro in range(self.accum):
                yield self.indices(global_positions(step, micro, self.b, self.accum, self.rank, self.world))
            step += 1

    def __len__(self) -> int:
        if self.total_steps is None:
            raise TypeError("an endless StreamBatchSampler has no length")
        return max(0, self.total_steps - self.start_step) * self.accum
