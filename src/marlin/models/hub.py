"""Where weights come from besides local files: the GitHub release cache, and the Hugging Face Hub.

GitHub releases (`Marlin.from_online`): downloaded once into marlin's own cache (atomic, with progress, clear
offline errors).

Hugging Face Hub (`marlin.load("hf://OWNER/NAME[/FILE][@REVISION]")`, `Marlin.from_pretrained`, `push_to_hub`;
needs the `[hub]` extra): files go through `huggingface_hub` and its own cache (shared with transformers), pinned to
one commit per load. Two repository layouts are read:
- marlin's own `save_pretrained` folder: `config.json` (a `MarlinConfig`) + `model.safetensors` (official keys);
- the official `ControlNet/marlin_vit_{small,base,large}_ytf` repositories, written by a transformers remote-code
  wrapper (`MarlinModel`): a transformers `config.json` (`model_type: "marlin"`, `n_frames`, `encoder_embed_dim`, ...)
  and an encoder-only `model.safetensors` whose keys carry a `marlin.` prefix. Their config is translated field by
  field; their `.py` files are never downloaded or run.
`HF_ENDPOINT`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE` and `HF_TOKEN` are read when a call is made (not at import), so a
mirror, a cache or offline mode set in a running process take effect.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import checkpoint as ckpt_io
from .config import MarlinConfig
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


# ---- Hugging Face Hub -----------------------------------------------------------------------------------------------
HF_PREFIX = "hf://"
HUB_INSTALL = "pip install 'marlin[hub]'"
DEFAULT_ENDPOINT = "https://huggingface.co"
HUB_WEIGHT_FILES = (ckpt_io.WEIGHTS_FILE, "pytorch_model.bin")  # tried in this order in a repository without FILE


@dataclass(frozen=True)
class HubRef:
    """A model on the Hub: repository, optional file inside it (a repository of `.pt` files), optional revision
    (branch, tag or commit)."""

    repo_id: str
    filename: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        file = f"/{self.filename}" if self.filename else ""
        rev = f"@{self.revision}" if self.revision else ""
        return f"{HF_PREFIX}{self.repo_id}{file}{rev}"


@dataclass(frozen=True)
class HubOptions:
    """How to reach the Hub; None fields fall back to the environment at call time (HF_ENDPOINT, HF_HUB_CACHE,
    HF_HUB_OFFLINE, HF_TOKEN / the saved login)."""

    endpoint: str | None = None
    cache_dir: str | os.PathLike | None = None
    token: str | bool | None = None
    local_files_only: bool = False

    @property
    def url(self) -> str:
        return (self.endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")

    @property
    def cache(self) -> str | None:
        value = self.cache_dir or os.environ.get("HF_HUB_CACHE")
        return str(Path(value).expanduser()) if value else None

    @property
    def offline(self) -> bool:
        env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
        return self.local_files_only or env in ("1", "true", "yes", "on")


class _MissingFile(Exception):
    """The repository (at that revision) has no such file: the caller may try another name."""


def is_hf_spec(spec: object) -> bool:
    return isinstance(spec, str) and spec.startswith(HF_PREFIX)


def parse_hf_spec(spec: str, revision: str | None = None, filename: str | None = None) -> HubRef:
    """``[hf://]OWNER/NAME[/FILE][@REVISION]`` -> HubRef; `revision` / `filename` arguments fill (and must not
    contradict) the parts the string gives."""
    body = spec[len(HF_PREFIX) :] if spec.startswith(HF_PREFIX) else spec
    body, at, rev = body.partition("@")
    parts = body.split("/")
    names_ok = len(parts) >= 2 and all(re.fullmatch(r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?", p) for p in parts[:2])
    if not names_ok or not all(parts) or (at and not rev):
        raise ValueError(
            f"{spec!r}: not an existing path, and not a Hub model: expected [hf://]OWNER/NAME[/FILE][@REVISION], "
            "e.g. hf://ControlNet/marlin_vit_base_ytf"
        )
    file = "/".join(parts[2:]) or None
    for what, given, found in (("revision", revision, rev or None), ("filename", filename, file)):
        if given is not None and found is not None and given != found:
            raise ValueError(f"{spec!r}: {what}={given!r} contradicts the {what} {found!r} in the name")
    return HubRef("/".join(parts[:2]), filename or file, revision or rev or None)


def _hf() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError(f"the Hugging Face Hub needs the huggingface_hub package: {HUB_INSTALL}") from None
    return huggingface_hub


def _hub_cache_location(opts: HubOptions) -> str:
    if opts.cache:
        return opts.cache
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except (ImportError, AttributeError):
        return "the Hugging Face cache"


def _offline_error(ref: HubRef, what: str, opts: HubOptions) -> ConnectionError:
    why = "HF_HUB_OFFLINE / local_files_only is set" if opts.offline else f"{opts.url} could not be reached"
    return ConnectionError(
        f"{ref}: {what} is not in the hub cache ({_hub_cache_location(opts)}) and {why}; load it once online (it is "
        f"then cached and loads offline, also with HF_HUB_OFFLINE=1), set HF_ENDPOINT to a reachable mirror, or "
        f"pass a local save_pretrained directory"
    )


def _download(ref: HubRef, filename: str, revision: str | None, opts: HubOptions) -> Path:
    """One file through `hf_hub_download` (the hub's cache, resumable), hub errors turned into one-line
    ValueError (wrong name / revision) or OSError (network, server, permissions); a missing file raises _MissingFile."""
    hf = _hf()
    from huggingface_hub.utils import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return Path(
            hf.hf_hub_download(
                ref.repo_id, filename, revision=revision, cache_dir=opts.cache, endpoint=opts.url,
                token=opts.token, local_files_only=opts.offline,
            )
        )  # fmt: skip
    except LocalEntryNotFoundError:
        raise _offline_error(ref, filename, opts) from None
    except EntryNotFoundError:
        raise _MissingFile(filename) from None
    except RevisionNotFoundError:
        raise ValueError(f"{ref}: no revision {revision!r} in {ref.repo_id} on {opts.url}") from None
    except RepositoryNotFoundError:
        raise ValueError(
            f"{ref}: repository {ref.repo_id} not found on {opts.url} (check the name; a private or gated one "
            "needs a token: `hf auth login` or HF_TOKEN)"
        ) from None
    except HfHubHTTPError as e:
        raise OSError(f"{ref}: {opts.url} refused {filename}: {_first_line(e)}") from None
    except Exception as e:  # a proxy / transport failure the client does not turn into "not cached"
        if not _is_network_error(e):
            raise
        raise ConnectionError(f"{ref}: {opts.url} could not be reached ({_first_line(e)})") from None


def _is_network_error(e: BaseException) -> bool:
    """A connection / timeout / proxy failure of whichever HTTP client huggingface_hub uses (httpx or requests)."""
    root = type(e).__module__.split(".")[0]
    return isinstance(e, ConnectionError | TimeoutError) or root in (
        "httpx",
        "httpx2",
        "httpcore",
        "requests",
        "urllib3",
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _snapshot_commit(path: Path) -> str | None:
    """The commit a file downloaded into the hub cache belongs to (`.../snapshots/<commit>/<file>`), so the
    other files of a load are fetched from the very same commit."""
    folder = path.parent
    if folder.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", folder.name):
        return folder.name
    return None


def config_from_hub_json(d: dict, name: str, where: str) -> MarlinConfig:
    """A MarlinConfig from a repository's `config.json`: marlin's own, or the transformers config of the official
    repositories (`model_type: "marlin"`, the marlin-pytorch constructor's argument names)."""
    if not isinstance(d, dict):
        raise ckpt_io.CheckpointError(f"{where}: config.json is not a JSON object")
    if d.get("model_type") == "marlin" or "n_frames" in d:
        from .model import _OFFICIAL_ARGS, _OFFICIAL_NEUTRAL, _config_from_official_kwargs

        kwargs = {k: v for k, v in d.items() if k in _OFFICIAL_ARGS or (k in _OFFICIAL_NEUTRAL and v is not None)}
        missing = sorted({"encoder_embed_dim", "encoder_depth", "encoder_num_heads"} - set(kwargs))
        if missing:
            raise ckpt_io.CheckpointError(f"{where}: transformers MARLIN config without {missing}")
        try:
            return _config_from_official_kwargs(MarlinConfig(name=name), kwargs)
        except (ValueError, TypeError) as e:
            raise ckpt_io.CheckpointError(f"{where}: {_first_line(e)}") from None
    try:
        return MarlinConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        kind = f" (model_type {d['model_type']!r})" if "model_type" in d else ""
        raise ckpt_io.CheckpointError(f"{where}: not a MARLIN config.json{kind}: {_first_line(e)}") from None


def _read_repo(ref: HubRef, opts: HubOptions) -> ckpt_io.Checkpoint:
    """config.json (if any) then the weights of the same commit, read into a Checkpoint with its config."""
    try:
        cfg_path: Path | None = _download(ref, ckpt_io.CONFIG_FILE, ref.revision, opts)
    except _MissingFile:
        cfg_path = None  # weights alone: the variant is inferred from the tensor shapes
    commit = _snapshot_commit(cfg_path) if cfg_path else None
    for weights_name in HUB_WEIGHT_FILES:
        try:
            weights = _download(ref, weights_name, commit or ref.revision, opts)
            break
        except _MissingFile:
            continue
    else:
        raise ValueError(
            f"{ref}: the repository has no {' or '.join(HUB_WEIGHT_FILES)}; for a repository of checkpoint files "
            f"name the file: hf://{ref.repo_id}/FILE.pt"
        )
    ckpt = ckpt_io.read_checkpoint(weights)
    if cfg_path is not None:
        try:
            d = json.loads(cfg_path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ckpt_io.CheckpointError(f"{ref}: config.json is not valid JSON ({_first_line(e)})") from None
        ckpt.config = config_from_hub_json(d, ref.repo_id.split("/")[-1], f"{ref} config.json")
    commit = commit or _snapshot_commit(weights)
    ckpt.path = str(HubRef(ref.repo_id, None, commit or ref.revision))
    return ckpt


def read_hub_checkpoint(
    spec: str, *, revision: str | None = None, filename: str | None = None, options: HubOptions | None = None
) -> ckpt_io.Checkpoint:
    """Download (once, into the hub cache) and read the weights `spec` names: ``[hf://]OWNER/NAME[/FILE][@REV]``.

    Without FILE the repository is read as a `save_pretrained` folder or an official transformers-wrapper
    repository; with FILE that one checkpoint file (any format `read_checkpoint` knows). The checkpoint's `path` is
    ``hf://OWNER/NAME@<commit>``: the exact commit loaded.
    """
    ref = parse_hf_spec(spec, revision, filename)
    opts = options or HubOptions()
    if ref.filename is None:
        return _read_repo(ref, opts)
    try:
        path = _download(ref, ref.filename, ref.revision, opts)
    except _MissingFile:
        raise ValueError(f"{ref}: no file {ref.filename!r} in {ref.repo_id}") from None
    ckpt = ckpt_io.read_checkpoint(path)
    ckpt.path = str(HubRef(ref.repo_id, ref.filename, _snapshot_commit(path) or ref.revision))
    return ckpt


def model_card(config: MarlinConfig, repo_id: str) -> str:
    """A short README.md for a pushed model: what it is and how to load it."""
    c = config
    return (
        "---\ntags:\n- marlin\n- video\n- face\n- feature-extraction\npipeline_tag: feature-extraction\n---\n\n"
        f"# {repo_id.split('/')[-1]}\n\n"
        f"A MARLIN facial-video encoder (`{c.name}`: ViT {c.encoder_embed_dim}-dim x {c.encoder_depth} blocks, "
        f"{c.clip_frames} frames of {c.img_size}x{c.img_size} RGB in [0, 1]), saved by marlin's `save_pretrained` "
        "(`config.json` + `model.safetensors` in the official key layout).\n\n"
        f"```python\nimport marlin\n\nmodel = marlin.load(\"hf://{repo_id}\")  # pip install 'marlin[hub]'\n"
        'features = model.extract_video("face.mp4", crop_face=True)\n```\n'
    )


def push_to_hub(
    model: Any,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    options: HubOptions | None = None,
) -> str:
    """Upload `model` as a `save_pretrained` folder (+ a model card when the repository has no README) to
    `repo_id`, creating the repository (and the branch `revision`) when needed; returns the commit id, which
    `from_pretrained(..., revision=...)` pins."""
    _hf()
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HfHubHTTPError

    opts = options or HubOptions()
    api = HfApi(endpoint=opts.url, token=opts.token)
    with tempfile.TemporaryDirectory(prefix="marlin-hub-") as tmp:
        model.save_pretrained(tmp)
        try:
            url = api.create_repo(repo_id, exist_ok=True, **({} if private is None else {"private": private}))
            repo_id = getattr(url, "repo_id", None) or repo_id
            if revision not in (None, "main"):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            if not api.file_exists(repo_id, "README.md", revision=revision):
                Path(tmp, "README.md").write_text(model_card(model.config, repo_id))
            info = api.upload_folder(
                repo_id=repo_id, folder_path=tmp, revision=revision,
                commit_message=commit_message or f"Upload {model.config.name} with marlin",
            )  # fmt: skip
        except HfHubHTTPError as e:
            raise OSError(
                f"push to {HF_PREFIX}{repo_id} on {opts.url} failed: {_first_line(e)} (writing needs a token with "
                "write access: `hf auth login` or HF_TOKEN)"
            ) from None
        except Exception as e:  # the HTTP client's own transport errors (httpx / requests), whichever is installed
            if not _is_network_error(e):
                raise
            raise ConnectionError(
                f"push to {HF_PREFIX}{repo_id}: {opts.url} could not be reached ({_first_line(e)})"
            ) from None
    return str(getattr(info, "oid", None) or info)
