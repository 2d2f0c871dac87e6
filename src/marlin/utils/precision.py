"""Numeric precision: the one autocast helper every command uses (extraction, pretraining, fine-tuning).

Names: ``"fp32"`` (no autocast), ``"bf16"`` and ``"fp16"`` (autocast on the device's type; weights, optimiser state
and losses stay float32). bf16 is fast on GPUs and on CPUs with bf16 matrix units (AMX, AVX512-BF16) and emulated,
several times slower than fp32, elsewhere.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["PRECISIONS", "autocast", "precision_name"]

PRECISIONS = ("fp32", "bf16", "fp16")
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", torch.float32: "fp32", torch.bfloat16: "bf16",
            torch.float16: "fp16", None: "fp32"}  # fmt: skip


def precision_name(precision: str | torch.dtype | None) -> str:
    """``"fp32"``, ``"bf16"`` or ``"fp16"`` for a name, alias or dtype; a one-line ``ValueError`` otherwise."""
    name = _ALIASES.get(precision, precision)
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return name  # type: ignore[return-value]


def autocast(device: torch.device | str, precision: str | torch.dtype | None) -> contextlib.AbstractContextManager:
    """The autocast context for `precision` on `device` (nothing for fp32)."""
    name = precision_name(precision)
    if name == "fp32":
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16 if name == "bf16" else torch.float16)
