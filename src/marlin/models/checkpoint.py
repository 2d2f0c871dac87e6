"""Reading MARLIN weights from every format they circulate in, safely.

Formats (detected from the content, not trusted from the file name):
- official `*.encoder.pt` / `*.full.pt`: a plain state dict with `encoder.*` (and `decoder.*`, `enc_dec_proj.*`) keys;
- official Lightning `*.ckpt`: `{"state_dict": ...}`, the `discriminator.*` entries are dropped;
- HF `model.safetensors`: keys prefixed `marlin.`;
- VideoMAE pretraining checkpoints (`{"model": ...}` with `patch_embed.proj`, `mlp.fc1`, `encoder_to_decoder`):
  key-mapped for use as an initialisation;
- marlin's own files: safetensors whose metadata carries the config JSON, a directory from `save_pretrained`, or a
  `.pt` with `{"config": ..., "state_dict": ...}`.

Pickles are read with `torch.load(weights_only=True)`: a file that needs code execution to unpickle is refused, never
executed.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .config import MarlinConfig
from .registry import get_config, list_models

log = logging.getLogger("marlin")

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


# Files of marlin's task commands that hold a MARLIN encoder inside another model (their decoder, if any, is not the
# autoencoder's): never read as a MARLIN model. Format tag -> (what the file is, what reads it).
TASK_FILES = {
    "marlin-lipsync-v1": ("a lip generator from marlin lipsync-train", "marlin lipsync --model"),
    "marlin-sync-v2": ("a lip-sync expert from marlin sync-train", "marlin sync --model"),
}


class CheckpointError(ValueError):
    """A file that is not a usable MARLIN checkpoint; the message is one line naming the file and the reason."""


@dataclass
class Checkpoint:
    """Weights in the official key layout plus what is known about them."""

    state_dict: dict[str, Tensor]
    path: str
    format: str  # "official", "lightning", "hf", "videomae", "marlin"
    config: MarlinConfig | None = None  # present when the file carries one
    dropped: list[str] = field(default_factory=list)  # keys removed on reading (e.g. the critic)

    @property
    def has_decoder(self) -> bool:
        return any(k.startswith("decoder.") for k in self.state_dict)


def _fail(path: str | Path, reason: str) -> CheckpointError:
    return CheckpointError(f"{path}: {reason}")


def _torch_load(path: Path) -> object:
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of files it then refuses anyway
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg) or re.search(r"global '([\w.]+)'", msg)
        if found or "weights_only" in msg.lower() or "Weights only load failed" in msg:
            what = found.group(1) if found else "an object that is not plain tensors/containers"
            raise _fail(
                path, f"refused to unpickle: it needs code execution ({what}); only weights-only files are loaded"
            ) from None
        raise _fail(path, f"not a PyTorch checkpoint ({msg.splitlines()[0][:120]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        if isinstance(e, EOFError) or "zip" in first.lower() or "central directory" in first.lower():
            raise _fail(path, f"truncated or corrupt checkpoint ({first})") from None
        raise _fail(path, f"could not read as a PyTorch checkpoint ({first})") from None


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except (SafetensorError, OSError, ValueError) as e:
        raise _fail(path, f"truncated or corrupt safetensors file ({str(e).splitlines()[0][:160]})") from None


def load_tagged_checkpoint(path: str | Path, fmt: str, what: str = "checkpoint") -> dict:
    """Read a dict checkpoint whose ``"format"`` entry must be `fmt` (marlin's training / fine-tuning files; weights
    only: no code execution); one-line errors name the file and say what was expected (`what`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise ValueError(f"{path}: not a readable {what} ({str(e).strip().splitlines()[0][:160]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != fmt:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: expected a {fmt} {what}, found {found!r}")
    return ckpt


_VIDEOMAE_RULES = [  # (pattern, replacement) applied in order to VideoMAE pretraining keys
    (re.compile(r"^encoder_to_decoder\."), "enc_dec_proj."),
    (re.compile(r"^mask_token$"), "decoder.mask_token"),
    (re.compile(r"\.patch_embed\.proj\."), ".patch_embedding.projection."),
]


def _map_videomae_key(key: str) -> str:
    key = re.sub(r"^module\.", "", key)
    for pattern, repl in _VIDEOMAE_RULES:
        key = pattern.sub(repl, key)
    # mlp.fcN -> mlp.layers.{N-1}.linear
    return re.sub(r"\.mlp\.fc(\d)\.", lambda m: f".mlp.layers.{int(m.group(1)) - 1}.linear.", key)


def _is_videomae(keys: list[str]) -> bool:
    return any(".patch_embed.proj." in k or ".mlp.fc1." in k or k.startswith("encoder_to_decoder.") for k in keys)


def _unwrap(obj: object, path: Path) -> tuple[dict[str, Tensor], str, MarlinConfig | None, list[str]]:
    """Find the state dict inside a loaded object and normalise its keys to the official layout."""
    if not isinstance(obj, dict):
        raise _fail(path, f"not a checkpoint: expected a dict of tensors, found {type(obj).__name__}")
    config, fmt, dropped = None, "official", []
    if obj.get("format") in TASK_FILES:
        what, reader = TASK_FILES[obj["format"]]
        raise _fail(path, f"{what} ({obj['format']}), not a MARLIN model: {reader} reads it, marlin info describes it")
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        if isinstance(obj.get("config"), dict):
            config, fmt = MarlinConfig.from_dict(obj["config"]), "marlin"
        else:
            fmt = "lightning"
        obj = obj["state_dict"]
    elif "model" in obj and isinstance(obj["model"], dict):
        obj, fmt = obj["model"], "videomae"
    sd = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not sd:
        raise _fail(path, f"not a checkpoint: no tensors found (top-level keys: {sorted(map(str, obj))[:8]})")
    dropped = [k for k in sd if k.startswith("discriminator.")]
    sd = {k: v for k, v in sd.items() if not k.startswith("discriminator.")}
    if any(k.startswith("marlin.") for k in sd):
        sd, fmt = {k.removeprefix("marlin."): v for k, v in sd.items()}, "hf"
    if _is_videomae(list(sd)):
        sd, fmt = {_map_videomae_key(k): v for k, v in sd.items()}, "videomae"
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if not any(k.startswith("encoder.") for k in sd):
        raise _fail(path, f"not a MARLIN checkpoint: no 'encoder.*' weights (found e.g. {sorted(sd)[:3]})")
    return sd, fmt, config, dropped


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read weights from any supported file or `save_pretrained` directory, without executing code."""
    path = Path(path).expanduser()
    if path.is_dir():
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise _fail(path, f"directory has no {WEIGHTS_FILE}")
        ckpt = read_checkpoint(weights)
        cfg_file = path / CONFIG_FILE
        if cfg_file.is_file():
            try:
                ckpt.config = MarlinConfig.from_dict(json.loads(cfg_file.read_text()))
            except (ValueError, TypeError) as e:
                raise _fail(cfg_file, f"invalid config ({e})") from None
        return ckpt
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise _fail(path, f"truncated or empty file ({path.stat().st_size} bytes)")
    if head[:2] == b"PK" or head[:1] == b"\x80":  # zip (torch >= 1.6) or a legacy pickle
        sd, fmt, config, dropped = _unwrap(_torch_load(path), path)
    else:
        sd, meta = _read_safetensors(path)
        config = MarlinConfig.from_dict(json.loads(meta["marlin_config"])) if "marlin_config" in meta else None
        sd, fmt, cfg2, dropped = _unwrap(sd, path)
        config = config or cfg2
        if config is not None:
            fmt = "marlin"
    return Checkpoint(sd, str(path), fmt, config, dropped)


def describe(sd: dict[str, Tensor]) -> dict[str, int]:
    """Sizes read from the tensor shapes: encoder/decoder dim and depth, token count, patch geometry."""
    out: dict[str, int] = {}
    w = sd.get("encoder.patch_embedding.projection.weight")
    if w is not None:  # [D, C, t, p, p]
        out.update(encoder_embed_dim=w.shape[0], in_chans=w.shape[1], tubelet_size=w.shape[2], patch_size=w.shape[3])
        reg = sd.get("encoder.registers")  # [1, R, D], absent from the released architecture
        out["num_registers"] = 0 if reg is None else reg.shape[1]
    for part in ("encoder", "decoder"):
        idx = {int(m.group(1)) for k in sd if (m := re.match(rf"{part}\.blocks\.(\d+)\.", k))}
        if idx:
            out[f"{part}_depth"] = max(idx) + 1
    pos = sd.get("encoder.pos_embedding.emb")
    if pos is not None:
        out["num_tokens"] = pos.shape[1]
    if "decoder.norm.weight" in sd:
        out["decoder_embed_dim"] = sd["decoder.norm.weight"].shape[0]
    return out


def check_config_matches(config: MarlinConfig, sd: dict[str, Tensor], path: str) -> None:
    """Raise a one-line CheckpointError when a config disagrees with the sizes its tensors show, before a model of
    that config is built (a crafted ``config.json`` must not make marlin allocate gigabytes or build a broken model).
    Only sizes the tensors reveal are compared; a VideoMAE encoder without decoder says nothing of the decoder."""
    found = describe(sd)
    wanted = {
        "encoder_embed_dim": config.encoder_embed_dim, "in_chans": config.in_chans,
        "tubelet_size": config.tubelet_size, "patch_size": config.patch_size, "encoder_depth": config.encoder_depth,
        "num_tokens": config.num_tokens, "decoder_embed_dim": config.decoder_embed_dim,
        "decoder_depth": config.decoder_depth, "num_registers": config.num_registers,
    }  # fmt: skip
    diff = [f"{k}={wanted[k]} but the tensors hold {found[k]}" for k in wanted if k in found and found[k] != wanted[k]]
    if diff:
        raise _fail(path, f"its config does not match its weights ({'; '.join(diff)}); the file is corrupt or was "
                          "edited")  # fmt: skip


def _summary(d: dict[str, int]) -> str:
    keys = ("encoder_embed_dim", "encoder_depth", "decoder_embed_dim", "decoder_depth", "num_tokens")
    return ", ".join(f"{k}={d[k]}" for k in keys if k in d)


def infer_config(sd: dict[str, Tensor], path: str = "<state dict>") -> MarlinConfig:
    """Pick the registered variant whose sizes match the tensors; else derive one (64-dim heads, as all releases)."""
    d = describe(sd)
    if "encoder_embed_dim" not in d or "encoder_depth" not in d:
        raise _fail(path, "cannot infer the architecture: no encoder patch embedding or blocks")

    def matches(c: MarlinConfig) -> bool:
        fields = {k: v for k, v in d.items() if k != "num_tokens"}
        return all(getattr(c, k) == v for k, v in fields.items()) and d.get("num_tokens", c.num_tokens) == c.num_tokens

    candidates = [get_config(n) for n in list_models() if matches(get_config(n))]
    if candidates:  # prefer released names (`_ytf`) so the inferred name is the familiar one
        return sorted(candidates, key=lambda c: (not c.name.endswith("_ytf"), c.name))[0]
    base = get_config("marlin_vit_base_ytf")
    dec_dim = d.get("decoder_embed_dim", base.decoder_embed_dim)
    img_size, frames = _infer_geometry(d.get("num_tokens", base.num_tokens), d["patch_size"], d["tubelet_size"])
    log.warning(
        "%s: no config in the file; inferred img_size=%d, clip_frames=%d from %d tokens (a marlin run's "
        "save_pretrained directory or .safetensors carries its config and needs no guess)",
        path, img_size, frames, d.get("num_tokens", base.num_tokens),
    )  # fmt: skip
    return MarlinConfig(
        name="marlin_custom",
        img_size=img_size,
        patch_size=d["patch_size"],
        tubelet_size=d["tubelet_size"],
        clip_frames=frames,
        encoder_embed_dim=d["encoder_embed_dim"],
        encoder_depth=d["encoder_depth"],
        encoder_num_heads=max(1, d["encoder_embed_dim"] // 64),
        decoder_embed_dim=dec_dim,
        decoder_depth=d.get("decoder_depth", base.decoder_depth),
        decoder_num_heads=max(1, dec_dim // 64),
        num_registers=d.get("num_registers", 0),
    )


def _infer_geometry(num_tokens: int, patch: int, tubelet: int) -> tuple[int, int]:
    """(img_size, clip_frames) for a token count: MARLIN clips are 16 frames, so try 16 frames first and take the
    square crop that fits; else 224 px crops and as many frames as the tokens need."""
    steps = 16 // tubelet
    if num_tokens % steps == 0:
        side = round((num_tokens // steps) ** 0.5)
        if side * side * steps == num_tokens:
            return side * patch, 16
    n_spatial = (224 // patch) ** 2
    return 224, max(1, num_tokens // n_spatial) * tubelet


def check_compatible(sd: dict[str, Tensor], expected: dict[str, Tensor], path: str, name: str) -> None:
    """Raise a one-line CheckpointError when tensor shapes disagree with the model `name` expects (naming the first
    tensor that differs), or when a tensor holds NaN / inf values."""
    bad = [k for k, v in sd.items() if k in expected and tuple(expected[k].shape) != tuple(v.shape)]
    enc_depth_ckpt = describe(sd).get("encoder_depth")
    enc_depth_model = describe(expected).get("encoder_depth")
    if bad or enc_depth_ckpt != enc_depth_model:
        try:
            found = infer_config(sd, path).name
        except CheckpointError:
            found = "unknown"
        found = f"{found} ({_summary(describe(sd))})" if found == "marlin_custom" else found
        first = (
            f"; tensor {bad[0]!r} is {list(sd[bad[0]].shape)}, expected {list(expected[bad[0]].shape)}" if bad else ""
        )
        raise _fail(
            path,
            f"wrong variant: {name!r} expects {_summary(describe(expected))}, "
            f"the file holds {found} ({_summary(describe(sd))}){first}",
        )
    nonfinite = nonfinite_tensors(sd)
    if nonfinite:
        k, n_nan, n_inf = nonfinite[0]
        more = f" (and {len(nonfinite) - 1} more tensors)" if len(nonfinite) > 1 else ""
        raise _fail(path, f"tensor {k!r} holds {n_nan} NaN and {n_inf} inf values{more}: the weights are corrupt or "
                          "the training that wrote them diverged; refusing to load them")  # fmt: skip


def nonfinite_tensors(sd: dict[str, Tensor]) -> list[tuple[str, int, int]]:
    """``(name, NaN count, inf count)`` of every floating-point tensor that is not all finite."""
    out = []
    for k, v in sd.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            out.append((k, int(torch.isnan(v).sum()), int(torch.isinf(v).sum())))
    return out
