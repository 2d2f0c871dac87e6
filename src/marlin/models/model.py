"""The `Marlin` model: encoder (+ decoder for full models), the drop-in `marlin-pytorch` API and the native one.

Drop-in (same names and semantics as the official package):
    model = Marlin.from_online("marlin_vit_base_ytf")            # or Marlin.from_file(name, path)
    feats = model.extract_features(x, keep_seq=True)              # x [B, 3, 16, 224, 224] in [0, 1] -> [B, 1568, 768]
    feats = model.extract_video("clip.mp4", crop_face=True)       # [n_windows, 768]
    pred = full_model(x, mask)                                    # mask [B, 1568] bool, True = visible

Native:
    model = marlin.load("any/checkpoint")                         # format and variant inferred, config carried
    model = marlin.load("hf://ControlNet/marlin_vit_base_ytf")    # Hugging Face Hub (also Marlin.from_pretrained)
    model = marlin.create_model("marlin_vit_small", full=True)
    model.save_pretrained("dir/")                                 # config.json + model.safetensors
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..utils.fileio import atomic_write
from ..utils.precision import DeviceCaps, autocast, device_capabilities, resolve_precision
from . import checkpoint as ckpt_io
from .config import MarlinConfig
from .decoder import MarlinDecoder
from .encoder import MarlinEncoder
from .layers import KERNEL_DTYPES, Attention, Mlp, compile_each, packed_linear_available
from .registry import get_config

log = logging.getLogger("marlin")

# marlin-pytorch constructor argument -> MarlinConfig field
_OFFICIAL_ARGS = {
    "img_size": "img_size",
    "patch_size": "patch_size",
    "n_frames": "clip_frames",
    "encoder_embed_dim": "encoder_embed_dim",
    "encoder_depth": "encoder_depth",
    "encoder_num_heads": "encoder_num_heads",
    "decoder_embed_dim": "decoder_embed_dim",
    "decoder_depth": "decoder_depth",
    "decoder_num_heads": "decoder_num_heads",
    "mlp_ratio": "mlp_ratio",
    "qkv_bias": "qkv_bias",
    "tubelet_size": "tubelet_size",
}
_OFFICIAL_NEUTRAL = {
    "qk_scale": None,
    "drop_rate": 0.0,
    "attn_drop_rate": 0.0,
    "norm_layer": "LayerNorm",
    "init_values": 0.0,
}


@dataclass
class LoadReport:
    """What loading a checkpoint did: where from, which format, and keys that did not line up."""

    path: str
    format: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


class Marlin(nn.Module):
    """MARLIN ViT video masked autoencoder (encoder-only feature extractor, or full model with decoder)."""

    precision: str = "fp32"  # inference precision (see `for_inference`)

    def __init__(self, config: MarlinConfig | str | None = None, *, as_feature_extractor: bool = True, **kwargs: Any):
        super().__init__()
        if isinstance(config, str):
            config = get_config(config)
        if kwargs:  # the marlin-pytorch constructor: Marlin(img_size=..., n_frames=..., encoder_embed_dim=..., ...)
            config = _config_from_official_kwargs(config, kwargs)
        self.config: MarlinConfig = config or get_config("marlin_vit_base_ytf")
        self.as_feature_extractor = as_feature_extractor
        self.clip_frames = self.config.clip_frames
        self.encoder = MarlinEncoder(self.config)
        if as_feature_extractor:
            self.enc_dec_proj = None
            self.decoder = None
        else:
            self.decoder = MarlinDecoder(self.config)
            self.enc_dec_proj = nn.Linear(self.config.encoder_embed_dim, self.config.decoder_embed_dim, bias=False)
            nn.init.xavier_uniform_(self.enc_dec_proj.weight)
        self.load_report: LoadReport | None = None
        self.precision = "fp32"  # inference precision, set by `for_inference` (bf16 / fp16 autocast, int8 copy)

    # ---- properties -----------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.encoder.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.norm.weight.dtype

    @property
    def full(self) -> bool:
        """Whether the model holds the decoder (reconstruction); the official API calls the opposite
        ``as_feature_extractor``, which stays as the constructor argument and attribute for drop-in code."""
        return not self.as_feature_extractor

    @property
    def embed_dim(self) -> int:
        return self.config.encoder_embed_dim

    # ---- compute --------------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Reconstruct hidden patches: x [B, C, T, H, W], mask [B, N] bool (True = visible, equal count per row)
        -> [B, N_masked, patch_dim] pixel predictions in token order (see `marlin.mae.patches` for the layout)."""
        if self.as_feature_extractor:
            raise RuntimeError(
                "this is an encoder-only model: use `extract_features` / `extract_video`, "
                "or load a full checkpoint (`*.full.pt`, full_model=True) to reconstruct"
            )
        if mask is None:
            raise ValueError("forward needs a visibility mask [B, N] (True = visible) for the hidden patches")
        visible = mask  # the official signature says `mask`; it is a visibility mask (True = visible)
        self._check_visible(x, visible)
        z = self.encoder(x, visible)  # [B, N_vis, D]
        return self.decoder(self.enc_dec_proj(z), visible)  # [B, N_masked, patch_dim]

    def _check_visible(self, x: Tensor, visible: Tensor) -> None:
        n = self.config.num_tokens
        if visible.dtype != torch.bool or visible.shape != (x.shape[0], n):
            raise ValueError(
                f"mask must be a bool tensor of shape [{x.shape[0]}, {n}], got {visible.dtype} {tuple(visible.shape)}"
            )
        counts = visible.sum(1)
        if (counts != counts[0]).any():
            raise ValueError(f"every mask row needs the same number of visible tokens, got {counts.tolist()}")

    def extract_features(self, x: Tensor, keep_seq: bool = True, *, requires_grad: bool | None = None) -> Tensor:
        """Clip features: [B, N, D] with `keep_seq`, else [B, D] (mean over tokens, then the final LayerNorm).

        Gradients: by default they flow in training mode or when `x` requires grad (and autograd is enabled), so
        inference in eval mode stays cheap while saliency / fine-tuning work; `requires_grad` forces either way.
        """
        if requires_grad is None:
            requires_grad = self.training or x.requires_grad
        if x.is_floating_point() and x.dtype != self.dtype:
            x = x.to(self.dtype)
        lowp = self.precision in ("bf16", "fp16")
        cast = autocast(self.device, self.precision) if lowp else contextlib.nullcontext()
        with torch.set_grad_enabled(requires_grad and torch.is_grad_enabled()), cast:
            out = self.encoder.extract_features(x, seq_mean_pool=not keep_seq)
        return out.float() if lowp else out

    @torch.no_grad()
    def extract_video(
        self,
        video_path: str | os.PathLike,
        crop_face: bool = False,
        sample_rate: int = 2,
        stride: int = 16,
        reduction: str = "none",
        keep_seq: bool = False,
        detector_device: str | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Features of a whole video by sliding 16-frame windows (see `marlin.video.windows` for the exact rule).

        Returns [n_windows, D] (or [n_windows, N, D] with `keep_seq`); `reduction` "mean"/"max" pools the windows.
        `crop_face` detects, smooths and crops the face offline first. Extra keyword arguments go to
        `marlin.video.pipeline.extract_video` (e.g. `batch_size`, `dtype`).
        """
        from ..video.pipeline import extract_video

        del detector_device  # the offline detectors run on the CPU; kept for signature compatibility
        result = extract_video(
            self, video_path, crop_face=crop_face, sample_rate=sample_rate, stride=stride, keep_seq=keep_seq, **kwargs
        )
        return result.reduce(reduction)

    # ---- options --------------------------------------------------------------------------------------------------
    def for_inference(self, precision: str | torch.dtype | None = "auto", *, caps: DeviceCaps | None = None) -> Marlin:
        """This model ready for inference in `precision` (auto, fp32, bf16, fp16, int8), same `extract_features` /
        `extract_video` API, features returned in float32.

        fp32 / bf16 / fp16 set this model's precision (bf16 / fp16 run under autocast on its device) and return it in
        eval mode; int8 returns a quantised CPU copy (`marlin.models.quantize`; its attention in bf16 where the CPU has
        bf16 units) and leaves this model as it is. ``auto`` resolves per device
        (`marlin.utils.precision.resolve_precision`, logged once): bf16 where it is native, else fp32; int8 only when
        asked for (it warns: it is fast but loses detail that probes use). On a CPU the encoder then runs one clip of
        a batch at a time (`MarlinEncoder.clips_per_pass`), which was faster there; the features are those of the
        whole batch. `caps` overrides the device probe (tests).
        """
        if self.precision == "int8":
            raise ValueError("this is already an int8 inference copy: call for_inference on the float32 model")
        self.eval()
        caps = caps or device_capabilities(self.device)
        name, _ = resolve_precision(precision, self.device, caps)
        self.precision = "fp32" if name == "int8" else name  # int8 is a copy; this model stays the fp32 reference
        self.set_cpu_kernels("" if name == "int8" else self._cpu_kernels(caps))  # int8: this stays the reference
        # a CPU runs the blocks one clip at a time (activations stay in cache: ViT-B fp32 batch 4 6% faster, measured
        # on a 2-core EPYC); a GPU needs the whole batch
        self.encoder.clips_per_pass = 1 if self.device.type == "cpu" else 0
        if name == "int8":
            from .quantize import int8_full_range, quantize_int8

            return quantize_int8(self, bf16_attn=caps.bf16, full_range=int8_full_range(caps.flags))
        return self

    def _cpu_kernels(self, caps: DeviceCaps) -> str:
        """The CPU inference kernels for this model's precision (`Attention.kernels`): prepacked fp32 linears, or bf16
        linears and attention where the CPU has bf16 units; "" elsewhere (GPUs, fp16, emulated bf16, no oneDNN)."""
        if self.device.type != "cpu" or self.precision not in KERNEL_DTYPES:
            return ""
        if self.precision == "bf16" and not caps.bf16:
            return ""
        return self.precision if packed_linear_available(KERNEL_DTYPES[self.precision]) else ""

    def set_cpu_kernels(self, kernels: str) -> Marlin:
        """Switch the blocks' inference kernels ("", "fp32", "bf16"; see `Attention.kernels`); "" frees their packed
        weights. `for_inference` sets them; training and anything with gradients never uses them."""
        for m in self.modules():
            if isinstance(m, (Attention, Mlp)):
                m.kernels = kernels
                if not kernels:
                    for cache in m._packed:
                        cache.clear()
        return self

    def at_layer(self, layer: int) -> Marlin:
        """A feature extractor whose features come from encoder block `layer` (1 = the first block, ``depth`` = this
        model): the same weights, shared, with the blocks after `layer` dropped; the final norm and the pooling stay
        (mean over tokens, then the norm, as for the released features). For layer-wise probing: a masked
        autoencoder's middle blocks often carry more linearly readable information than its last one.
        """
        depth = len(self.encoder.blocks)
        if not 1 <= layer <= depth:
            raise ValueError(f"layer must be in 1..{depth} for this {depth}-block encoder, got {layer}")
        if layer == depth:
            return self
        encoder = copy.copy(self.encoder)
        encoder._modules = dict(encoder._modules)  # a shallow module copy would otherwise share the block list
        encoder.blocks = nn.ModuleList(list(self.encoder.blocks)[:layer])
        out = copy.copy(self)
        out._modules = dict(out._modules)
        out.encoder, out.decoder = encoder, None
        out.layer = layer
        return out

    def set_fused_attention(self, fused: bool = True) -> Marlin:
        """Switch between marlin's kernels (default: SDPA attention, visible-only patch embedding when masking) and
        the official computations (explicit softmax(q k^T) v, Conv3d over every patch), kept as a reference."""
        for m in self.modules():
            if hasattr(m, "fused"):
                m.fused = fused
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> Marlin:
        self.encoder.grad_checkpointing = enable
        return self

    def compile_blocks(self, **options: Any) -> Marlin:
        """Each transformer block (encoder and decoder) through ``torch.compile`` in place, `options` passed on; the
        state dict, checkpoints and exports keep their keys. The first call per input shape compiles (tens of seconds
        on a CPU); what training configs' ``compile=true`` and ``marlin extract --compile`` do. Meant for GPUs
        (fused element-wise work around the matmuls); on a CPU marlin's inference kernels already run the matmuls
        near the machine's rate."""
        compile_each([*self.encoder.blocks, *(self.decoder.blocks if self.decoder is not None else [])], **options)
        return self

    def no_weight_decay(self) -> set[str]:
        skip = ("bias", "mask_token", "registers")  # learnt tokens stay undecayed, as timm's class / register tokens
        return {n for n, _ in self.named_parameters() if n.endswith(skip) or ".norm" in n}

    # ---- loading --------------------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, model_name: str | None, path: str | os.PathLike) -> Marlin:
        """Load weights of variant `model_name` (None: infer it) from any supported checkpoint file."""
        return load(path, name=model_name)

    @classmethod
    def from_online(cls, model_name: str, full_model: bool = False) -> Marlin:
        """Download (once, into the cache; see `marlin.models.hub`) and load a released MARLIN checkpoint."""
        from .hub import fetch_release

        return load(fetch_release(model_name, full=full_model), name=model_name)

    @classmethod
    def from_pretrained(
        cls,
        repo_id: str | os.PathLike,
        *,
        revision: str | None = None,
        filename: str | None = None,
        full: bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        endpoint: str | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        map_location: str | torch.device = "cpu",
    ) -> Marlin:
        """A model from the Hugging Face Hub (``OWNER/NAME`` or ``hf://OWNER/NAME[/FILE][@REVISION]``; needs the
        `[hub]` extra) or, when `repo_id` exists on disk, a local `save_pretrained` folder / checkpoint file.

        Reads marlin's own `push_to_hub` / `save_pretrained` repositories and the official
        ``ControlNet/marlin_vit_{small,base,large}_ytf`` ones; `revision` (branch, tag or commit) pins what is
        loaded, files are cached by huggingface_hub and load offline once cached (``HF_HUB_OFFLINE=1`` or
        `local_files_only` never touch the network). `filename` picks one checkpoint file in a repository of them.
        """
        from .hub import HubOptions, is_hf_spec, read_hub_checkpoint

        if not is_hf_spec(repo_id) and Path(repo_id).expanduser().exists():
            return load(repo_id, full=full, map_location=map_location)
        options = HubOptions(endpoint, cache_dir, token, local_files_only)
        ckpt = read_hub_checkpoint(str(repo_id), revision=revision, filename=filename, options=options)
        return load(ckpt, full=full, map_location=map_location)

    @classmethod
    def clean_cache(cls, verbose: bool = True) -> None:
        from .hub import clean_cache

        clean_cache(verbose)

    def load_checkpoint(self, ckpt: ckpt_io.Checkpoint, *, strict: bool = True) -> LoadReport:
        """Load an already-read checkpoint into this model, refusing wrong variants with a one-line error."""
        sd = dict(ckpt.state_dict)
        own = self.state_dict()
        if self.as_feature_extractor:  # an encoder-only model takes the encoder part of a full checkpoint
            sd = {k: v for k, v in sd.items() if k.startswith("encoder.")}
        ckpt_io.check_compatible(sd, own, ckpt.path, self.config.name)
        result = self.load_state_dict(sd, strict=False)
        report = LoadReport(
            ckpt.path, ckpt.format, list(result.missing_keys), list(result.unexpected_keys), ckpt.dropped
        )
        if strict and (report.missing or report.unexpected):
            raise ckpt_io.CheckpointError(
                f"{ckpt.path}: keys do not match {self.config.name!r}: missing {report.missing[:4]}"
                f"{'...' if len(report.missing) > 4 else ''}, unexpected {report.unexpected[:4]}"
                f"{'...' if len(report.unexpected) > 4 else ''}"
            )
        self.load_report = report
        return report

    # ---- saving ---------------------------------------------------------------------------------------------------
    def _check_saveable(self) -> None:
        if getattr(self, "layer", None) is not None:
            raise ValueError(f"a model cut at layer {self.layer} cannot be saved: save the model it was made from")
        if self.precision == "int8":
            raise ValueError("an int8 inference copy cannot be saved: save the float32 model it was made from")

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write `config.json` + `model.safetensors` (official key layout, config also in its metadata)."""
        from safetensors.torch import save_file

        self._check_saveable()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / ckpt_io.CONFIG_FILE, lambda p: Path(p).write_text(self.config.to_json()))
        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {"marlin_config": json.dumps(self.config.to_dict()), "format": "marlin"}
        atomic_write(directory / ckpt_io.WEIGHTS_FILE, lambda p: save_file(sd, p, metadata=meta))
        return directory

    def push_to_hub(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        private: bool | None = None,
        commit_message: str | None = None,
        token: str | bool | None = None,
        endpoint: str | None = None,
    ) -> str:
        """Upload this model to the Hugging Face Hub as a `save_pretrained` folder (+ a model card when the repository
        has none), creating the repository / branch when needed; returns the commit id (pin it with
        ``from_pretrained(repo_id, revision=commit)``). Needs the `[hub]` extra and a write token."""
        from .hub import HubOptions, push_to_hub

        options = HubOptions(endpoint=endpoint, token=token)
        return push_to_hub(
            self, repo_id, revision=revision, private=private, commit_message=commit_message, options=options
        )

    def export_official(self, path: str | os.PathLike, full: bool | None = None) -> Path:
        """Write a plain state dict in the official `.encoder.pt` / `.full.pt` layout (loads in marlin-pytorch);
        `full=None` exports what this model holds, `full=False` only its encoder."""
        self._check_saveable()
        if self.config.num_registers:
            raise ValueError(
                f"this model has {self.config.num_registers} register tokens, which the official layout cannot hold "
                "(marlin-pytorch has none); use save_pretrained"
            )
        full = (not self.as_feature_extractor) if full is None else full
        if full and self.as_feature_extractor:
            raise ValueError("cannot export a full model from an encoder-only Marlin")
        sd = {k: v.detach().cpu() for k, v in self.state_dict().items() if full or k.startswith("encoder.")}
        path = Path(path)
        atomic_write(path, lambda p: torch.save(sd, p))
        return path

    def export_all(self, directory: str | os.PathLike) -> dict[str, Path]:
        """Every layout at once into `directory`: official ``<name>.encoder.pt`` (+ ``<name>.full.pt`` for a full
        model) and a ``save_pretrained`` folder ``<name>/`` (what a pretraining run exports). A model with register
        tokens has no official layout: only the folder."""
        directory, name = Path(directory), self.config.name
        out = {}
        if not self.config.num_registers:
            out["encoder_official"] = self.export_official(directory / f"{name}.encoder.pt", full=False)
            if not self.as_feature_extractor:
                out["full_official"] = self.export_official(directory / f"{name}.full.pt", full=True)
        out["marlin"] = self.save_pretrained(directory / name)
        return out


def _config_from_official_kwargs(config: MarlinConfig | None, kwargs: dict[str, Any]) -> MarlinConfig:
    changes = {}
    for key, value in kwargs.items():
        if key in _OFFICIAL_ARGS:
            changes[_OFFICIAL_ARGS[key]] = value
        elif key in _OFFICIAL_NEUTRAL:
            if value != _OFFICIAL_NEUTRAL[key]:
                raise ValueError(
                    f"Marlin({key}={value!r}) is not supported; the released architecture uses "
                    f"{_OFFICIAL_NEUTRAL[key]!r}"
                )
        else:
            raise TypeError(f"Marlin() got an unexpected keyword argument {key!r}")
    return (config or MarlinConfig(name="marlin_custom")).replace(**changes)


def create_model(
    name: str | MarlinConfig = "marlin_vit_base_ytf", *, full: bool = False, pretrained: bool = False
) -> Marlin:
    """Build a registered variant; `pretrained=True` downloads/loads the released weights (ytf variants)."""
    if pretrained:
        if not isinstance(name, str):
            raise ValueError("pretrained=True needs a registered model name")
        return Marlin.from_online(name, full_model=full)
    return Marlin(name, as_feature_extractor=not full)


def load(
    path: str | os.PathLike | ckpt_io.Checkpoint,
    name: str | None = None,
    *,
    full: bool | None = None,
    map_location: str | torch.device = "cpu",
) -> Marlin:
    """Load any supported checkpoint; the variant comes from the file's config, `name`, or the tensor shapes.

    `full=None` builds a full model when the file has decoder weights; `full=False` keeps only the encoder.
    VideoMAE checkpoints load non-strictly (an initialisation): missing / unexpected keys are logged and reported
    in `model.load_report`. `path` may also be ``hf://OWNER/NAME[/FILE][@REVISION]`` (the Hugging Face Hub, see
    `Marlin.from_pretrained`) or an already-read `Checkpoint`.
    """
    if isinstance(path, ckpt_io.Checkpoint):
        ckpt = path
    elif isinstance(path, str) and path.startswith("hf://"):
        from .hub import read_hub_checkpoint

        ckpt = read_hub_checkpoint(path)
    else:
        ckpt = ckpt_io.read_checkpoint(path)
    if name is not None:
        config = get_config(name)
    else:
        config = ckpt.config or ckpt_io.infer_config(ckpt.state_dict, ckpt.path)
    if full and not ckpt.has_decoder:
        raise ckpt_io.CheckpointError(f"{ckpt.path}: full model requested but the file holds only an encoder")
    full = ckpt.has_decoder if full is None else full
    if name is None and ckpt.config is not None:  # a config read from the file: check it before allocating a model
        sd = ckpt.state_dict if full else {k: v for k, v in ckpt.state_dict.items() if k.startswith("encoder.")}
        ckpt_io.check_config_matches(config, sd, ckpt.path)
    model = Marlin(config, as_feature_extractor=not full)
    strict = ckpt.format != "videomae"
    report = model.load_checkpoint(ckpt, strict=strict)
    if report.missing or report.unexpected:
        log.warning(
            "%s: loaded as %s; missing keys %s; unexpected keys %s",
            ckpt.path,
            ckpt.format,
            report.missing,
            report.unexpected,
        )
    model.eval()
    return model.to(map_location)


def from_spec(spec: str | os.PathLike, *, full: bool = False, random_init: bool = False) -> Marlin:
    """A model from a CLI-style spec: a checkpoint path, ``hf://OWNER/NAME[@REVISION]`` (Hugging Face Hub), or a
    registered name (released weights are downloaded once into the cache). `random_init` builds the architecture
    untrained instead: the named one, or the one a checkpoint's config describes (its weights are not used; the
    baseline a pretrained encoder is compared with)."""
    hub, path = isinstance(spec, str) and spec.startswith("hf://"), Path(spec).expanduser()
    if hub or path.exists():
        model = load(spec if hub else path, full=full)
        return Marlin(model.config, as_feature_extractor=not full).eval() if random_init else model
    if path.is_symlink():  # a link to nothing (or to itself): a file was meant, not a model name
        raise FileNotFoundError(f"{path}: a symbolic link to a missing file (or a link loop); expected a checkpoint")
    name = str(spec)
    if random_init:
        return create_model(name, full=full).eval()
    from .registry import get_entry

    if not get_entry(name).downloadable:
        raise ValueError(
            f"{name!r} has no released weights: pass a checkpoint path, or random_init for an untrained model"
        )
    return Marlin.from_online(name, full_model=full)
