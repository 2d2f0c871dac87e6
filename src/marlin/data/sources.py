"""Finding the videos a command works on: files, folders (recursive), globs and CSV lists of paths.

One expansion for every command (`extract`, `crop`, `prepare`, pretraining on video folders), one list of video
suffixes (:data:`marlin.video.io.VIDEO_EXTENSIONS`) and one reader of path lists (:func:`read_path_csv`).
"""

from __future__ import annotations

import csv
import glob
import os
from collections.abc import Sequence
from pathlib import Path

from ..video.io import VIDEO_EXTENSIONS

__all__ = ["IMAGE_EXTENSIONS", "PATH_COLUMNS", "collect_inputs", "expand_video_sources", "read_path_csv"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")  # frame images (YouTube Faces layout)
PATH_COLUMNS = ("path", "video", "file", "filename")  # the column of a CSV list that holds the paths, first found


def read_path_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a CSV list of videos, each with ``"path"`` resolved (relative paths are relative to the CSV's
    folder); the other columns are kept as text. A CSV without a path column is a one-line ``ValueError``."""
    path = Path(path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or ())
        rows = list(reader)
    col = next((c for c in PATH_COLUMNS if c in fields), None)
    if col is None:
        raise ValueError(f"{path}: a list of videos needs a 'path' (or 'video') column, found {fields}")
    out = []
    for row in rows:
        p = Path(row[col]).expanduser()
        out.append({**row, "path": str(p if p.is_absolute() else path.parent / p)})
    return out


def _videos_in(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in VIDEO_EXTENSIONS)


def collect_inputs(specs: Sequence[str | os.PathLike], *, strict: bool = False) -> list[Path]:
    """Expand files, folders (recursive), globs and CSV lists (:func:`read_path_csv`) into video paths, in order and
    without duplicates.

    With ``strict=False`` (batch commands) a spec that matches nothing is kept as is, so that it is reported as a
    failed input rather than silently dropped; with ``strict=True`` it raises ``FileNotFoundError`` (missing path) or
    ``ValueError`` (a folder or glob without videos).
    """
    out: list[Path] = []
    for spec in map(str, specs):
        p = Path(spec).expanduser()
        if p.is_dir():
            found = _videos_in(p)
        elif p.suffix.lower() == ".csv" and p.is_file():
            found = [Path(r["path"]) for r in read_path_csv(p)]
        elif any(ch in spec for ch in "*?["):
            found = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
        elif p.exists() or not strict:
            found = [p]
        else:
            raise FileNotFoundError(f"{spec}: no such file or directory")
        if strict and not found:
            raise ValueError(f"{spec}: no video files found (extensions {', '.join(VIDEO_EXTENSIONS)})")
        out += found
    seen: set[Path] = set()
    return [p for p in out if not (p.resolve() in seen or seen.add(p.resolve()))]


def expand_video_sources(source: str) -> list[Path]:
    """Video files from a comma-separated list of folders, globs, files and CSV lists (strict: see
    :func:`collect_inputs`), as the pretraining config's ``data.source`` / ``val.source`` give them."""
    return collect_inputs([s.strip() for s in source.split(",") if s.strip()], strict=True)
