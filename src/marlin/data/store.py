"""The pretraining store (face crops + parse maps per video) and the dataset that samples clips from it.

A store is a folder that ``marlin prepare`` (:mod:`marlin.data.prepare`) writes::

    STORE/
      store.json              settings shared by every item: format version, crop size, frame step, codecs, ...
      manifest.csv            one row per finished item: id, split, group, n_frames, ... (rewritten at the end of a run)
      errors.csv              items that failed in the last run, with the reason
      items/<id>/             one folder per video, renamed into place only once complete
        meta.json             what the item holds and where it came from
        video.bin, video.idx.npy    crops: one JPEG per frame, concatenated; [T + 1] int64 byte offsets
        parse.bin, parse.idx.npy    parse maps: one zlib-compressed [S, S] uint8 LaPa label map per frame

Why this layout: a training sample is 16 frames at stride 2, i.e. 16 of 31 consecutive frames of one video. Each
stream is one file whose frames are independently decodable, so that read is one ``seek`` + one contiguous ``read``
of ~31 compressed frames and 16 small decodes (a quality-95 JPEG of a 224 px face is 13-18 KB and decodes in
~0.4 ms; a label map compresses to ~1.2 KB and inflates in ~0.05 ms; a whole sample costs 12-17 ms of one core).
Stored as raw uint8 the same crops take 9x more disk (147 KB a frame: GRID's 75k frames take 11 GB instead of
1.25 GB) and fall out of the page cache; ``codec="raw"`` (bare uint8 frames in a memory-mappable ``video.raw`` /
``parse.raw`` per item) is there for when disk is cheap and CPU is not.

:class:`marlin.data.datasets.PretrainDataset` turns the store into the items the pretraining trainer consumes:
``{"video": float32 [3, T, H, W] in [0, 1], "parse": uint8 [T, H, W], "index": int}`` (``"parse"`` absent when the
store has no parse maps). Masks are not made here: the DataLoader's collate draws them per batch
(:class:`marlin.data.collate.MaskCollator`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CODECS",
    "STORE_VERSION",
    "ClipStore",
    "FrameWriter",
    "StoreError",
    "StoreItem",
    "read_stream",
]

STORE_VERSION = 1
CODECS: dict[str, tuple[str, ...]] = {"video": ("jpeg", "raw"), "parse": ("zlib", "raw")}  # stream -> codecs
MANIFEST_FIELDS = (
    "id",
    "split",
    "group",
    "n_frames",
    "source_frames",
    "frame_step",
    "has_parse",
    "parse_missing",
    "faceless",
    "source",
)


class StoreError(ValueError):
    """A store folder that cannot be read; the message is one line and names the file."""


# ---- one stream of frames: write ------------------------------------------------------------------------------------
class FrameWriter:
    """Append frames of one stream (``"video"`` [S, S, 3] or ``"parse"`` [S, S] uint8) to an item folder.

    ``codec="jpeg"`` (video) or ``"zlib"`` (parse) append each encoded frame to ``<name>.bin`` and write the
    ``[T + 1]`` byte offsets to ``<name>.idx.npy`` on :meth:`close`; ``"raw"`` appends the bare uint8 frames to a
    memory-mappable ``<name>.raw`` (shape in ``meta.json``). Memory stays flat whatever the video length.
    """

    def __init__(
        self, folder: str | os.PathLike, name: str, codec: str, frame_shape: tuple[int, ...], *, quality: int = 95
    ) -> None:
        if name not in CODECS or codec not in CODECS[name]:
            raise ValueError(
                f"FrameWriter: expected stream 'video' or 'parse' with a codec in {CODECS}, found {name!r} / {codec!r}"
            )
        self.folder, self.name, self.codec = Path(folder), name, codec
        self.frame_shape = tuple(frame_shape)
        self.quality = int(quality)
        self.n = 0
        self._offsets = [0]
        self._file = open(self.folder / self._data_name, "wb")  # noqa: SIM115 - closed in close()

    @property
    def _data_name(self) -> str:
        return f"{self.name}.raw" if self.codec == "raw" else f"{self.name}.bin"

    def append(self, frame: np.ndarray) -> None:
        """Append one uint8 frame of ``frame_shape``."""
        if self._file is None:
            raise ValueError(f"{self.folder / self._data_name}: append after close")
        if frame.dtype != np.uint8 or frame.shape != self.frame_shape:
            raise ValueError(
                f"{self.folder / self._data_name}: frame {self.n} must be uint8 {self.frame_shape}, "
                f"found {frame.dtype} {frame.shape}"
            )
        data = (
            np.ascontiguousarray(frame).tobytes() if self.codec == "raw" else _encode(frame, self.codec, self.quality)
        )
        self._file.write(data)
        self._offsets.append(self._offsets[-1] + len(data))
        self.n += 1

    def close(self) -> dict[str, Any]:
        """Finish the files; return the stream's description for the item's ``meta.json``."""
        if self._file is not None:
            self._file.close()
            self._file = None
            if self.codec != "raw":  # raw frames have a fixed size: no index needed
                np.save(self.folder / f"{self.name}.idx.npy", np.asarray(self._offsets, dtype=np.int64))
        desc: dict[str, Any] = {"codec": self.codec, "file": self._data_name, "shape": [self.n, *self.frame_shape]}
        if self.codec != "raw":
            desc["index"] = f"{self.name}.idx.npy"
        return desc

    def abort(self) -> None:
        """Close the file without finishing it (the caller deletes the folder)."""
        if self._file is not None:
            self._file.close()
            self._file = None


def _encode(frame: np.ndarray, codec: str, quality: int) -> bytes:
    if codec == "jpeg":
        from PIL import Image

        buf = io.BytesIO()
        # 4:4:4 chroma: faces are small, and 4:2:0 on top of the source's 4:2:0 visibly bleeds lip and eye colour.
        Image.fromarray(frame).save(buf, format="JPEG", quality=quality, subsampling=0)
        return buf.getvalue()
    return zlib.compress(np.ascontiguousarray(frame).tobytes(), 6)


# ---- one stream of frames: read -------------------------------------------------------------------------------------
def read_stream(folder: str | os.PathLike, stream: dict[str, Any], frames: Sequence[int] | np.ndarray) -> np.ndarray:
    """Read frames ``frames`` (stored-frame indices, any order, repeats allowed) of one stream of an item folder.

    Args:
        folder: the item folder.
        stream: its description from ``meta.json`` (what :meth:`FrameWriter.close` returned).
        frames: indices in ``[0, n_frames)``.

    Returns:
        ``uint8 [len(frames), *frame_shape]``.
    """
    folder = Path(folder)
    shape = tuple(stream["shape"])
    idx = np.asarray(frames, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= shape[0]):
        raise IndexError(
            f"{folder / stream['file']}: frame indices must be in [0, {shape[0]}), found {idx.min()}..{idx.max()}"
        )
    if stream["codec"] == "raw":
        data = np.memmap(folder / stream["file"], dtype=np.uint8, mode="r", shape=shape)
        return np.asarray(data[idx])  # fancy indexing copies only these frames
    offsets = np.load(folder / stream["index"])  # [T + 1]
    out = np.empty((len(idx), *shape[1:]), dtype=np.uint8)
    if not idx.size:
        return out
    lo, hi = int(idx.min()), int(idx.max())
    with open(folder / stream["file"], "rb") as f:  # one read covering every requested frame
        f.seek(int(offsets[lo]))
        blob = f.read(int(offsets[hi + 1] - offsets[lo]))
    base = int(offsets[lo])
    decoded: dict[int, np.ndarray] = {}
    for k, i in enumerate(idx.tolist()):
        if i not in decoded:
            data = blob[offsets[i] - base : offsets[i + 1] - base]
            decoded[i] = _decode(data, stream["codec"], shape[1:], folder / stream["file"], i)
        out[k] = decoded[i]
    return out


def _decode(data: bytes, codec: str, frame_shape: tuple[int, ...], path: Path, index: int) -> np.ndarray:
    try:
        if codec == "jpeg":
            from PIL import Image

            with Image.open(io.BytesIO(data)) as im:
                arr = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
        elif codec == "zlib":
            arr = np.frombuffer(zlib.decompress(data), dtype=np.uint8).reshape(frame_shape)
        else:
            raise StoreError(f"{path}: unknown codec {codec!r}, expected one of {CODECS}")
    except (OSError, ValueError, zlib.error) as e:
        raise StoreError(f"{path}: frame {index} does not decode as {codec} ({e})") from e
    if arr.shape != frame_shape:
        raise StoreError(f"{path}: frame {index} decodes to {arr.shape}, expected {frame_shape}")
    return arr


# ---- the store -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoreItem:
    """One manifest row: a prepared video."""

    id: str
    split: str  # "train" or "val"
    group: str  # identity key the split was made by
    n_frames: int  # stored frames
    frame_step: int  # stored frame k is source frame k * frame_step
    has_parse: bool
    source: str = ""
    extra: dict[str, str] = field(default_factory=dict, compare=False)  # the other manifest columns, as text


class ClipStore:
    """Read access to a store written by ``marlin prepare``: its settings, items, and frames of any item.

    Only finished items are listed (those in ``manifest.csv``). Files are opened per read, so an instance can be
    shared with DataLoader worker processes.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        settings_path = self.root / "store.json"
        if not settings_path.is_file():
            raise StoreError(f"{settings_path}: not found; expected a store written by `marlin prepare`")
        try:
            self.settings: dict[str, Any] = json.loads(settings_path.read_text())
        except json.JSONDecodeError as e:
            raise StoreError(f"{settings_path}: not valid JSON ({e})") from e
        if self.settings.get("version") != STORE_VERSION:
            raise StoreError(
                f"{settings_path}: store format version {self.settings.get('version')!r}, expected {STORE_VERSION}"
            )
        manifest = self.root / "manifest.csv"
        if not manifest.is_file():
            raise StoreError(f"{manifest}: not found; run `marlin prepare` again with the same --out to finish it")
        self.items: list[StoreItem] = _read_store_manifest(manifest)
        self._meta: dict[str, dict[str, Any]] = {}

    # settings shortcuts
    @property
    def size(self) -> int:
        """Side of the square crops in pixels."""
        return int(self.settings["size"])

    @property
    def has_parse(self) -> bool:
        return bool(self.settings["parse"])

    def __len__(self) -> int:
        return len(self.items)

    def split(self, name: str | None) -> list[StoreItem]:
        """Items of one split (``"train"`` / ``"val"``), or all of them for ``None``."""
        return list(self.items) if name is None else [it for it in self.items if it.split == name]

    def item_dir(self, item: StoreItem | str) -> Path:
        return self.root / "items" / (item.id if isinstance(item, StoreItem) else item)

    def meta(self, item: StoreItem | str) -> dict[str, Any]:
        """The item's ``meta.json`` (cached per process)."""
        key = item.id if isinstance(item, StoreItem) else item
        if key not in self._meta:
            path = self.item_dir(key) / "meta.json"
            try:
                self._meta[key] = json.loads(path.read_text())
            except FileNotFoundError as e:
                raise StoreError(f"{path}: missing; the manifest lists an item that is not in the store") from e
        return self._meta[key]

    def read_video(self, item: StoreItem | str, frames: Sequence[int] | np.ndarray) -> np.ndarray:
        """``uint8 [len(frames), S, S, 3]`` RGB crops of the given stored frames."""
        return read_stream(self.item_dir(item), self.meta(item)["streams"]["video"], frames)

    def read_parse(self, item: StoreItem | str, frames: Sequence[int] | np.ndarray) -> np.ndarray:
        """``uint8 [len(frames), S, S]`` LaPa label maps of the given stored frames (all 0 where no face was found)."""
        streams = self.meta(item)["streams"]
        if "parse" not in streams:
            key = item.id if isinstance(item, StoreItem) else item
            raise StoreError(
                f"{self.item_dir(key) / 'meta.json'}: item has no parse maps (store built with --no-parse)"
            )
        return read_stream(self.item_dir(item), streams["parse"], frames)


def _read_store_manifest(path: Path) -> list[StoreItem]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"id", "split", "n_frames", "frame_step", "has_parse"} - set(reader.fieldnames or ())
        if missing:
            raise StoreError(f"{path}: expected columns {list(MANIFEST_FIELDS)}, missing {sorted(missing)}")
        items = []
        for row in reader:
            core = ("id", "split", "group", "n_frames", "frame_step", "has_parse", "source")
            items.append(
                StoreItem(
                    id=row["id"],
                    split=row["split"],
                    group=row.get("group", ""),
                    n_frames=int(row["n_frames"]),
                    frame_step=int(row["frame_step"]),
                    has_parse=row["has_parse"].lower() in ("1", "true", "yes"),
                    source=row.get("source", ""),
                    extra={k: v for k, v in row.items() if k not in core},
                )
            )
    return items
