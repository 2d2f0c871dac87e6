"""Model configuration: one dataclass that fully describes a MARLIN network.

Every checkpoint marlin writes carries this config (as JSON), so loading needs nothing else. YAML/JSON are storage
only; the dataclass is the source of truth.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class MarlinConfig:
    """Architecture of a MARLIN ViT video masked autoencoder.

    Defaults are the released ViT-B (`marlin_vit_base_ytf`); sizes everywhere else are derived from these fields.
    """

    name: str = "marlin_vit_base_ytf"
    img_size: int = 224  # square face crops; the released models were trained on 224x224
    patch_size: int = 16  # spatial patch side in pixels
    clip_frames: int = 16  # frames per clip fed to the encoder
    tubelet_size: int = 2  # frames per patch in time (Conv3d temporal kernel = stride)
    in_chans: int = 3  # RGB in [0, 1], no mean/std normalisation (as the released models)
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    decoder_embed_dim: int = 384
    decoder_depth: int = 4
    decoder_num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True  # separate q and v biases, k bias fixed at zero (BEiT/VideoMAE style)
    norm_eps: float = 1e-5  # torch LayerNorm default, as in the released checkpoints
    # Learnable tokens the encoder carries beside the patch tokens and drops at its output ("registers", Darcet et al.
    # 2024): a place for global computation, so attention need not pile onto a few background patches. 0 = the
    # released architecture (their checkpoints have none).
    num_registers: int = 0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # free-form notes (e.g. provenance)

    def __post_init__(self) -> None:
        sizes = ("img_size", "patch_size", "clip_frames", "tubelet_size", "in_chans", "encoder_embed_dim",
                 "encoder_depth", "encoder_num_heads", "decoder_embed_dim", "decoder_depth",
                 "decoder_num_heads")  # fmt: skip
        for field_name in sizes:
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"invalid MarlinConfig {self.name!r}: {field_name} must be a positive integer, got {value!r}"
                )
        if isinstance(self.num_registers, bool) or not isinstance(self.num_registers, int) or self.num_registers < 0:
            raise ValueError(
                f"invalid MarlinConfig {self.name!r}: num_registers must be an integer >= 0, got {self.num_registers!r}"
            )
        if not (isinstance(self.mlp_ratio, int | float) and self.mlp_ratio > 0):
            raise ValueError(f"invalid MarlinConfig {self.name!r}: mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        checks = [
            (self.img_size % self.patch_size == 0, f"img_size {self.img_size} not divisible by patch_size"),
            (self.clip_frames % self.tubelet_size == 0, f"clip_frames {self.clip_frames} not divisible by tubelet"),
            (self.encoder_embed_dim % self.encoder_num_heads == 0, "encoder_embed_dim not divisible by num_heads"),
            (self.decoder_embed_dim % self.decoder_num_heads == 0, "decoder_embed_dim not divisible by num_heads"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"invalid MarlinConfig {self.name!r}: {msg}")

    # ---- derived sizes -------------------------------------------------------------------------------------------
    @property
    def grid_size(self) -> tuple[int, int, int]:
        """Token grid (t, h, w): 8 x 14 x 14 for the released models."""
        side = self.img_size // self.patch_size
        return self.clip_frames // self.tubelet_size, side, side

    @property
    def num_tokens(self) -> int:
        """Tokens per clip (1568 for 16 x 224 x 224 with tubelet 2, patch 16)."""
        t, h, w = self.grid_size
        return t * h * w

    @property
    def patch_dim(self) -> int:
        """Values per patch the decoder predicts: c * t * p * p = 1536 for the released models."""
        return self.in_chans * self.tubelet_size * self.patch_size * self.patch_size

    # ---- storage --------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MarlinConfig:
        """Build from a dict; unknown keys are refused so typos do not pass silently."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown MarlinConfig field(s) {unknown}; expected some of {sorted(names)}")
        return cls(**d)

    @classmethod
    def from_official_yaml(cls, d: dict[str, Any], name: str | None = None) -> MarlinConfig:
        """Translate an official MARLIN pretraining YAML (already parsed) into a config.

        The official files use `clip_frames`, nested `encoder`/`decoder` sections and a few options the released
        architecture does not use (dropout, layer scale); non-default values of those are refused rather than ignored.
        """
        for key, neutral in (("drop_rate", 0.0), ("attn_drop_rate", 0.0), ("init_values", 0.0), ("qk_scale", None)):
            if d.get(key, neutral) not in (neutral, None) and d.get(key) != neutral:
                raise ValueError(f"official config sets {key}={d[key]!r}; marlin supports only {neutral!r}")
        if d.get("norm_layer", "LayerNorm") != "LayerNorm":
            raise ValueError(f"official config sets norm_layer={d['norm_layer']!r}; only LayerNorm is supported")
        enc, dec = d.get("encoder", {}), d.get("decoder", {})
        base = cls()
        return cls(
            name=name or d.get("model_name", base.name),
            img_size=d.get("img_size", base.img_size),
            patch_size=d.get("patch_size", base.patch_size),
            clip_frames=d.get("clip_frames", d.get("n_frames", base.clip_frames)),
            tubelet_size=d.get("tubelet_size", base.tubelet_size),
            encoder_embed_dim=enc.get("embed_dim", base.encoder_embed_dim),
            encoder_depth=enc.get("depth", base.encoder_depth),
            encoder_num_heads=enc.get("num_heads", base.encoder_num_heads),
            decoder_embed_dim=dec.get("embed_dim", base.decoder_embed_dim),
            decoder_depth=dec.get("depth", base.decoder_depth),
            decoder_num_heads=dec.get("num_heads", base.decoder_num_heads),
            mlp_ratio=d.get("mlp_ratio", base.mlp_ratio),
            qkv_bias=d.get("qkv_bias", base.qkv_bias),
        )

    def replace(self, **changes: Any) -> MarlinConfig:
        return dataclasses.replace(self, **changes)
