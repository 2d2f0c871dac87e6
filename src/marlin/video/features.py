"""Reading `marlin extract` outputs: a mapping from input to features, a quick matrix, a torch Dataset.

    import marlin
    feats = marlin.open_features("out/")            # an extraction folder, or its --combined .npz / .safetensors
    x = feats["videos/a.mp4"]                        # np.ndarray as written, memory-mapped and read on access
    keys, X = feats.stack("mean")                    # [N, D] float32, one row per key
    loader = DataLoader(feats.as_dataset(labels), batch_size=32)

Keys. An extraction folder is keyed by the ``input`` column of its ``index.csv`` (the path as `marlin extract` was
given it). The face tracks of an ``--all-faces`` input are separate entries ``"<input>#face<K>"`` (``row.keys`` lists
an input's keys, so nothing needs parsing). A combined file, or a folder of ``.npy`` files without ``index.csv``, has
no input paths: it is keyed by the output path relative to the extraction folder without ``.npy`` (``"sub/clip"``,
``"two.face0"``), the keys ``--combined`` writes, in the file's order (sorted for a .safetensors or a folder).

Which inputs. Rows whose status is in ``status`` (default ``ok`` and ``skipped``, i.e. done by this run or an earlier
one) are the keys; ``.failed`` lists the ``failed`` / ``no_face`` rows, ``.rows`` every row (``pending``: a killed run
never reached it). Outputs are found under the folder even after it moved or when ``-o`` was relative.

Arrays are as written: ``[D]`` (``--reduction mean/max``), ``[W, D]`` (one feature per window) or ``[W, N, D]``
(``--keep-seq``). Opening reads ``index.csv`` (one ``stat`` per output, so a missing file fails at once) or a combined
file's headers, never the features; ``mmap=True`` maps them read-only (``.npy`` files and the uncompressed members of
an ``.npz`` / a ``.safetensors`` alike), ``mmap=False`` reads them into memory.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import struct
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, BinaryIO

import numpy as np
import torch
from torch.utils.data import Dataset

from ..utils.errors import one_line
from .extract import OUTPUT_SEP

__all__ = [
    "FAILED",
    "HAS_FEATURES",
    "REDUCTIONS",
    "FeatureDataset",
    "FeatureRow",
    "FeatureSet",
    "load_npy",
    "open_features",
    "read_index",
    "reduce_features",
]

HAS_FEATURES = ("ok", "skipped")  # the statuses whose rows have feature files
FAILED = ("failed", "no_face")
REDUCTIONS = ("mean", "max", "concat", "none")
_FACE = re.compile(r"\.face(\d+)$")  # the stem of one --all-faces track file: clip.face0
_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
                       "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}  # fmt: skip


# ---- index.csv ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeatureRow:
    """One line of ``index.csv``: an input, what became of it, and where its features are now."""

    input: str
    status: str  # ok; skipped (done by an earlier run); failed; no_face; pending (a killed run never reached it)
    output: str = ""  # as written: the output file, or the --all-faces track files joined by OUTPUT_SEP
    windows: int = 0
    frames: int = 0
    faceless_frames: int = 0
    seconds: float = 0.0
    track: str = ""  # the face-track numbers of an --all-faces input ("0,1")
    error: str = ""
    files: tuple[Path, ...] = ()  # the feature files found (ok / skipped rows): one, or one per face track
    keys: tuple[str, ...] = ()  # their keys in a FeatureSet, aligned with `files`: (input,) or (input#face0, ...)
    missing: tuple[str, ...] = ()  # outputs of an ok / skipped row that are not on disk


def read_index(path: str | os.PathLike) -> list[FeatureRow]:
    """The rows of an ``index.csv`` (or of the one in folder `path`), their feature files located under its folder.

    Columns an older index lacks default to empty / 0. A malformed index raises ValueError naming it and the line.
    """
    index = Path(path)
    index = index / "index.csv" if index.is_dir() else index
    folder = index.parent
    root = folder.resolve()
    try:
        with open(index, newline="") as f:
            reader = csv.DictReader(f)
            if "input" not in (reader.fieldnames or []):
                raise ValueError(f"{index}: not a `marlin extract` index (no 'input' column)")
            return [_row(r, folder, root, f"{index} line {reader.line_num}") for r in reader if r.get("input")]
    except (csv.Error, UnicodeDecodeError) as e:
        raise ValueError(f"{index}: unreadable index ({one_line(e)}); rerun `marlin extract` to rewrite it") from None


def _row(raw: dict[str, str], folder: Path, root: Path, where: str) -> FeatureRow:
    def number(name: str, kind: type) -> Any:
        value = raw.get(name) or ""
        try:
            return kind(float(value)) if value else kind(0)
        except (ValueError, OverflowError):
            raise ValueError(f"{where}: {name} {value!r} is not a number") from None

    status, output, track = raw.get("status") or "", raw.get("output") or "", raw.get("track") or ""
    files: list[Path] = []
    missing: list[str] = []
    faces = bool(track) or OUTPUT_SEP in output
    if status in HAS_FEATURES:
        files, missing, found_tracks = _locate_outputs(output, folder, root)
        faces = faces or found_tracks
    keys = [_key(raw["input"], f, i) if faces else raw["input"] for i, f in enumerate(files)]
    return FeatureRow(
        input=raw["input"], status=status, output=output, windows=number("windows", int), frames=number("frames", int),
        faceless_frames=number("faceless_frames", int), seconds=number("seconds", float), track=track,
        error=raw.get("error") or "", files=tuple(files), keys=tuple(keys), missing=tuple(missing),
    )  # fmt: skip


def _key(input_: str, file: Path, position: int) -> str:
    """The key of one face-track file of an --all-faces input: ``<input>#face<K>`` with K from ``name.faceK.npy``."""
    m = _FACE.search(file.stem)
    return f"{input_}#face{m.group(1) if m else position}"


def _locate_outputs(output: str, folder: Path, root: Path) -> tuple[list[Path], list[str], bool]:
    """(found files, missing outputs, whether face-track files were found in place of the one output) of one row.

    A skipped --all-faces row names its planned ``x.npy``; its track files ``x.faceK.npy`` are found beside it, the
    way `marlin extract` itself tells the input is done.
    """
    names = [n for n in output.split(OUTPUT_SEP) if n] if output else []
    if not names:
        return [], ["(index.csv names no output)"], False
    found = [_locate(n, folder, root) for n in names]
    if len(names) == 1 and found[0] is None:
        planned = _locate(names[0], folder, root, exists=lambda p: bool(_track_files(p)))
        if planned is not None:
            return _track_files(planned), [], True
    return [f for f in found if f is not None], [n for n, f in zip(names, found, strict=True) if f is None], False


def _track_files(planned: Path) -> list[Path]:
    """The face-track files ``<stem>.face<K>.npy`` beside a planned output, in track order."""
    if not planned.parent.is_dir():
        return []
    pattern = re.compile(re.escape(planned.stem) + r"\.face(\d+)")
    hits = [(m, f) for f in planned.parent.glob(f"{glob.escape(planned.stem)}.face*.npy")
            if (m := pattern.fullmatch(f.stem))]  # fmt: skip
    return [f for m, f in sorted(hits, key=lambda h: int(h[0].group(1)))]


def _locate(
    name: str, folder: Path, root: Path, exists: Callable[[Path], bool] = Path.is_file
) -> Path | None:  # fmt: skip
    """Where an output named in ``index.csv`` is now, always under `folder`: the output relative to the folder it was
    written to, or else the longest tail of its path under `folder` (the folder moved, or ``-o`` was relative)."""
    p = PurePath(name)
    if p.is_absolute():
        try:
            quick = folder / p.relative_to(root)
        except ValueError:
            pass
        else:
            if exists(quick):
                return quick
    parts = p.parts[1:] if p.anchor else p.parts
    for i in range(len(parts)):
        candidate = folder.joinpath(*parts[i:])
        if exists(candidate):
            return candidate
    return None


# ---- files ----------------------------------------------------------------------------------------------------------
def _missing(path: str | os.PathLike) -> FileNotFoundError:
    return FileNotFoundError(f"{path}: feature file missing; rerun `marlin extract` with the same -o")


def _corrupt(path: str | os.PathLike, err: BaseException) -> ValueError:
    return ValueError(f"{path}: not a readable .npy ({one_line(err)}); delete it and rerun `marlin extract`")


def _unreadable(path: Path, key: str, err: BaseException) -> ValueError:
    return ValueError(f"{path}: {key} cannot be read ({one_line(err)}); write the combined file again")


def load_npy(path: str | os.PathLike, mmap: bool = True) -> np.ndarray:
    """One feature file, memory-mapped read-only (`mmap`) or read; raises one line naming it when missing / corrupt."""
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise _missing(path) from None
    except (ValueError, OSError, EOFError) as e:
        raise _corrupt(path, e) from None
    if not isinstance(arr, np.ndarray):
        arr.close()
        raise ValueError(f"{path}: an .npz archive, not a .npy feature file")
    return arr


def _npy_header(f: BinaryIO, where: str | os.PathLike) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) from the header of a .npy stream; the stream is left at the array data."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except (ValueError, OSError, EOFError) as e:
        raise _corrupt(where, e) from None
    if dtype.hasobject:
        raise ValueError(f"{where}: holds Python objects, not features")
    return tuple(shape), bool(fortran), dtype


@dataclass(frozen=True)
class _Entry:
    """Where one array lives: a .npy file, raw bytes at an offset of a combined file, or a compressed .npz member."""

    file: Path
    kind: str = "npy"  # npy, raw (an uncompressed .npz member or a .safetensors tensor), zip (compressed member)
    offset: int = 0  # raw: byte offset of the data
    shape: tuple[int, ...] | None = None  # known at open time for combined files
    dtype: np.dtype | None = None
    fortran: bool = False
    member: str = ""  # zip: the member name


def _read_raw(e: _Entry, key: str, mmap: bool) -> np.ndarray:
    """An array stored as raw bytes in a combined file: memory-mapped, or read with one seek."""
    assert e.shape is not None and e.dtype is not None
    order = "F" if e.fortran else "C"
    count = int(np.prod(e.shape))
    try:
        if count == 0:
            return np.empty(e.shape, e.dtype, order=order)
        if mmap:
            return np.memmap(e.file, dtype=e.dtype, mode="r", offset=e.offset, shape=e.shape, order=order)
        arr = np.fromfile(e.file, dtype=e.dtype, count=count, offset=e.offset)
        if arr.size != count:
            raise ValueError(f"{count} values expected, {arr.size} found")
        return arr.reshape(e.shape, order=order)
    except (ValueError, OSError) as err:
        raise _unreadable(e.file, key, err) from None


def _npz_entries(path: Path) -> dict[str, _Entry]:
    """The arrays of an .npz by key, from the headers only (np.savez stores members uncompressed: memory-mappable)."""
    entries: dict[str, _Entry] = {}
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z, open(path, "rb") as raw:
            for info in z.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                key = info.filename[: -len(".npy")]
                where = f"{path}:{key}"
                if info.compress_type != zipfile.ZIP_STORED:
                    with z.open(info) as member:
                        shape, fortran, dtype = _npy_header(member, where)  # type: ignore[arg-type]
                    entries[key] = _Entry(path, "zip", 0, shape, dtype, fortran, info.filename)
                    continue
                raw.seek(info.header_offset)
                local = raw.read(30)
                if local[:4] != b"PK\x03\x04":
                    raise ValueError(f"bad local header for {info.filename}")
                n_name, n_extra = struct.unpack("<HH", local[26:30])
                raw.seek(info.header_offset + 30 + n_name + n_extra)
                shape, fortran, dtype = _npy_header(raw, where)
                entries[key] = _Entry(path, "raw", raw.tell(), shape, dtype, fortran)
                if raw.tell() + int(np.prod(shape)) * dtype.itemsize > size:
                    raise ValueError(f"{key} runs past the end of the file")
    except (zipfile.BadZipFile, ValueError, EOFError, struct.error) as e:
        raise ValueError(f"{path}: not a readable .npz ({one_line(e)}); write the combined file again") from None
    return entries


def _safetensors_entries(path: Path) -> dict[str, _Entry]:
    """The tensors of a .safetensors by key, from its JSON header (8-byte length, header, then the raw data)."""
    size = path.stat().st_size
    bad = f"{path}: not a readable .safetensors"
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise ValueError(f"{bad} (bad header length); write the combined file again")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{bad} ({one_line(e)}); write the combined file again") from None
    entries: dict[str, _Entry] = {}
    if not isinstance(header, dict):
        raise ValueError(f"{bad} (the header is not a JSON object); write the combined file again")
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            code, (begin, end), shape = info["dtype"], info["data_offsets"], tuple(int(s) for s in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{bad} (bad header entry {key!r}); write the combined file again") from None
        if code not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: {key} is {code}, which numpy cannot hold; save float32 features")
        dtype = np.dtype(_SAFETENSORS_DTYPES[code])
        if end - begin != int(np.prod(shape)) * dtype.itemsize or 8 + n + end > size:
            raise ValueError(f"{bad} ({key} runs past the end of the file); write the combined file again")
        entries[key] = _Entry(path, "raw", 8 + n + begin, shape, dtype)
    return dict(sorted(entries.items()))


def _folder_entries(folder: Path) -> dict[str, _Entry]:
    """A folder of .npy files without ``index.csv``: keyed by path relative to it without ``.npy``, like --combined."""
    files = sorted(f for f in folder.rglob("*.npy") if not any(p.startswith(".") for p in f.relative_to(folder).parts))
    if not files:
        raise ValueError(f"{folder}: no index.csv and no .npy files; not a `marlin extract` output folder")
    return {str(f.relative_to(folder).with_suffix("")): _Entry(f) for f in files}


# ---- reductions -----------------------------------------------------------------------------------------------------
def reduce_features(x: np.ndarray, reduction: str, where: str = "features") -> np.ndarray:
    """One input's features as float32: ``none`` as stored; ``mean`` / ``max`` over windows -> ``[D]``; ``concat``
    the windows in order -> ``[W * D]``. ``[W, N, D]`` (--keep-seq) tokens are averaged first; ``[D]`` stays."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, found {reduction!r}")
    x = np.asarray(x, dtype=np.float32)
    if reduction == "none":
        return x
    if x.ndim == 3:
        x = x.mean(1)  # [W, N, D] -> [W, D]
    if x.ndim == 1:
        if reduction == "concat":
            return x
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"{where}: expected [D], [W, D] or [W, N, D] features, found shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{where}: no windows (the video is shorter than one clip?)")
    if reduction == "mean":
        return x.mean(0)
    if reduction == "max":
        return x.max(0)
    return x.reshape(-1)


# ---- the feature set ------------------------------------------------------------------------------------------------
class FeatureSet(Mapping[str, np.ndarray]):
    """A read-only mapping key -> features of one extraction (see the module docstring for keys and statuses).

    Arrays are read on access (memory-mapped when `mmap`), never cached; the set pickles (DataLoader workers).
    """

    def __init__(self, source: Path, entries: dict[str, _Entry], rows: Iterable[FeatureRow], mmap: bool) -> None:
        self.source = source
        self.rows: tuple[FeatureRow, ...] = tuple(rows)
        self.mmap = mmap
        self._entries = entries
        self._input = {k: r.input for r in self.rows for k in r.keys}
        self._zip: zipfile.ZipFile | None = None  # opened on the first compressed .npz member read

    @property
    def failed(self) -> tuple[FeatureRow, ...]:
        """The rows of inputs that gave no features (``failed``, ``no_face``), with their ``error``."""
        return tuple(r for r in self.rows if r.status in FAILED)

    def __getitem__(self, key: str) -> np.ndarray:
        return self._read(key, self.mmap)

    def _read(self, key: str, mmap: bool) -> np.ndarray:
        e = self._entries[key]
        if e.kind == "npy":
            return load_npy(e.file, mmap)
        if e.kind == "raw":
            return _read_raw(e, key, mmap)
        try:
            if self._zip is None:
                self._zip = zipfile.ZipFile(e.file)
            with self._zip.open(e.member) as member:
                return np.lib.format.read_array(member, allow_pickle=False)  # type: ignore[arg-type]
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
            raise _unreadable(e.file, key, err) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    __eq__ = object.__eq__  # Mapping's would read every array
    __hash__ = object.__hash__

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_zip": None}

    def __repr__(self) -> str:
        return f"FeatureSet({str(self.source)!r}: {len(self)} features, {len(self.failed)} failed)"

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of one array, from its header only (nothing is read or mapped)."""
        e = self._entries[key]
        if e.shape is not None:
            return e.shape
        try:
            with open(e.file, "rb") as f:
                return _npy_header(f, e.file)[0]
        except FileNotFoundError:
            raise _missing(e.file) from None

    def stack(self, reduction: str = "mean") -> tuple[list[str], np.ndarray]:
        """(keys, ``[N, ...]`` float32): every array reduced over its windows (:func:`reduce_features`), stacked.

        ``mean`` / ``max`` give ``[N, D]`` for any number of windows; ``concat`` / ``none`` need the same shape
        everywhere (raises naming two keys that differ). Arrays are read, not mapped: twice as fast for small files.
        """
        keys = list(self._entries)
        if not keys:
            raise ValueError(f"{self.source}: no features to stack")
        vecs = [reduce_features(self._read(k, False), reduction, f"{self.source}: {k}") for k in keys]
        for k, v in zip(keys, vecs, strict=True):
            if v.shape != vecs[0].shape:
                raise ValueError(f"{self.source}: shapes differ after {reduction!r} reduction ({keys[0]}: "
                                 f"{vecs[0].shape}, {k}: {v.shape}); use mean or max")  # fmt: skip
        return keys, np.stack(vecs)

    def as_dataset(self, labels: Any = None, transform: Callable[[torch.Tensor], Any] | None = None) -> FeatureDataset:
        """A torch Dataset over the keys in order: ``(features, key)`` items, or ``(features, label)`` with `labels`.

        `labels` is a mapping key -> label (an ``--all-faces`` track falls back to its input's label) or a sequence
        with one label per key in order. Features are float32 tensors copied out of the map, then ``transform(x)``
        (e.g. ``lambda x: x.mean(0)`` to batch videos with different numbers of windows).
        """
        keys = list(self._entries)
        return FeatureDataset(self, keys, None if labels is None else self._labels_for(keys, labels), transform)

    def _labels_for(self, keys: list[str], labels: Any) -> list[Any]:
        if isinstance(labels, Mapping):
            out, missing = [], []
            for k in keys:
                key = k if k in labels else self._input.get(k, k)
                if key in labels:
                    out.append(labels[key])
                else:
                    missing.append(k)
            if missing:
                raise ValueError(f"labels: none for {len(missing)} of {len(keys)} features of {self.source}, "
                                 f"e.g. {missing[0]}")  # fmt: skip
            return out
        out = list(labels)
        if len(out) != len(keys):
            raise ValueError(f"labels: {len(out)} given for {len(keys)} features of {self.source}; pass one per key "
                             "in order, or a mapping key -> label")  # fmt: skip
        return out


class FeatureDataset(Dataset):
    """``(features, key)`` or ``(features, label)`` items of a :class:`FeatureSet` (:meth:`FeatureSet.as_dataset`)."""

    def __init__(self, features: FeatureSet, keys: list[str], labels: list[Any] | None,
                 transform: Callable[[torch.Tensor], Any] | None) -> None:  # fmt: skip
        self.features, self.keys, self.labels, self.transform = features, keys, labels, transform

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        key = self.keys[i]
        x: Any = torch.from_numpy(np.array(self.features[key], dtype=np.float32))  # a writable copy of the map
        if self.transform is not None:
            x = self.transform(x)
        return x, key if self.labels is None else self.labels[i]


# ---- opening --------------------------------------------------------------------------------------------------------
def open_features(
    path: str | os.PathLike, *, status: str | Iterable[str] = HAS_FEATURES, mmap: bool = True
) -> FeatureSet:  # fmt: skip
    """Open an extraction folder (``index.csv``-backed, or bare ``.npy`` files), an index file in one (``index.csv``
    or a shard's ``index.shardI-of-N.csv``) or a combined ``.npz`` / ``.safetensors`` as a :class:`FeatureSet`.

    `status` picks the rows that become keys (``ok`` and / or ``skipped``); `mmap` maps arrays instead of reading
    them. Errors are one line naming the path and what to do (ValueError; FileNotFoundError for missing files).
    """
    path = Path(path)
    wanted = (status,) if isinstance(status, str) else tuple(status)
    for s in wanted:
        if s not in HAS_FEATURES:
            raise ValueError(f"status: only {' and '.join(HAS_FEATURES)} rows have features, not {s!r}")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such extraction folder or combined features file")
    if path.is_dir():
        if (path / "index.csv").is_file():
            return _open_index(path / "index.csv", wanted, mmap)
        shards = sorted(path.glob("index.shard*-of-*.csv"))
        if shards:
            raise ValueError(f"{path}: shard indexes ({shards[0].name}, ...) but no index.csv; merge them with "
                             "`marlin extract --merge`, or open one shard's index file")  # fmt: skip
        return FeatureSet(path, _folder_entries(path), (), mmap)
    if path.suffix == ".csv":
        return _open_index(path, wanted, mmap)
    if path.suffix == ".npz":
        entries = _npz_entries(path)
    elif path.suffix == ".safetensors":
        entries = _safetensors_entries(path)
    else:
        raise ValueError(f"{path}: expected a `marlin extract` output folder, its index .csv or a combined .npz / "
                         ".safetensors")  # fmt: skip
    return FeatureSet(path, entries, (), mmap)


def _open_index(index: Path, wanted: tuple[str, ...], mmap: bool) -> FeatureSet:
    rows = read_index(index)
    entries: dict[str, _Entry] = {}
    for row in rows:
        if row.status not in wanted:
            continue
        if row.missing:
            raise FileNotFoundError(f"{index}: the features of {row.input} ({row.missing[0]}) are missing; rerun "
                                    "`marlin extract` with the same inputs and -o to redo them")  # fmt: skip
        for key, file in zip(row.keys, row.files, strict=True):
            entries[key] = _Entry(file)
    return FeatureSet(index.parent, entries, rows, mmap)
