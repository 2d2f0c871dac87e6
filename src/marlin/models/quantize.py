"""The int8 CPU inference path: a copy of a Marlin whose encoder Linear layers run as dynamic int8 matmuls.

Weights are quantised once (symmetric int8, one scale per output channel); activations are quantised per call from their
observed range (torch's dynamic quantisation, fbgemm/x86 kernels, 7-bit activation range so AVX2's 16-bit
accumulation cannot overflow). Attention itself (q k^T, softmax, @ v) stays float32 SDPA, as do LayerNorm, GELU and
the Conv3d patch embedding. On a 2-core AVX2 CPU this runs ViT-B 1.3-1.4x faster than fp32, pooled-feature cosine
> 0.999 to fp32 on real face clips (README "Precision").

The fp32 model keeps a bias-free `qkv` Linear plus separate q / v biases (the checkpoint layout) and calls
`F.linear` on its weight; dynamic quantisation only replaces real `nn.Linear` modules that are called, so the copy
swaps each `Attention` for `QkvLinearAttention`, whose `qkv` is an `nn.Linear` holding the same weight and the
concatenated (q, 0, v) bias. The fp32 model, its outputs and its checkpoint keys are untouched.
"""

from __future__ import annotations

import copy
import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Attention

if TYPE_CHECKING:
    from .model import Marlin

__all__ = ["QkvLinearAttention", "int8_available", "int8_cosine", "is_quantized", "probe_clip", "quantize_int8"]


class QkvLinearAttention(nn.Module):
    """`Attention` with its q/k/v projection as one `nn.Linear` (bias included), so it can be quantised; SDPA."""

    def __init__(self, attn: Attention) -> None:
        super().__init__()
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        weight = attn.qkv.weight.detach()
        self.qkv = nn.Linear(weight.shape[1], weight.shape[0], bias=attn.q_bias is not None)
        with torch.no_grad():
            self.qkv.weight.copy_(weight)
            if attn.q_bias is not None:
                self.qkv.bias.copy_(torch.cat((attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias)))
        self.proj = copy.deepcopy(attn.proj)

    def forward(self, x: Tensor) -> Tensor:  # [B, N, D] -> [B, N, D]
        b, n, d = x.shape
        qkv = self.qkv(x)  # [B, N, 3D]
        q, k, v = qkv.view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, d]
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


def int8_available() -> bool:
    """Whether this torch build has an int8 dynamic-quantisation engine for x86 CPUs (fbgemm / x86)."""
    return any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm"))


def is_quantized(model: nn.Module) -> bool:
    """Whether `model` holds dynamically quantised Linear layers (a `quantize_int8` copy)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return any(isinstance(m, DynamicLinear) for m in model.modules())


def quantize_int8(model: Marlin) -> Marlin:
    """A CPU inference copy of `model` with dynamic int8 encoder Linear layers (qkv, proj, MLP); `model` is unchanged.

    The copy is for `extract_features` / `extract_video` only (no gradients, no saving: keep the fp32 model for
    that). Raises a one-line ValueError when the torch build has no x86 int8 engine or the model is not on the CPU.
    """
    if not int8_available():
        raise ValueError(
            "precision 'int8' needs torch's x86 int8 engine (fbgemm), which this torch build lacks: use fp32"
        )
    if model.device.type != "cpu":
        raise ValueError(f"precision 'int8' runs on the CPU only; the model is on {model.device}: use bf16 or fp32")
    out = copy.deepcopy(model).eval()
    for block in out.encoder.blocks:
        if isinstance(block.attn, Attention):
            block.attn = QkvLinearAttention(block.attn)
    for p in out.parameters():
        p.requires_grad_(False)
    engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
    torch.backends.quantized.engine = engine
    with warnings.catch_warnings():  # torch 2.13 deprecates torch.ao.quantization in favour of torchao (not needed)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_(tensor|channel).*deprecated")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        spec = {nn.Linear: per_channel_dynamic_qconfig}
        out.encoder.blocks = quantize_dynamic(out.encoder.blocks, spec, dtype=torch.qint8)
    out.precision = "int8"
    return out


def probe_clip(model: Marlin, seed: int = 0) -> Tensor:
    """A deterministic natural-looking clip [1, C, T, H, W] in [0, 1] for `model`'s input size: smooth random
    blobs drifting over time (low-frequency content like a face crop, not white noise)."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, c.in_chans, 4, 7, 7, generator=g)
    clip = F.interpolate(coarse, size=(c.clip_frames, c.img_size, c.img_size), mode="trilinear", align_corners=False)
    return clip.clamp_(0, 1)


@torch.inference_mode()
def int8_cosine(model: Marlin, quantized: Marlin, sample: Tensor | None = None) -> float:
    """The smallest cosine between `model`'s and `quantized`'s pooled features over the clips of `sample`
    (default: `probe_clip`): the fidelity an int8 copy must hold (>= 0.99) before `auto` uses it."""
    x = probe_clip(model) if sample is None else sample
    a = model.extract_features(x, keep_seq=False, requires_grad=False).float()
    b = quantized.extract_features(x, keep_seq=False, requires_grad=False).float()
    return float(F.cosine_similarity(a, b, dim=-1).min())
