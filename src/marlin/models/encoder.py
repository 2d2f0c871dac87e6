"""The MARLIN ViT encoder: tubelet embedding, fixed sin-cos positions, pre-norm blocks, final LayerNorm."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..mae.patches import patchify
from .config import MarlinConfig
from .layers import Block, PatchEmbedding3d, SinCosPositionalEmbedding, init_weights


class MarlinEncoder(nn.Module):
    """Video ViT encoder. Input [B, C, T, H, W] RGB in [0, 1]; tokens ordered (t, h, w); no class token.

    With ``config.num_registers`` > 0 the blocks also carry that many learnt register tokens, placed before the patch
    tokens by :meth:`run_blocks` and dropped after it, so every output keeps one row per patch token.
    """

    def __init__(self, config: MarlinConfig) -> None:
        super().__init__()
        c = config
        self.config = config
        self.patch_embedding = PatchEmbedding3d(c.in_chans, c.encoder_embed_dim, c.tubelet_size, c.patch_size)
        self.pos_embedding = SinCosPositionalEmbedding(c.num_tokens, c.encoder_embed_dim)
        self.blocks = nn.ModuleList(
            Block(c.encoder_embed_dim, c.encoder_num_heads, c.mlp_ratio, c.qkv_bias, c.norm_eps)
            for _ in range(c.encoder_depth)
        )
        self.norm = nn.LayerNorm(c.encoder_embed_dim, eps=c.norm_eps)
        # Only registered when used, so the released architecture's state dict keeps its keys.
        self.registers = nn.Parameter(torch.zeros(1, c.num_registers, c.encoder_embed_dim)) if c.num_registers else None
        self.grad_checkpointing = False
        # Embed only the visible patches when masking (what `Marlin.set_fused_attention(False)` turns off, to
        # reproduce the official computation: the Conv3d over every patch, then the visible rows kept).
        self.fused = True
        # Inference only: run the blocks on this many clips at a time (0 = the whole batch). `Marlin.for_inference` sets
        # 1 on a CPU: a clip's activations then stay in cache (at batch 4 the element-wise ops of ViT-B became memory
        # bound) and its int8 activation quantisation no longer depends on the other clips of the batch.
        self.clips_per_pass = 0
        self.apply(init_weights)
        if self.registers is not None:
            nn.init.trunc_normal_(self.registers, std=0.02)  # as timm's register / class tokens

    def group_matcher(self) -> dict[str, str]:
        """The encoder's layer groups, declared once (timm's convention) for layer-wise lr decay: parameter names
        matching ``stem`` are layer 0, ``blocks`` capture block k (layer k + 1); the rest (the final norm, which acts
        on the pooled feature) sits with the head above the last block. See :func:`marlin.utils.optim.param_groups`."""
        return {"stem": r"^(patch_embedding\.|pos_embedding\.|registers$)", "blocks": r"^blocks\.(\d+)\."}

    def check_input(self, x: Tensor) -> None:
        """Raise a one-line ValueError when `x` is not [B, C, T, H, W] of the configured size."""
        c = self.config
        want = (c.in_chans, c.clip_frames, c.img_size, c.img_size)
        if x.dim() != 5 or tuple(x.shape[1:]) != want:
            raise ValueError(
                f"expected a clip batch of shape [B, {', '.join(map(str, want))}] (B, C, T, H, W), got {tuple(x.shape)}"
            )

    def embed(self, x: Tensor) -> Tensor:  # [B, C, T, H, W] -> [B, N, D]
        """Every patch embedded, plus its position. On a GPU as a matmul (same numbers up to float rounding): cuDNN
        runs float32 convolutions in TF32 unless told otherwise (``torch.backends.cudnn.allow_tf32`` is True by
        default), matmuls only where ``torch.backends.cuda.matmul.allow_tf32`` allows it (off by default; training
        runs turn it on), so fp32 inference on a GPU stays float32 like the CPU's. `set_fused_attention(False)`
        keeps the official Conv3d everywhere."""
        self.check_input(x)
        if x.is_cuda and self.fused:
            return self.pos_embedding(self._project(patchify(x, self.config.tubelet_size, self.config.patch_size)))
        return self.pos_embedding(self.patch_embedding(x))

    def _project(self, patches: Tensor) -> Tensor:  # [B, n, C*t*p*p] -> [B, n, D]
        """The Conv3d's projection as a matmul on patches in its weight's (c, t, h, w) order."""
        proj = self.patch_embedding.projection
        return F.linear(patches, proj.weight.flatten(1), proj.bias)

    def embed_visible(self, x: Tensor, visible: Tensor) -> Tensor:  # [B, C, T, H, W], [B, N] -> [B, N_vis, D]
        """`embed(x)[visible]` without embedding the hidden patches: the Conv3d as a matmul on the visible ones.

        Same numbers up to float rounding; at the usual 90% masking it skips ~90% of the embedding's work, forward
        and backward (the Conv3d's weight gradient is otherwise a full pass over the clip).
        """
        self.check_input(x)
        c, b = self.config, x.shape[0]
        patches = patchify(x, c.tubelet_size, c.patch_size)  # [B, N, C*t*p*p], the Conv3d weight's (c, t, h, w) order
        patches = patches[visible].view(b, -1, patches.shape[-1])  # [B, N_vis, C*t*p*p]
        tokens = self._project(patches)  # [B, N_vis, D]
        pos = self.pos_embedding.emb.expand(b, -1, -1)[visible].view_as(tokens)  # [B, N_vis, D]
        return tokens + pos

    def run_blocks(self, x: Tensor) -> Tensor:  # [B, n, D] -> [B, n, D]
        step = self.clips_per_pass
        if step and x.shape[0] > step and not (self.training and torch.is_grad_enabled()):
            return torch.cat([self._run_blocks(part) for part in x.split(step)])
        return self._run_blocks(x)

    def add_registers(self, x: Tensor) -> Tensor:  # [B, n, D] -> [B, R + n, D]
        """The register tokens (if any) placed before the tokens `x`; they carry no position."""
        if self.registers is None:
            return x
        return torch.cat([self.registers.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)

    def drop_registers(self, x: Tensor) -> Tensor:  # [B, R + n, D] -> [B, n, D]
        return x[:, self.config.num_registers :] if self.registers is not None else x

    def _run_blocks(self, x: Tensor) -> Tensor:  # [B, n, D] -> [B, n, D]
        x = self.add_registers(x)  # [B, R + n, D]
        for block in self.blocks:
            if self.grad_checkpointing and self.training and x.requires_grad:
                from torch.utils.checkpoint import checkpoint

                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.drop_registers(x)

    def iter_blocks(self, x: Tensor) -> Iterator[Tensor]:  # [B, n, D] -> [B, n, D] after each block
        """The patch tokens after each block in turn (registers carried along, not yielded): for layer-wise
        features in one pass. No gradient checkpointing, no clip splitting."""
        x = self.add_registers(x)
        for block in self.blocks:
            x = block(x)
            yield self.drop_registers(x)

    def forward(self, x: Tensor, visible: Tensor | None = None) -> Tensor:
        """Encode the visible tokens only (pretraining). `visible`: [B, N] bool, True = visible, same count per row.

        Returns [B, N_visible, D] after the final norm; all tokens when `visible` is None.
        """
        if visible is None:
            x = self.embed(x)  # [B, N, D]
        elif self.fused:
            x = self.embed_visible(x, visible)  # [B, N_vis, D], kept in token order
        else:
            x = self.embed(x)
            x = x[visible].view(x.shape[0], -1, x.shape[-1])  # [B, N_vis, D]
        return self.norm(self.run_blocks(x))

    def extract_features(self, x: Tensor, seq_mean_pool: bool = False) -> Tensor:
        """All tokens -> [B, N, D]; with `seq_mean_pool`, mean over tokens *then* the final norm -> [B, D].

        Pooling before the norm is how the released models define their clip feature.
        """
        x = self.run_blocks(self.embed(x))
        if seq_mean_pool:
            x = x.mean(dim=1)
        return self.norm(x)
