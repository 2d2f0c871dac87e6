"""Downloading released weights into a local cache (atomic, with progress, clear offline errors)."""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from .registry import get_entry

CACHE_ENV = "MARLIN_CACHE_DIR"  # where downloaded checkpoints live (default: ~/.cache/marlin)
URL_ENV = "MARLIN_URL_BASE"  # optional mirror: files are fetched from f"{base}/{name}.{encoder|full}.pt"


def cache_dir() -> Path:
    """The checkpoint cache: $MARLIN_CACHE_DIR, else $XDG_CACHE_HOME/marlin, else ~/.cache/marlin."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "marlin"


def release_url(name: str, full: bool = False) -> str:
    entry = get_entry(name)
    if not entry.downloadable:
        raise ValueError(f"model {name!r} has no released weights; downloadable: marlin_vit_{{small,base,large}}_ytf")
    base = os.environ.get(URL_ENV)
    if base:
        return f"{base.rstrip('/')}/{name}.{'full' if full else 'encoder'}.pt"
    return entry.url(full)


def download(url: str, dest: Path, *, progress: bool = True, timeout: float = 60.0) -> Path:
    """Fetch `url` to `dest` atomically (a partial download never takes the final name)."""
    from tqdm.auto import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                total = int(resp.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
                    while chunk := resp.read(1 << 20):
                        out.write(chunk)
                        bar.update(len(chunk))
            if total is not None and out.tell() != total:
                raise ConnectionError(f"{url}: download stopped at {out.tell()} of {total} bytes")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = f"HTTP {e.code} {e.reason}" if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", e)
        raise ConnectionError(
            f"could not download {url} ({reason}); if offline, fetch it elsewhere and place it at {dest}, "
            f"or load a local file with Marlin.from_file / marlin.load"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def fetch_release(name: str, full: bool = False, *, progress: bool = True) -> Path:
    """Path of the cached release file for `name`, downloading it once."""
    url = release_url(name, full)
    dest = cache_dir() / f"{name}.{'full' if full else 'encoder'}.pt"
    if dest.is_file():
        return dest
    return download(url, dest, progress=progress)


def clean_cache(verbose: bool = True) -> None:
    path = cache_dir()
    if path.exists():
        shutil.rmtree(path)
        if verbose:
            print(f"Marlin checkpoint cache {path} cleaned.")
