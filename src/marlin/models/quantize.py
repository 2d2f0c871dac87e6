"""The int8 CPU inference path: a copy of a Marlin whose encoder Linear layers run as dynamic int8 matmuls.

Weights are quantised once (symmetric int8, one scale per output channel); activations are quantised per call from their
observed range (torch's dynamic quantisation, fbgemm/x86 kernels). The activation grid is 8 bits where the CPU has int8
dot-product units that accumulate in 32 bits (AVX512-VNNI / AMX-INT8) and 7 bits elsewhere (AVX2 multiplies u8 x s8
pairs into saturating 16-bit sums: 255 * 127 * 2 would overflow, 127 * 127 * 2 cannot): `Int8Linear`. Measured on a
2-core AVX512-VNNI Xeon, ViT-B random init, 8 face clips: the part of the pooled features' error that differs between
clips (what a probe can see: a shift shared by every clip is standardised away) fell from 0.19 to 0.064 of the features'
spread between clips, the tokens' error from 0.50 to 0.30. Attention itself (q k^T, softmax, @ v) runs in bf16 where the
CPU has bf16 dot-product units (AVX512-BF16 / AMX: one head at a time, the scores in a reused buffer, 1.6x float32 SDPA
measured on an AVX512-BF16 EPYC, whose CPU flash attention gains nothing from bf16) and as float32 SDPA elsewhere (bf16
is emulated there). LayerNorm, GELU and the Conv3d patch embedding stay float32. Measured: ViT-B 1.3-1.4x fp32 on a
2-core AVX2 CPU, ~2.2x on a 2-core AVX512-BF16 EPYC; pooled-feature cosine to fp32 > 0.9999 on face clips, yet on GRID
clips the features moved by 0.56 (random init) / 0.08 (pretrained) of their spread between clips and a lip-reading probe
lost 0.10 / 0.02-0.03 of mean accuracy with 7-bit activations, 0.027 (random init) with 8 bits, against bf16's 0.008
(README "Precision"): which is why `auto` never picks this path.

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

from ..utils.precision import device_capabilities
from .layers import Attention, bf16_attention

with warnings.catch_warnings():  # torch 2.13 deprecates torch.ao.quantization in favour of torchao (not needed)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

if TYPE_CHECKING:
    from .model import Marlin

__all__ = [
    "Int8Linear",
    "QkvLinearAttention",
    "int8_available",
    "int8_full_range",
    "is_quantized",
    "quantize_int8",
    "quantize_linears",
]


class QkvLinearAttention(nn.Module):
    """`Attention` with its q/k/v projection as one `nn.Linear` (bias included), so it can be quantised; attention
    by float32 SDPA or, with `bf16=True`, `bf16_attention`."""

    def __init__(self, attn: Attention, bf16: bool = False) -> None:
        super().__init__()
        self.bf16 = bf16
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        weight = attn.qkv.weight.detach()
        self.qkv = nn.Linear(weight.shape[1], weight.shape[0], bias=attn.q_bias is not None)
        with torch.no_grad():
            self.qkv.weight.copy_(weight)
            if attn.q_bias is not None:
                self.qkv.bias.copy_(attn.fused_qkv_bias())
        self.proj = copy.deepcopy(attn.proj)

    def forward(self, x: Tensor) -> Tensor:  # [B, N, D] -> [B, N, D]
        b, n, d = x.shape
        qkv = self.qkv(x)  # [B, N, 3D]
        q, k, v = qkv.view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, d]
        x = bf16_attention(q, k, v) if self.bf16 else F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Int8Linear(DynamicLinear):
    """torch's dynamic int8 Linear with a choice of activation grid: `full_range` True quantises activations to 8
    bits (safe only on CPUs whose int8 dot products accumulate in 32 bits: AVX512-VNNI / AMX-INT8), False to 7 bits
    (torch's own choice on x86, safe on AVX2's saturating 16-bit pairwise sums)."""

    full_range: bool = False

    def forward(self, x: Tensor) -> Tensor:  # [..., in] -> [..., out]
        packed = self._packed_params._packed_params
        return torch.ops.quantized.linear_dynamic(x, packed, reduce_range=not self.full_range).to(x.dtype)


def int8_full_range(flags: frozenset[str]) -> bool:
    """Whether this CPU's int8 matmuls can take 8-bit activations without overflow (32-bit accumulating int8 dot
    products: AVX512-VNNI or AMX-INT8; AVX-VNNI alone is not used by fbgemm's kernels, so it does not count)."""
    return bool({"avx512_vnni", "amx_int8"} & flags)


def quantize_linears(module: nn.Module, full_range: bool) -> nn.Module:
    """`module` with every `nn.Linear` replaced by an `Int8Linear` (weights int8, one scale per output channel) whose
    activation grid is 8 bits if `full_range` else 7; quantised in place where torch can (its return value is the
    module to use)."""
    engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"
    torch.backends.quantized.engine = engine
    with warnings.catch_warnings():  # torch 2.13 deprecates torch.ao.quantization in favour of torchao (not needed)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_(tensor|channel).*deprecated")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        spec = {nn.Linear: per_channel_dynamic_qconfig}
        module = quantize_dynamic(module, spec, dtype=torch.qint8, mapping={nn.Linear: Int8Linear})
    for m in module.modules():
        if isinstance(m, Int8Linear):
            m.full_range = full_range
    return module


def int8_available() -> bool:
    """Whether this torch build has an int8 dynamic-quantisation engine for x86 CPUs (fbgemm / x86)."""
    return any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm"))


def is_quantized(model: nn.Module) -> bool:
    """Whether `model` holds dynamically quantised Linear layers (a `quantize_int8` copy)."""
    return any(isinstance(m, DynamicLinear) for m in model.modules())


def quantize_int8(model: Marlin, bf16_attn: bool | None = None, full_range: bool | None = None) -> Marlin:
    """A CPU inference copy of `model` with dynamic int8 encoder Linear layers (qkv, proj, MLP); `model` is unchanged.

    `bf16_attn`: attention in bf16 (`bf16_attention`); None (default) = where the CPU has bf16 units (AMX / AVX512-BF16,
    `device_capabilities`), else float32 SDPA. `full_range`: 8-bit activations (`Int8Linear`); None (default) = where
    the CPU's int8 dot products cannot overflow (`int8_full_range`), else 7-bit. The copy is for `extract_features` /
    `extract_video` only (no gradients, no saving: keep the fp32 model for that). Raises a one-line ValueError when the
    torch build has no x86 int8 engine or the model is not on the CPU.
    """
    if not int8_available():
        raise ValueError(
            "precision 'int8' needs torch's x86 int8 engine (fbgemm), which this torch build lacks: use fp32"
        )
    if model.device.type != "cpu":
        raise ValueError(f"precision 'int8' runs on the CPU only; the model is on {model.device}: use bf16 or fp32")
    caps = device_capabilities("cpu")
    bf16_attn = caps.bf16 if bf16_attn is None else bf16_attn
    full_range = int8_full_range(caps.flags) if full_range is None else full_range
    out = copy.deepcopy(model).eval().set_cpu_kernels("")  # its Linear layers become int8 modules
    out.encoder.clips_per_pass = 1  # measured: ViT-B batch 4 as four clips ran 10% faster here, see MarlinEncoder
    for block in out.encoder.blocks:
        if isinstance(block.attn, Attention):
            block.attn = QkvLinearAttention(block.attn, bf16=bf16_attn)
    for p in out.parameters():
        p.requires_grad_(False)
    out.encoder.blocks = quantize_linears(out.encoder.blocks, full_range)
    out.precision = "int8"
    return out
