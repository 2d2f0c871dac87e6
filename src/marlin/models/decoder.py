"""The MARLIN decoder: predicts the pixels of the hidden tokens from the encoded visible ones."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import MarlinConfig
from .layers import Block, SinCosPositionalEmbedding, init_weights


class MarlinDecoder(nn.Module):
    """Small ViT over [visible tokens + their positions, mask token + hidden positions] -> pixels of hidden tokens.

    The output for one token is its `patch_dim` = c*t*p*p values ordered (c, t, h, w); see `marlin.mae.patches`.
    """

    def __init__(self, config: MarlinConfig) -> None:
        super().__init__()
        c = config
        self.config = config
        self.pos_embedding = SinCosPositionalEmbedding(c.num_tokens, c.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, c.decoder_embed_dim))
        self.blocks = nn.ModuleList(
            Block(c.decoder_embed_dim, c.decoder_num_heads, c.mlp_ratio, c.qkv_bias, c.norm_eps)
            for _ in range(c.decoder_depth)
        )
        self.norm = nn.LayerNorm(c.decoder_embed_dim, eps=c.norm_eps)
        self.head = nn.Linear(c.decoder_embed_dim, c.patch_dim)
        self.apply(init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)

    def forward(self, x: Tensor, visible: Tensor, hidden_extra: Tensor | None = None) -> Tensor:
        """x: [B, N_vis, Dd] decoder-width visible tokens; visible: [B, N] bool -> [B, N_masked, patch_dim].

        `hidden_extra` ``[B, N_masked, Dd]`` is added to the mask tokens (conditioning on what the visible tokens
        cannot tell, e.g. the lip generator's reference frames and sound)."""
        b, _, d = x.shape
        pos = self.pos_embedding.emb.expand(b, -1, -1)  # [B, N, Dd]
        pos_vis = pos[visible].view(b, -1, d)  # [B, N_vis, Dd]
        pos_masked = pos[~visible].view(b, -1, d)  # [B, N_masked, Dd]
        hidden = self.mask_token + pos_masked if hidden_extra is None else self.mask_token + pos_masked + hidden_extra
        x = torch.cat([x + pos_vis, hidden], dim=1)  # [B, N, Dd], visible first
        for block in self.blocks:
            x = block(x)
        x = x[:, -pos_masked.shape[1] :]  # the hidden tokens, in token order
        return self.head(self.norm(x))
