"""What a pretraining run reads: its training dataset and its held-out sets, from the config's sources.

``data.source``: one or more `marlin prepare` stores (comma-separated; their ``train`` split, with parse maps for
face-guided masking), ``synthetic``, or video files (folders / globs / files / CSV lists). ``val.source``: ``auto``
(the ``val`` split of each training store), ``none``, stores or videos. The datasets themselves live in
:mod:`marlin.data.datasets`.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from ..data.datasets import PretrainDataset, StoreUnion, VideoFolderClips
from ..data.sources import expand_video_sources
from ..data.synthetic import SyntheticClips
from .config import PretrainConfig

__all__ = ["build_dataset", "build_val_sets", "val_indices"]


def build_dataset(cfg: PretrainConfig, source: str | None = None, *, cache: bool | None = None) -> Dataset:
    """The dataset named by `source` (default `cfg.data.source`): a `marlin prepare` store (its train split, with
    parse maps for face-guided masking), "synthetic", or video files (a directory / glob / comma list)."""
    cache = cfg.data.cache if cache is None else cache
    source = source or cfg.data.source
    parts = [s.strip() for s in source.split(",") if s.strip()]
    stores = [p for p in parts if _is_store(p)]
    if stores:
        if len(stores) != len(parts):
            raise ValueError(f"{source}: mix of `marlin prepare` stores and video files; use one kind per run")

        sets = [
            PretrainDataset.from_config(
                Path(p).expanduser(), cfg.model, sample_rate=cfg.data.temporal_sample_rate, seed=cfg.seed
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


def _is_store(path: str) -> bool:
    return (Path(path).expanduser() / "store.json").is_file()


def build_val_sets(cfg: PretrainConfig) -> dict[str, Dataset]:
    """The held-out sets named by `cfg.val.source`, by name; empty when validation is off or nothing is held out.

    ``"auto"``: the ``val`` split of each training store (`marlin prepare` holds out whole identities), one set per
    store that has one, named after the store's folder; none for video folders or synthetic data. Store paths
    (comma-separated): all of their items, one set each; ``STORE#val``: only that store's ``val`` split (e.g. the
    unseen people of one training store, while another store's ``val`` split stays out of everything). A directory /
    glob / list of videos: one set ("videos"), windows cut as for training. Each set is scored apart, so a mix of
    easy and hard held-out data stays visible.
    """
    source = (cfg.val.source or "none").strip()
    if source.lower() == "none":
        return {}
    m = cfg.model
    auto = source.lower() == "auto"
    parts = [s.strip() for s in (cfg.data.source if auto else source).split(",") if s.strip()]
    only_val = [auto or p.endswith("#val") for p in parts]
    parts = [p.removesuffix("#val") for p in parts]
    if all(_is_store(p) for p in parts):
        sets: dict[str, Dataset] = {}
        for p, val_only in zip(parts, only_val, strict=True):
            path = Path(p).expanduser()
            rate = cfg.data.temporal_sample_rate
            ds = PretrainDataset.from_config(path, m, split=None, sample_rate=rate, mode="eval")
            ds.items = [it for it in ds.items if it.split == "val"] if val_only else ds.items
            if ds.items:
                base = path.name or path.resolve().name  # the folder name as given ("." -> its real name)
                name, k = base, 2
                while name in sets:  # two stores with the same folder name
                    name, k = f"{base}_{k}", k + 1
                sets[name] = ds
        return sets
    if auto:  # synthetic data or plain videos: no split to hold out
        return {}
    videos = VideoFolderClips(
        expand_video_sources(source),
        clip_frames=m.clip_frames,
        sample_rate=cfg.data.temporal_sample_rate,
        img_size=m.img_size,
        window_stride=cfg.data.window_stride,
    )
    return {"videos": videos}


def val_indices(n: int, max_clips: int) -> list[int]:
    """At most `max_clips` indices spread evenly over ``range(n)`` (all of them when n <= max_clips)."""
    if n <= max_clips:
        return list(range(n))
    return sorted({round(i * (n - 1) / (max_clips - 1)) for i in range(max_clips)}) if max_clips > 1 else [0]
