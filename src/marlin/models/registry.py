"""Named model variants (timm-style): a name maps to a `MarlinConfig` and, for released models, download URLs.

No singletons: `get_config` returns the frozen dataclass; `register_model` adds user variants.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import MarlinConfig

RELEASE_URL = "https://github.com/ControlNet/MARLIN/releases/download/model_v1/{name}.{kind}.pt"


@dataclass(frozen=True)
class ModelEntry:
    config: MarlinConfig
    downloadable: bool = False  # released weights exist at RELEASE_URL
    description: str = ""

    def url(self, full: bool = False) -> str:
        return RELEASE_URL.format(name=self.config.name, kind="full" if full else "encoder")


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(config: MarlinConfig, *, downloadable: bool = False, description: str = "") -> MarlinConfig:
    """Register `config` under `config.name` (replacing an earlier entry of that name) and return it."""
    _REGISTRY[config.name] = ModelEntry(config, downloadable, description)
    return config


def get_entry(name: str) -> ModelEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(sorted(_REGISTRY))}") from None


def get_config(name: str) -> MarlinConfig:
    return get_entry(name).config


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, optionally filtered by a substring."""
    return sorted(n for n in _REGISTRY if pattern is None or pattern in n)


def _variant(name: str, enc: tuple[int, int, int], dec: tuple[int, int, int], **kw) -> MarlinConfig:
    return MarlinConfig(
        name=name,
        encoder_embed_dim=enc[0],
        encoder_depth=enc[1],
        encoder_num_heads=enc[2],
        decoder_embed_dim=dec[0],
        decoder_depth=dec[1],
        decoder_num_heads=dec[2],
        **kw,
    )


# The released MARLIN models (pretrained on YouTube Faces): encoder (dim, depth, heads), decoder (dim, depth, heads).
register_model(_variant("marlin_vit_small_ytf", (384, 12, 6), (192, 4, 3)), downloadable=True, description="ViT-S")
register_model(_variant("marlin_vit_base_ytf", (768, 12, 12), (384, 4, 6)), downloadable=True, description="ViT-B")
register_model(_variant("marlin_vit_large_ytf", (1024, 24, 16), (512, 12, 8)), downloadable=True, description="ViT-L")
# Untrained architectures without the `_ytf` suffix, for pretraining from scratch.
register_model(_variant("marlin_vit_small", (384, 12, 6), (192, 4, 3)), description="ViT-S, random init")
register_model(_variant("marlin_vit_base", (768, 12, 12), (384, 4, 6)), description="ViT-B, random init")
register_model(_variant("marlin_vit_large", (1024, 24, 16), (512, 12, 8)), description="ViT-L, random init")
# Tiny variants: full 224 x 16-frame geometry with a narrow network (CPU pretraining), and a toy one for tests.
register_model(_variant("marlin_vit_tiny", (192, 6, 3), (128, 2, 2)), description="ViT-Ti, CPU-sized")
register_model(
    _variant("marlin_vit_tiny_test", (32, 2, 2), (16, 1, 1), img_size=32, patch_size=16, clip_frames=4),
    description="toy model for unit tests (2x2x2 tokens)",
)
