"""Building blocks of the MARLIN ViT, with module names matching the released checkpoints.

Parameter names (`patch_embedding.projection`, `pos_embedding.emb`, `attn.q_bias`, `mlp.layers.0.linear`, ...) are
part of the public checkpoint format: renaming any of them breaks loading of the official `.pt` files.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger("marlin")


def sincos_table(n_positions: int, dim: int) -> Tensor:
    """Fixed 1-D sin-cos position table, as the released models use (not the 3-D factorised variant).

    angle[pos, i] = pos / 10000^(2 * (i // 2) / dim); sin on even dims, cos on odd dims.
    Computed in float32 exactly like the reference implementation, so a freshly built table is bit-identical to the
    one stored in the released checkpoints.
    """
    i = torch.arange(dim)
    exponent = 2 * torch.div(i, 2, rounding_mode="trunc") / dim  # [D] float32
    # pos * (1 / 10000^e): the reference divides a Python int by a tensor, which torch evaluates as a reciprocal
    # then a product; doing the same keeps the float32 rounding identical.
    angle = torch.arange(n_positions, dtype=torch.float32)[:, None] * torch.tensor(10000.0).pow(exponent).reciprocal()
    table = torch.empty(n_positions, dim)
    table[:, 0::2] = torch.sin(angle[:, 0::2])
    table[:, 1::2] = torch.cos(angle[:, 1::2])
    return table


class SinCosPositionalEmbedding(nn.Module):
    """Adds the fixed sin-cos table; stored as a frozen parameter `emb` [1, N, D] because the checkpoints hold it."""

    def __init__(self, n_positions: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Parameter(sincos_table(n_positions, dim)[None], requires_grad=False)  # [1, N, D]

    def forward(self, x: Tensor) -> Tensor:  # [B, N, D] -> [B, N, D]
        return x + self.emb


def compile_each(modules: Iterable[nn.Module], **options: Any) -> int:
    """``torch.compile`` each module in place (`nn.Module.compile`: its state dict keeps its keys, unlike a wrapping
    ``torch.compile(module)``), `options` passed on; logged once per call. Returns how many."""
    modules = list(modules)
    for module in modules:
        module.compile(**options)
    log.info("torch.compile: %d blocks (the first call per input shape compiles)", len(modules))
    return len(modules)


class PatchEmbedding3d(nn.Module):
    """Tubelet embedding: a Conv3d with kernel = stride = (tubelet, patch, patch), tokens ordered (t, h, w)."""

    def __init__(self, in_chans: int, dim: int, tubelet: int, patch: int) -> None:
        super().__init__()
        self.projection = nn.Conv3d(in_chans, dim, kernel_size=(tubelet, patch, patch), stride=(tubelet, patch, patch))

    def forward(self, x: Tensor) -> Tensor:  # [B, C, T, H, W] -> [B, N, D]
        return self.projection(x).flatten(2).transpose(1, 2)


def bf16_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v with bf16 matmuls and softmax (float32 accumulation inside each), for inference
    on CPUs with bf16 units (the int8 path, and bf16 inference: `Attention.kernels`).

    q, k, v: ``[B, H, N, d]`` -> ``[B, H, N, d]`` in q's dtype. One (clip, head) at a time into one reused ``[N, N]``
    score buffer: on a 2-core AVX512-BF16 CPU this ran 1.6x torch's float32 SDPA for ViT-B's 1568 tokens (whose bf16 CPU
    kernel was no faster than its float32 one), at cosine 0.99996 to it; batching heads or blocking rows was slower.
    """
    b, h, n, d = q.shape
    qb = (q * d**-0.5).to(torch.bfloat16)
    kt = k.to(torch.bfloat16).transpose(-1, -2)  # [B, H, d, N]
    vb = v.to(torch.bfloat16)
    out = torch.empty(b, h, n, d, dtype=torch.bfloat16, device=q.device)
    scores = torch.empty(n, n, dtype=torch.bfloat16, device=q.device)  # [N, N], reused: a new one per head faults
    for i in range(b):
        for j in range(h):
            torch.matmul(qb[i, j], kt[i, j], out=scores)
            torch.matmul(scores.softmax(dim=-1), vb[i, j], out=out[i, j])
    return out.to(q.dtype)


@functools.cache
def packed_linear_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether oneDNN's prepacked linear (`torch.ops.mkldnn._linear_pointwise`, a private op, used by `PackedLinear`)
    exists in this torch build and gives `F.linear`'s numbers in `dtype` on a small probe (checked once per dtype)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 16, generator=g), torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    tol = 1e-4 if dtype == torch.float32 else 0.1
    try:
        with torch.no_grad():
            packed = torch.ops.mkldnn._reorder_linear_weight(w.to(dtype), None)
            got = torch.ops.mkldnn._linear_pointwise(x.to(dtype), packed, b.to(dtype), "none", [], "")
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return bool(torch.allclose(got.float(), F.linear(x, w, b), atol=tol, rtol=tol))


class PackedLinear:
    """A copy of a linear layer's weight laid out once for oneDNN (in fp32 or bf16), for CPU inference.

    `F.linear` hands the weight to the BLAS as a plain row-major matrix on every call (and bf16 autocast casts it on
    every call too); a prepacked copy ran ViT-B's four linear shapes 14% faster in fp32 and 11% faster in bf16 on a
    2-core AVX512-BF16 EPYC. The copy is rebuilt whenever a source tensor is replaced or modified in place
    (`Tensor._version`: an optimiser step, `load_state_dict`, `.to()`), so it never serves stale weights; weights made
    under `torch.inference_mode` have no version counter and are repacked on every call. Not a module: nothing enters
    the state dict, and copies of a model start empty.
    """

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None

    def __call__(
        self, x: Tensor, weight: Tensor, biases: tuple[Tensor | None, ...], dtype: torch.dtype, bias_fn=None
    ) -> Tensor:
        """x @ weight^T + bias in `dtype` (float32 accumulation), output in `dtype`. `biases` are the source tensors
        of the bias (watched for changes); `bias_fn()` builds it (default: the single bias as it is)."""
        sources = [t for t in (weight, *biases) if t is not None]
        key = None
        if not any(t.is_inference() for t in sources):  # inference tensors keep no version counter: repack
            key = (dtype, *((t.data_ptr(), t._version) for t in sources))
        if key is None or key != self.key:
            with torch.no_grad():
                self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(dtype), None)
                bias = bias_fn() if bias_fn is not None else biases[0]
                self.bias = None if bias is None else bias.detach().to(dtype)
            self.key = key
        return torch.ops.mkldnn._linear_pointwise(x.to(dtype), self.weight, self.bias, "none", [], "")

    def clear(self) -> None:
        self.key = self.weight = self.bias = None

    def __deepcopy__(self, memo: dict) -> PackedLinear:  # a copied model packs its own weights when first used
        return PackedLinear()

    def __getstate__(self) -> dict:  # pickling a model (torch.save(model)) leaves the cache behind
        return {"key": None, "weight": None, "bias": None}


KERNEL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def kernel_dtype(kernels: str, x: Tensor) -> torch.dtype | None:
    """The dtype `kernels` ("", "fp32", "bf16") computes `x` in, or None for the plain modules: always with gradients,
    off the CPU, and for "fp32" on anything but float32 input (a float64 model stays float64)."""
    if not kernels or torch.is_grad_enabled() or x.device.type != "cpu":
        return None
    if kernels == "fp32" and x.dtype != torch.float32:
        return None
    return KERNEL_DTYPES[kernels]


class Attention(nn.Module):
    """Multi-head self-attention with a bias-free qkv projection plus separate q and v biases (k bias is zero).

    `fused=True` (default) runs `F.scaled_dot_product_attention`; `fused=False` is the explicit
    softmax(q k^T / sqrt(d)) v reference used by tests and benchmarks.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.v_bias = None
        self.proj = nn.Linear(dim, dim)
        self.fused = True
        # CPU inference kernels, used without gradients (set by `Marlin.for_inference`): "" = none, "fp32" = prepacked
        # linears (`PackedLinear`), "bf16" = prepacked bf16 linears and `bf16_attention` instead of SDPA (torch's bf16
        # SDPA measured no faster than its fp32 one on a CPU with bf16 units, this 1.6x faster)
        self.kernels = ""
        self._packed = (PackedLinear(), PackedLinear())  # qkv, proj

    def fused_qkv_bias(self) -> Tensor | None:
        """The [3D] bias of the fused projection: (q_bias, 0, v_bias), or None."""
        if self.q_bias is None:
            return None
        return torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))  # [3D]

    def forward(self, x: Tensor) -> Tensor:  # [B, N, D] -> [B, N, D]
        b, n, d = x.shape
        dtype = kernel_dtype(self.kernels, x)
        if dtype is not None:
            bias_src = (self.q_bias, self.v_bias)
            qkv = self._packed[0](x, self.qkv.weight, bias_src, dtype, self.fused_qkv_bias)  # [B, N, 3D]
        else:
            qkv = F.linear(x, self.qkv.weight, self.fused_qkv_bias())  # [B, N, 3D]
        q, k, v = qkv.view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, d]
        if dtype == torch.bfloat16:
            x = bf16_attention(q, k, v)
        elif self.fused:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # [B, H, N, N]
            x = attn.softmax(dim=-1) @ v
        x = x.transpose(1, 2).reshape(b, n, d)
        if dtype is not None:
            return self._packed[1](x, self.proj.weight, (self.proj.bias,), dtype)
        return self.proj(x)


class WrappedLinear(nn.Module):
    """`nn.Linear` wrapped one level deep, so parameter names read `layers.{i}.linear.*` as in the checkpoints."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d_in, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


class Mlp(nn.Module):
    """D -> hidden -> D with exact (erf) GELU."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([WrappedLinear(dim, hidden), WrappedLinear(hidden, dim)])
        self.kernels = ""  # prepacked linears without gradients, as `Attention.kernels`
        self._packed = (PackedLinear(), PackedLinear())

    def forward(self, x: Tensor) -> Tensor:  # [B, N, D] -> [B, N, D]
        dtype = kernel_dtype(self.kernels, x)
        if dtype is not None:
            fc1, fc2 = (layer.linear for layer in self.layers)
            h = F.gelu(self._packed[0](x, fc1.weight, (fc1.bias,), dtype))  # [B, N, hidden]
            return self._packed[1](h, fc2.weight, (fc2.bias,), dtype)
        return self.layers[1](F.gelu(self.layers[0](x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)). No layer scale, no dropout."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def init_weights(module: nn.Module) -> None:
    """Xavier-uniform Linear weights, zero biases, unit LayerNorm (the MAE / official initialisation)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
