"""Atomic file writes: every output marlin writes goes to a hidden temporary file in the target folder first and is
renamed into place only when complete, so a crash or `kill -9` never leaves a partial file under the real name
(at worst a hidden `.<name>.*.tmp` that the next run of the same command removes)."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def default_file_mode() -> int:
    """Permissions a plainly created file gets (0666 minus the umask); mkstemp alone would leave 0600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call `write(tmp_path)` to produce the file, then rename it over `path` (same folder, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.filename is None or str(e.filename) == tmp:  # name the file the user asked for, not our temporary
            e.filename = str(path)
        raise
    except RuntimeError as e:  # torch.save into a full disk: "[enforce fail at inline_container.cc] unexpected pos"
        Path(tmp).unlink(missing_ok=True)
        if _nearly_full(path.parent):
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from e
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _nearly_full(folder: Path, margin: int = 1 << 20) -> bool:
    """Whether the file system of `folder` has less than `margin` bytes free (after a failed write was removed)."""
    import shutil

    try:
        return shutil.disk_usage(folder).free < margin
    except OSError:
        return False


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            f.write(text)

    return atomic_write(path, write)


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` `obj` to `path` atomically, fsynced before the rename (checkpoints must survive a power cut)."""
    import torch

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy a file to `dst` through a temporary name in the target folder."""
    import shutil

    return atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def image_format(path: str | os.PathLike, where: str = "save") -> str:
    """PIL format name for the file suffix, or a one-line ValueError before anything is written."""
    from PIL import Image

    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{where}: expected an image suffix such as .png or .jpg, got {path.name!r}")
    return fmt


def atomic_save_image(path: str | os.PathLike, image: Any, where: str = "save", **save_kwargs: Any) -> Path:
    """Save a PIL image atomically, in the format its suffix names."""
    fmt = image_format(path, where)
    return atomic_write(path, lambda tmp: image.save(tmp, format=fmt, **save_kwargs))


def json_safe(obj: Any) -> Any:
    """A copy that ``json.dumps`` accepts and other tools can read: numpy scalars to Python numbers, NaN / inf to
    None (JSON has no NaN), paths to strings, tuples to lists."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "shape", None) == ():  # numpy / torch scalar
        obj = obj.item()
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj
