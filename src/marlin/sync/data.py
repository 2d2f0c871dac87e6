"""Audio-visual training pairs for the lip-sync expert: a video's face clip and the mel windows that go with it.

A source is a video file, or an item folder of a ``marlin prepare`` store (``STORE/items/<id>``: its face crops are
made already, and its sound is read from the video the item came from; :func:`sync_inputs` expands ``STORE`` or
``STORE#train`` / ``STORE#val`` into the items whose video has sound). Frames of a video come from the one clip sampler
(:func:`marlin.data.clips.read_face_clip` around the tracked face, or :func:`marlin.data.clips.read_clip` for videos
that are face crops already); frames of a store item from its crops (resized to the expert's size); sound from
:func:`marlin.video.io.read_audio` -> :func:`marlin.audio.mel.log_mel`. A video whose audio ends more than
:data:`MAX_SHORTFALL_S` before its last frame is refused (its last windows would pair lips with silence).

:class:`SyncPairs` item ``g`` of the sample stream is a function of ``(seed, g)`` only (epoch ``g // n`` visits every
video once in a seeded order), so a resumed or multi-process run reads exactly the pairs a single uninterrupted run
reads. Each item is one clip (``clip_frames`` consecutive frames from a random start), its in-sync mel window and
``negatives`` windows shifted by ``min_shift .. max_shift`` frames either way (inside the video when it is long
enough), as Wav2Lip trains its expert.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..audio.mel import log_mel
from ..utils.seeding import derive_seed
from .expert import sync_window

__all__ = [
    "MAX_SHORTFALL_S",
    "SyncPairs",
    "VideoAudio",
    "load_video_audio",
    "read_frames_for_sync",
    "store_item_meta",
    "sync_inputs",
]

MAX_SHORTFALL_S = 0.2
"""Seconds of video without audio tolerated at the end (GRID's AAC tracks end ~20 ms early); more is refused."""


@dataclass(frozen=True)
class VideoAudio:
    """A video's sound as the expert reads it: the scaled log-mel spectrogram and the video's frame timing."""

    path: Path
    mel: Tensor  # [80, M], 80 mel frames per second, column 0 at the first video frame
    n_frames: int
    fps: float


def store_item_meta(path: str | os.PathLike) -> dict | None:
    """The ``meta.json`` of a ``marlin prepare`` store item folder (``STORE/items/<id>``); None for anything else."""
    p = Path(path)
    if not (p.is_dir() and (p / "meta.json").is_file() and (p.parent.parent / "store.json").is_file()):
        return None
    return json.loads((p / "meta.json").read_text())


def sync_inputs(specs: Sequence[str | os.PathLike]) -> tuple[list[str], list[str]]:
    """(sources, skipped): files, folders, globs and CSV lists as every command reads them, and ``marlin prepare``
    stores (``STORE``, or one split: ``STORE#train`` / ``STORE#val``, or one item folder) as item folders whose video
    has sound;
    `skipped` names the store items without sound. Errors as :func:`marlin.data.sources.collect_inputs` (strict)."""
    from ..data.sources import collect_inputs
    from ..data.store import ClipStore
    from ..video.io import has_audio

    out, skipped = [], []
    for spec in map(str, specs):
        root, _, split = spec.partition("#")
        item = store_item_meta(Path(root).expanduser()) if not split else None
        if item is not None:  # one item folder of a store
            (out if has_audio(item["source"]) else skipped).append(str(Path(root).expanduser()))
            continue
        if not (Path(root).expanduser() / "store.json").is_file():
            out += [str(p) for p in collect_inputs([spec], strict=True)]
            continue
        store = ClipStore(Path(root).expanduser())
        items = store.split(split or None)
        if not items:
            raise ValueError(f"{spec}: no items{f' in split {split!r}' if split else ''}")
        for item in items:
            folder = str(store.item_dir(item))
            (out if has_audio(store.meta(item)["source"]) else skipped).append(folder)
    return out, skipped


def load_video_audio(path: str | os.PathLike, max_shortfall_s: float = MAX_SHORTFALL_S) -> VideoAudio:
    """Decode a video's audio (a store item's: of the video it came from) and compute its log-mel; one-line
    ValueError for a file without video frame timing or with audio shorter than the frames (more than
    `max_shortfall_s`)."""
    from ..video.io import read_audio

    meta = store_item_meta(path)
    wav, info = read_audio(meta["source"] if meta else path)
    if info.video_frames is None or not info.fps:
        raise ValueError(f"{path}: no video stream with a frame rate; lip sync needs a video with sound")
    step = int(meta.get("frame_step", 1)) if meta else 1
    n_frames, fps = (int(meta["n_frames"]) if meta else int(info.video_frames)), float(info.fps) / step
    shortfall = n_frames / fps - info.duration_s  # the frames read, not the whole source (a store may keep fewer)
    if shortfall > max_shortfall_s:
        raise ValueError(f"{path}: the audio ends {shortfall:.2f} s before the video "
                         f"({info.duration_s:.2f} s of sound for {n_frames / fps:.2f} s of video); "
                         "trim the video to its sound")  # fmt: skip
    return VideoAudio(Path(path), log_mel(wav), n_frames, fps)


def read_frames_for_sync(path: str | os.PathLike, indices: Sequence[int], size: int, crop_face: bool,
                         detector: str = "mediapipe") -> Tensor:  # fmt: skip
    """Frames `indices` as uint8 ``[3, T, size, size]``: a store item's crops (resized), else cropped around the
    tracked face, or centre-cropped."""
    from ..data.clips import read_clip, read_face_clip
    from ..data.store import read_stream

    meta = store_item_meta(path)
    if meta is not None:
        crops = torch.from_numpy(read_stream(path, meta["streams"]["video"], list(indices)))  # [T, S', S', 3]
        x = crops.permute(3, 0, 1, 2).contiguous()  # [3, T, S', S']
        if x.shape[-1] != size:
            x = F.interpolate(x.float(), size=(size, size), mode="area").round_().clamp_(0, 255).to(torch.uint8)
        return x
    if not crop_face:
        return read_clip(path, indices, size)
    crops = read_face_clip(path, indices, size, detector=detector)  # [T, S, S, 3]
    return torch.from_numpy(crops).permute(3, 0, 1, 2).contiguous()


def pair_shifts(start: int, last: int, k: int, min_shift: int, max_shift: int, rng: np.random.Generator) -> list[int]:
    """`k` distinct shifts ``min_shift <= |s| <= max_shift`` whose window stays in ``[0, last]`` when there are
    enough such shifts; otherwise shifts past the edges too (their audio is partly silence)."""
    every = [s for s in range(-max_shift, max_shift + 1) if abs(s) >= min_shift]
    inside = [s for s in every if 0 <= start + s <= last]
    pool = inside if len(inside) >= k else every
    return [int(s) for s in rng.choice(pool, size=k, replace=len(pool) < k)]


class SyncPairs(Dataset):
    """Item ``g`` -> ``{"video": uint8 [3, T, S, S], "mel": float32 [1 + negatives, 80, L], "shift": int64
    [1 + negatives]}`` (shift 0 first). ``train=False``: the centred clip of video ``g % n`` with fixed shifts
    (``eval_shifts``), for deterministic validation."""

    def __init__(self, videos: Sequence[str | os.PathLike], *, clip_frames: int, size: int, mel_length: int,
                 crop_face: bool = True, detector: str = "mediapipe", negatives: int = 2, min_shift: int = 2,
                 max_shift: int = 15, seed: int = 0, train: bool = True,
                 eval_shifts: Sequence[int] = (-12, -6, -3, 3, 6, 12), cache_size: int = 256) -> None:  # fmt: skip
        if not videos:
            raise ValueError("no videos to train the lip-sync expert on")
        if not 1 <= min_shift <= max_shift or negatives < 1:
            raise ValueError(f"expected 1 <= min_shift <= max_shift and negatives >= 1, got {min_shift}, {max_shift}, "
                             f"{negatives}")  # fmt: skip
        self.videos, self.clip_frames, self.size = [str(v) for v in videos], clip_frames, size
        self.mel_length = mel_length
        self.crop_face, self.detector, self.negatives = crop_face, detector, negatives
        self.min_shift, self.max_shift, self.seed, self.train = min_shift, max_shift, seed, train
        self.eval_shifts, self.cache_size = [int(s) for s in eval_shifts], cache_size
        self._audio: OrderedDict[str, VideoAudio] = OrderedDict()

    def __len__(self) -> int:
        return len(self.videos)

    def audio(self, path: str) -> VideoAudio:
        """The video's mel, decoded once per process (LRU of `cache_size` videos: a few hundred KB each)."""
        if path in self._audio:
            self._audio.move_to_end(path)
            return self._audio[path]
        got = self._audio[path] = load_video_audio(path)
        if len(self._audio) > self.cache_size:
            self._audio.popitem(last=False)
        return got

    def _video_of(self, g: int) -> str:
        n = len(self.videos)
        if not self.train:
            return self.videos[g % n]
        epoch, j = divmod(g, n)
        order = np.random.default_rng(derive_seed(self.seed, "order", epoch)).permutation(n)
        return self.videos[int(order[j])]

    def __getitem__(self, g: int) -> dict[str, Tensor]:
        path = self._video_of(int(g))
        va = self.audio(path)
        last = va.n_frames - self.clip_frames
        if last < 0:
            raise ValueError(f"{path}: {va.n_frames} frames, fewer than the expert's {self.clip_frames}-frame window")
        if self.train:
            rng = np.random.default_rng(derive_seed(self.seed, "pair", int(g)))
            start = int(rng.integers(last + 1))
            shifts = [0, *pair_shifts(start, last, self.negatives, self.min_shift, self.max_shift, rng)]
        else:
            start, shifts = last // 2, [0, *self.eval_shifts]
        video = read_frames_for_sync(path, range(start, start + self.clip_frames), self.size, self.crop_face,
                                     self.detector)  # fmt: skip
        mel = torch.stack(
            [sync_window(va.mel, start + s, self.clip_frames, va.fps, self.mel_length) for s in shifts]
        )  # [M, 80, L]
        return {"video": video, "mel": mel, "shift": torch.tensor(shifts, dtype=torch.int64)}
