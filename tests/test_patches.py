"""Patch layout: token order (t, h, w), value order (c, t, h, w), round trips, hidden-token gathering."""

from __future__ import annotations

import pytest
import torch

from marlin.mae.masking import generate_visible, visible_indices
from marlin.mae.patches import (
    hidden_patches,
    merge_hidden,
    normalize_patches,
    patchify,
    unnormalize_patches,
    unpatchify,
)


def _unfold_reference(x: torch.Tensor, t: int, p: int) -> torch.Tensor:
    """Patches built with Tensor.unfold, the way the official training step builds its targets."""
    y = x.unfold(2, t, t).unfold(3, p, p).unfold(4, p, p)  # [B, C, nt, nh, nw, t, p, p]
    b, c, nt, nh, nw = y.shape[:5]
    return y.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(b, nt * nh * nw, c * t * p * p)


def test_patchify_matches_unfold_reference_and_layout() -> None:
    x = torch.randn(2, 3, 4, 8, 12)
    patches = patchify(x, tubelet=2, patch=4)
    assert patches.shape == (2, 2 * 2 * 3, 3 * 2 * 4 * 4)
    torch.testing.assert_close(patches, _unfold_reference(x, 2, 4), rtol=0, atol=0)
    # One value by hand: token (t=1, h=1, w=2), channel 2, frame 1 of the tubelet, pixel (3, 0) of the patch.
    token = 1 * (2 * 3) + 1 * 3 + 2
    value = 2 * (2 * 16) + 1 * 16 + 3 * 4 + 0
    assert patches[1, token, value] == x[1, 2, 1 * 2 + 1, 1 * 4 + 3, 2 * 4 + 0]


def test_unpatchify_inverts_patchify() -> None:
    x = torch.randn(3, 3, 6, 16, 16)
    patches = patchify(x, 2, 8)
    torch.testing.assert_close(unpatchify(patches, (3, 2, 2), 2, 8), x, rtol=0, atol=0)


def test_patchify_rejects_bad_geometry() -> None:
    with pytest.raises(ValueError, match="divisible by tubelet=2"):
        patchify(torch.zeros(1, 3, 3, 16, 16), 2, 16)
    with pytest.raises(ValueError, match=r"\[B, C, T, H, W\]"):
        patchify(torch.zeros(3, 4, 16, 16), 2, 16)
    with pytest.raises(ValueError, match="patches must be"):
        unpatchify(torch.zeros(1, 5, 96), (1, 2, 2), 2, 4)


def test_normalize_patches_per_channel_and_round_trip() -> None:
    x = torch.rand(2, 5, 3 * 32) * 4 + 1
    normed, mean, std = normalize_patches(x, channels=3)
    per_channel = normed.unflatten(-1, (3, 32))
    torch.testing.assert_close(per_channel.mean(-1), torch.zeros(2, 5, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_channel.std(-1), torch.ones(2, 5, 3), atol=1e-4, rtol=0)
    assert mean.shape == std.shape == (2, 5, 3, 1)
    torch.testing.assert_close(unnormalize_patches(normed, mean, std), x)


def test_hidden_patches_follow_token_order_and_merge_back() -> None:
    x = torch.rand(2, 3, 4, 32, 32)
    patches = patchify(x, 2, 16)  # [2, 8, 1536]
    visible = generate_visible("random", 2, mask_ratio=0.5, clip_frames=4, img_size=32, generator=torch.Generator())
    _, idx_hidden = visible_indices(visible)
    hidden = hidden_patches(patches, visible)
    torch.testing.assert_close(hidden, torch.gather(patches, 1, idx_hidden[..., None].expand(-1, -1, 1536)))
    assert torch.equal(merge_hidden(patches, hidden, visible), patches)
    filled = merge_hidden(patches, torch.zeros_like(hidden), visible)
    assert torch.equal(filled[visible], patches[visible]) and not filled[~visible].any()
    with pytest.raises(ValueError, match="visible must be a bool"):
        hidden_patches(patches, visible.float())
