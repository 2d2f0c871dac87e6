"""Finding the videos a command works on: files, folders (recursive), globs and CSV lists of paths.

One expansion for every command (`extract`, `crop`, `prepare`, pretraining on video folders), one list of video
suffixes (:data:`marlin.video.io.VIDEO_EXTENSIONS`) and one reader of path lists (:func:`read_path_csv`).
"""

from __future__ import annotations

import csv
import errno
import glob
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from ..video.io import VIDEO_EXTENSIONS

__all__ = ["IMAGE_EXTENSIONS", "PATH_COLUMNS", "collect_inputs", "expand_video_sources", "list_files", "read_path_csv"]

log = logging.getLogger("marlin")

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


def _loops(path: Path) -> bool:
    """Whether ``path`` is a symlink loop (it can be neither read nor resolved; ``Path.resolve`` raises on it)."""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


def _skip_loop(path: Path) -> bool:
    if _loops(path):
        log.warning("%s: symlink loop (it points back to itself), skipped", path)
        return True
    return False


def list_files(folder: str | os.PathLike) -> list[Path]:
    """Every entry below ``folder`` that is not a folder, sorted: files, and links that lead nowhere (a dangling
    ``clip.mp4`` is an input the user meant, so it is listed and then reported as failed, not dropped).

    Symlinked folders are not followed (a link to a parent would recurse forever). What cannot be used at all is
    skipped with a warning naming it, never silently: a folder that cannot be listed (no permission), a symlink loop.
    """

    def unreadable(err: OSError) -> None:
        log.warning("%s: cannot list this folder (%s); the files in it are skipped", err.filename, err.strerror)

    out = []
    for parent, _dirs, files in os.walk(folder, onerror=unreadable):
        out += [Path(parent) / name for name in files if not _skip_loop(Path(parent) / name)]
    return sorted(out)


def _videos_in(folder: Path) -> list[Path]:
    return [f for f in list_files(folder) if f.suffix.lower() in VIDEO_EXTENSIONS]


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
    out = [p for p in out if not _skip_loop(p)]  # a loop cannot be read, nor resolved for the duplicate check
    return [p for p in out if not (p.resolve() in seen or seen.add(p.resolve()))]


def expand_video_sources(source: str) -> list[Path]:
    """Video files from a comma-separated list of folders, globs, files and CSV lists (strict: see
    :func:`collect_inputs`), as the pretraining config's ``data.source`` / ``val.source`` give them."""
    return collect_inputs([s.strip() for s in source.split(",") if s.strip()], strict=True)
