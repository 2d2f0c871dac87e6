"""Numerics against the official `marlin-pytorch==0.3.4` package, when it is installed (dev-only oracle).

Install it without its dependencies: `pip install --no-deps marlin-pytorch==0.3.4 einops`. It imports torchvision and
ffmpeg-python only for video reading, which these tests do not use, so they are stubbed before importing it.
"""

import importlib.util
import sys
import types

import pytest
import torch

from marlin import Marlin, get_config, read_checkpoint
from marlin.models.layers import sincos_table

pytestmark = [
    pytest.mark.oracle,
    pytest.mark.skipif(
        importlib.util.find_spec("marlin_pytorch") is None or importlib.util.find_spec("einops") is None,
        reason="official marlin-pytorch (oracle) not installed",
    ),
]


@pytest.fixture(scope="module")
def official():
    for name in ("torchvision", "ffmpeg"):
        if importlib.util.find_spec(name) is None:
            sys.modules.setdefault(name, types.ModuleType(name))
    import marlin_pytorch
    from marlin_pytorch.config import resolve_config

    return marlin_pytorch.Marlin, resolve_config


def build_official(official, name: str, full: bool, depth: int | None = None):
    cls, resolve = official
    c = resolve(name)
    return cls(
        img_size=c.img_size, patch_size=c.patch_size, n_frames=c.n_frames, encoder_embed_dim=c.encoder_embed_dim,
        encoder_depth=depth or c.encoder_depth, encoder_num_heads=c.encoder_num_heads,
        decoder_embed_dim=c.decoder_embed_dim, decoder_depth=c.decoder_depth, decoder_num_heads=c.decoder_num_heads,
        mlp_ratio=c.mlp_ratio, qkv_bias=c.qkv_bias, qk_scale=c.qk_scale, drop_rate=c.drop_rate,
        attn_drop_rate=c.attn_drop_rate, norm_layer=c.norm_layer, init_values=c.init_values,
        tubelet_size=c.tubelet_size, as_feature_extractor=not full,
    ).eval()  # fmt: skip


@pytest.mark.parametrize("dim", [192, 384, 512, 768, 1024])
def test_position_table_is_bit_identical(official, dim):
    from marlin_pytorch.model.positional_embedding import SinCosPositionalEmbedding

    assert torch.equal(SinCosPositionalEmbedding((1568, dim), 0.0).emb.data[0], sincos_table(1568, dim))


@pytest.mark.parametrize("name", ["marlin_vit_small_ytf", pytest.param("marlin_vit_base_ytf", marks=pytest.mark.slow)])
def test_features_and_reconstruction_match_official(official, tmp_path, name):
    ref = build_official(official, name, full=True, depth=4)  # 4 encoder blocks keep it quick; same code path
    torch.save(ref.state_dict(), tmp_path / "ref.full.pt")
    ours = Marlin(get_config(name).replace(encoder_depth=4), as_feature_extractor=False)
    ours.load_checkpoint(read_checkpoint(tmp_path / "ref.full.pt"))
    ours.eval()
    assert set(ours.state_dict()) == set(ref.state_dict())
    x = torch.rand(2, 3, 16, 224, 224)
    with torch.no_grad():
        for keep_seq in (True, False):
            a = ref.extract_features(x, keep_seq=keep_seq)
            b = ours.extract_features(x, keep_seq=keep_seq)
            assert a.shape == b.shape and (a - b).abs().max() <= 1e-4
        visible = torch.zeros(2, 1568, dtype=torch.bool)
        for row in visible:
            row[torch.randperm(1568)[:156]] = True
        a, b = ref(x, visible), ours(x, visible)
        assert a.shape == b.shape == (2, 1568 - 156, 1536) and (a - b).abs().max() <= 1e-4


@pytest.mark.slow
def test_official_file_loads_through_drop_in_api(official, tmp_path):
    ref = build_official(official, "marlin_vit_small_ytf", full=False)
    torch.save(ref.state_dict(), tmp_path / "marlin_vit_small_ytf.encoder.pt")
    ours = Marlin.from_file("marlin_vit_small_ytf", str(tmp_path / "marlin_vit_small_ytf.encoder.pt"))
    x = torch.rand(1, 3, 16, 224, 224)
    with torch.no_grad():
        assert (ref.extract_features(x, keep_seq=False) - ours.extract_features(x, keep_seq=False)).abs().max() <= 1e-4
    # and our export loads in the official package unchanged
    ours.export_official(tmp_path / "ours.encoder.pt")
    cls, _ = official
    back = cls.from_file("marlin_vit_small_ytf", str(tmp_path / "ours.encoder.pt"))
    assert torch.equal(back.encoder.norm.weight, ours.encoder.norm.weight)
