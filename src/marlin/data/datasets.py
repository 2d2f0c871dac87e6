"""Datasets of clips: what pretraining and fine-tuning iterate over.

Pretraining items are dicts ``{"video": float32 [3, T, H, W] in [0, 1], "parse": uint8 [T, H, W] (with parse maps;
absent otherwise), "index": int}`` and every pretraining dataset says with ``has_parse`` whether parse maps come
with its clips. Sources: a `marlin prepare` store (:class:`PretrainDataset`; several at once with
:class:`StoreUnion`), video files (:class:`VideoFolderClips`) or generated clips
(:class:`marlin.data.synthetic.SyntheticClips`). Fine-tuning reads labelled videos (:class:`VideoClips`). Frames are
chosen by the one clip sampler, :mod:`marlin.data.clips`; masks are drawn later, per batch, by
:class:`marlin.data.collate.MaskCollator`.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset

from ..utils.seeding import derive_seed
from ..video.io import probe_video
from .clips import centred_start, clip_indices, fit_sample_rate, max_start, random_start, read_clip, spread_starts
from .sampling import BALANCE
from .store import ClipStore, StoreError

__all__ = ["PretrainDataset", "StoreUnion", "VideoClips", "VideoFolderClips", "balance_weights"]

log = logging.getLogger("marlin")


class PretrainDataset(Dataset):
    """16-frame clips from a store, as the MARLIN pretraining trainer consumes them.

    Each item is one video. ``mode="train"`` takes a random start, ``mode="eval"`` the centred one; frames are
    ``sample_rate`` source frames apart (2, as the official pretraining). Videos shorter than a clip are padded by
    repeating their last frame. Items are ``{"video": float32 [3, T, H, W] in [0, 1], "parse": uint8 [T, H, W],
    "index": int}``; ``"parse"`` is absent when ``parse=False`` or the store has none (see :attr:`has_parse`). The
    default collate stacks them into ``[B, 3, T, H, W]`` / ``[B, T, H, W]`` / ``[B]``.

    Randomness: with ``seed=None`` starts come from torch's RNG (reproducible under ``torch.manual_seed``, different
    every epoch, also in DataLoader workers). With an int ``seed`` the start of item ``i`` is a pure function of
    ``(seed, epoch, i)``, whatever the worker count: vary it per epoch with :meth:`set_epoch` (in-process loading),
    or by asking for key ``epoch * len + i`` (a sampler streaming several epochs, DataLoader workers).

    Args:
        root: store folder (or an open :class:`ClipStore`).
        split: ``"train"``, ``"val"`` or ``None`` for every item.
        clip_frames: frames per clip (``MarlinConfig.clip_frames``).
        sample_rate: distance between clip frames in *source* frames; a multiple of the store's frame step.
        mode: ``"train"`` (random start) or ``"eval"`` (centred start).
        parse: return parse maps (default: when the store has them). True on a store without them raises.
        seed: see above.
        img_size: crop side to return (``MarlinConfig.img_size``); a larger store is downscaled on read (area for
            pixels, nearest for parse maps, so a 224 px store also serves a 112 px model); a smaller one is refused.
    """

    def __init__(
        self,
        root: str | os.PathLike | ClipStore,
        split: str | None = "train",
        *,
        clip_frames: int = 16,
        sample_rate: int = 2,
        mode: str = "train",
        parse: bool | None = None,
        seed: int | None = None,
        img_size: int | None = None,
    ) -> None:
        self.store = root if isinstance(root, ClipStore) else ClipStore(root)
        if mode not in ("train", "eval"):
            raise ValueError(f"PretrainDataset: mode must be 'train' or 'eval', found {mode!r}")
        if split not in ("train", "val", None):
            raise ValueError(f"PretrainDataset: split must be 'train', 'val' or None, found {split!r}")
        if clip_frames < 1 or sample_rate < 1:
            raise ValueError(
                f"PretrainDataset: clip_frames and sample_rate must be >= 1, found {clip_frames}, {sample_rate}"
            )
        if img_size is not None and img_size > self.store.size:
            raise StoreError(
                f"{self.store.root / 'store.json'}: crops are {self.store.size} px, smaller than "
                f"img_size={img_size}; prepare the store with --size {img_size}"
            )
        self.img_size = self.store.size if img_size is None else int(img_size)
        if parse and not self.store.has_parse:
            raise StoreError(
                f"{self.store.root / 'store.json'}: store has no parse maps (built with --no-parse), "
                "but parse=True was asked"
            )
        self.parse = self.store.has_parse if parse is None else bool(parse)
        self.items = self.store.split(split)
        if not self.items:
            raise StoreError(f"{self.store.root / 'manifest.csv'}: no item in split {split!r}")
        self.split, self.clip_frames, self.sample_rate, self.mode = split, clip_frames, sample_rate, mode
        self.seed = seed
        self.epoch = 0
        self._stored_rate = {}  # frame_step -> sample rate in stored frames
        for step in {it.frame_step for it in self.items}:
            if sample_rate % step:
                raise StoreError(
                    f"{self.store.root / 'manifest.csv'}: items keep every {step}-th frame, cannot sample every "
                    f"{sample_rate}-th frame; use a sample rate that is a multiple of {step}"
                )
            self._stored_rate[step] = sample_rate // step

    @classmethod
    def from_config(cls, root: str | os.PathLike | ClipStore, config: Any, **kwargs: Any) -> PretrainDataset:
        """Clip length and crop size from a :class:`marlin.MarlinConfig`."""
        return cls(root, clip_frames=config.clip_frames, img_size=config.img_size, **kwargs)

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        """Vary the random starts per epoch when a fixed ``seed`` is used (no effect with ``seed=None``)."""
        self.epoch = int(epoch)

    def _resolve(self, key: int) -> tuple[int, int]:
        """``key`` -> (item index, epoch): ``[0, n)`` is an item in the current epoch, ``e * n + i`` item ``i`` in
        epoch ``e`` (for samplers that stream several epochs), negatives count from the end as usual."""
        n = len(self)
        if not -n <= key:
            raise IndexError(f"PretrainDataset: index {key} out of range for {n} items")
        if key < n:
            return key % n, self.epoch
        epoch, index = divmod(key, n)
        return index, epoch

    def item(self, index: int, epoch: int) -> dict[str, Any]:
        """Item `index` as drawn in `epoch` (with a fixed ``seed``, each epoch takes another random clip)."""
        return self[epoch * len(self) + index]

    def frame_indices(self, key: int) -> np.ndarray:
        """Stored-frame indices of the clip ``self[key]`` reads (``[clip_frames]`` int64); see :meth:`__getitem__`."""
        index, epoch = self._resolve(int(key))
        item = self.items[index]
        rate = self._stored_rate[item.frame_step]
        if self.mode == "eval":
            start = centred_start(item.n_frames, self.clip_frames, rate)
        else:
            rng = None if self.seed is None else np.random.default_rng([self.seed, epoch, index])
            start = random_start(item.n_frames, self.clip_frames, rate, rng)
        return clip_indices(item.n_frames, self.clip_frames, rate, start)

    def __getitem__(self, key: int) -> dict[str, Any]:
        """One clip: ``{"video": float32 [3, T, H, W] in [0, 1], "parse": uint8 [T, H, W], "index": int}``.

        ``key`` is an item index in ``[0, len)``, or ``epoch * len + index`` to name the epoch explicitly (with a
        fixed ``seed`` the clip is then a pure function of ``(seed, epoch, index)``, even in DataLoader workers,
        where :meth:`set_epoch` on the main process's copy does not reach).
        """
        index, _ = self._resolve(int(key))
        item = self.items[index]
        frames = self.frame_indices(key)
        video = torch.from_numpy(self.store.read_video(item, frames))  # [T, H, W, 3] uint8
        # Transpose the uint8 frames first (4x less memory traffic than transposing floats), then convert.
        x = video.permute(3, 0, 1, 2).contiguous().float().div_(255.0)  # [3, T, H, W] in [0, 1]
        small = self.img_size != x.shape[-1]
        if small:
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="area")  # [3, T, S, S]
        out: dict[str, Any] = {"video": x}
        if self.parse:
            parse = torch.from_numpy(self.store.read_parse(item, frames))  # [T, H, W] uint8
            if small:
                parse = F.interpolate(parse[None].float(), size=(self.img_size, self.img_size), mode="nearest")[0]
                parse = parse.to(torch.uint8)  # [T, S, S]
            out["parse"] = parse
        out["index"] = index
        return out

    @property
    def has_parse(self) -> bool:
        """Whether items carry ``"parse"`` (the trainer's dataset contract)."""
        return self.parse

    def __repr__(self) -> str:
        return (
            f"PretrainDataset({str(self.store.root)!r}, split={self.split!r}, items={len(self)}, "
            f"clip_frames={self.clip_frames}, sample_rate={self.sample_rate}, mode={self.mode!r}, parse={self.parse})"
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

    def item(self, index: int, epoch: int) -> dict[str, Any]:
        """Item `index` as drawn in `epoch` (see :meth:`PretrainDataset.item`)."""
        k = bisect.bisect_right(self.cumulative_sizes, index)
        local = index - (self.cumulative_sizes[k - 1] if k else 0)
        member = self.datasets[k]
        item = dict(member.item(local, epoch) if hasattr(member, "item") else member[local])
        if "index" in item:
            item["index"] = index
        if not self.has_parse:
            item.pop("parse", None)
        return item


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
        self.windows: list[tuple[Path, int]] = []  # (video, start frame)
        self.n_frames: dict[Path, int] = {}
        for p in map(Path, paths):
            n = probe_video(p).n_frames
            if n < 1:
                log.warning("%s: no frames, skipped", p)
                continue
            self.n_frames[p] = n
            starts = range(0, max_start(n, clip_frames, sample_rate) + 1, window_stride)
            self.windows.extend((p, s) for s in starts)
        if not self.windows:
            raise ValueError(f"no readable video frames in {len(paths)} file(s) (first: {paths[0]})")
        self.cache: dict[int, Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.windows)

    def frame_indices(self, index: int) -> np.ndarray:
        path, start = self.windows[index]
        return clip_indices(self.n_frames[path], self.clip_frames, self.sample_rate, start)

    def __getitem__(self, index: int) -> dict[str, Any]:
        clip = self.cache.get(index) if self.cache is not None else None
        if clip is None:
            clip = read_clip(self.windows[index][0], self.frame_indices(index), self.img_size)  # [3, T, S, S] uint8
            if self.cache is not None:
                self.cache[index] = clip
        return {"video": clip.float() / 255.0, "index": index}


class VideoClips(Dataset):
    """Labelled videos as clips: one random clip per item in training (the centred one with ``jitter=False``: where
    a label is a position in time, as a word's in a sentence), `n_clips` evenly spaced ones otherwise.

    Items: ``{"video": uint8 [3, T, S, S] (train) or [n_clips, 3, T, S, S], "target": tensor, "index": int}``.
    Training randomness (clip start, flip) is seeded by (seed, epoch, index): call :meth:`set_epoch` before each
    epoch's loader is created (workers copy the dataset then).
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        targets: np.ndarray,
        *,
        clip_frames: int,
        img_size: int,
        sample_rate: int = 2,
        train: bool = True,
        n_clips: int = 4,
        hflip: bool = False,
        seed: int = 0,
        jitter: bool = True,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.jitter = jitter
        self.targets = torch.as_tensor(np.asarray(targets))
        self.clip_frames, self.img_size, self.sample_rate = clip_frames, img_size, sample_rate
        self.train, self.n_clips, self.hflip, self.seed = train, n_clips, hflip, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        n = max(1, probe_video(path).n_frames)  # frames that fail to decode are padded by read_clip
        rate = fit_sample_rate(n, self.clip_frames, self.sample_rate)
        if self.train:
            rng = np.random.default_rng(derive_seed(self.seed, "finetune-clip", self.epoch, index))
            start = (
                random_start(n, self.clip_frames, rate, rng)
                if self.jitter
                else spread_starts(n, self.clip_frames, rate, 1)[0]
            )
            video = read_clip(path, clip_indices(n, self.clip_frames, rate, start), self.img_size)  # [3, T, S, S]
            if self.hflip and rng.random() < 0.5:
                video = video.flip(-1)
        else:
            starts = spread_starts(n, self.clip_frames, rate, self.n_clips)
            frames = np.concatenate([clip_indices(n, self.clip_frames, rate, s) for s in starts])
            flat = read_clip(path, frames, self.img_size)  # [3, n * T, S, S]
            video = flat.view(3, len(starts), self.clip_frames, self.img_size, self.img_size).transpose(0, 1)
        return {"video": video.contiguous(), "target": self.targets[index], "index": index}


def balance_weights(dataset: Dataset, balance: str) -> Tensor | None:
    """Per-item draw probabilities ``[len(dataset)]`` that make each store (``"store"``) or each identity group of
    each store (``"group"``, `marlin prepare`'s group) as frequent as any other; ``None`` for ``"none"`` (every item
    once per epoch). Items of one store / group share its probability equally."""
    if balance not in BALANCE:
        raise ValueError(f"balance must be one of {BALANCE}, found {balance!r}")
    if balance == "none":
        return None
    members = dataset.datasets if isinstance(dataset, StoreUnion) else [dataset]
    if not all(isinstance(m, PretrainDataset) for m in members):
        raise ValueError(f"balance={balance!r} needs `marlin prepare` stores (their groups), not "
                         f"{type(members[0]).__name__}")  # fmt: skip
    keys = [str(k) if balance == "store" else f"{k}\0{it.group}" for k, m in enumerate(members) for it in m.items]
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    w = 1.0 / counts[inverse]
    return torch.as_tensor(w / w.sum(), dtype=torch.float64)
