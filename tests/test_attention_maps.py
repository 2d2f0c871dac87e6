"""Attention maps (`marlin.viz.attention`): the probabilities the blocks really use, and the maps drawn from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from marlin import Marlin, get_config
from marlin.viz.attention import attention_probs, attention_received, attention_sheet, region_share


def tiny() -> Marlin:
    torch.manual_seed(0)
    return Marlin(get_config("marlin_vit_tiny_test")).eval()


def clips(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 4, 32, 32, generator=torch.Generator().manual_seed(1))


def test_attention_probs_are_the_ones_the_block_applies():
    model = tiny()
    block = model.encoder.blocks[0]
    with torch.no_grad():  # random q / k biases: attention far from uniform
        block.attn.q_bias.normal_(0, 3)
        block.attn.qkv.weight.mul_(8)
    x = block.norm1(model.encoder.embed(clips(1)))  # [1, N, D]
    probs = attention_probs(block.attn, x)  # [1, H, N, N]
    assert probs.shape == (1, block.attn.num_heads, x.shape[1], x.shape[1])
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    assert probs.max() > 5 / x.shape[1]  # not uniform
    b, n, d = x.shape
    v = torch.nn.functional.linear(x, block.attn.qkv.weight, block.attn.fused_qkv_bias())[..., 2 * d :]
    v = v.view(b, n, block.attn.num_heads, -1).transpose(1, 2)  # [1, H, N, d]
    mixed = (probs @ v).transpose(1, 2).reshape(b, n, d)
    torch.testing.assert_close(block.attn.proj(mixed), block.attn(x), rtol=1e-4, atol=1e-5)  # SDPA's output


def test_maps_are_in_units_of_a_uniform_share():
    model = tiny()
    c = model.config
    maps = attention_received(model, clips(2))
    assert maps.shape == (2, c.clip_frames // c.tubelet_size, c.img_size // c.patch_size, c.img_size // c.patch_size)
    torch.testing.assert_close(maps.flatten(1).mean(1), torch.ones(2))
    with torch.no_grad():  # queries all zero: every token gets exactly its share in the probed block
        model.encoder.blocks[1].attn.qkv.weight[: c.encoder_embed_dim].zero_()
        model.encoder.blocks[1].attn.q_bias.zero_()
    torch.testing.assert_close(attention_received(model, clips(2), layer=2), torch.ones_like(maps))
    assert not torch.allclose(attention_received(model, clips(2), layer=1), torch.ones_like(maps))
    with pytest.raises(ValueError, match="layer must be in 1..2"):
        attention_received(model, clips(1), layer=3)


def test_region_share():
    maps = torch.ones(2, 2, 2, 2)
    region = torch.zeros(2, 2, 2, dtype=torch.bool)
    region[0, 0, 0] = True
    maps[1] = 0
    maps[1, 0, 0, 0] = 8.0  # all attention on the region's one token: 8 times its share of 8 tokens
    torch.testing.assert_close(region_share(maps, region), torch.tensor([1.0, 8.0]))


def test_sheet_rows_share_one_colour_scale():
    frames = np.full((4, 32, 32, 3), 128, np.uint8)
    flat, peaked = np.ones((2, 2, 2)), np.ones((2, 2, 2))
    peaked[0, 0, 0] = 4.0
    image = attention_sheet(frames, {"flat": flat, "peaked": peaked}, gap=2)
    assert image.dtype == np.uint8 and image.ndim == 3
    assert image.shape[0] == 2 * 32 + 2 and image.shape[1] > 2 * 32 + 2  # 2 rows; 2 columns + the label margin
    left = image.shape[1] - (2 * 32 + 2)
    hot, cold = image[5, left + 5], image[5, left + 20]  # peaked's row is second; check the first row is flat
    assert np.array_equal(hot, cold)
    row2 = image[34:66, left:]
    assert not np.array_equal(row2[5, 5], row2[5, 20])  # the peak stands out
    with pytest.raises(ValueError, match="at least one map"):
        attention_sheet(frames, {})
