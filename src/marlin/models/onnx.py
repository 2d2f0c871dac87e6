"""ONNX export of the encoder, for deployment without PyTorch (ONNX Runtime, TensorRT, OpenVINO, ...).

The graph maps ``video`` [batch, 3, T, H, W] (float32 RGB in [0, 1], T/H/W fixed by the model's config: 16 x 224 x 224
for the released models) to ``features``: the pooled clip feature [batch, D] (mean over tokens, then the final
LayerNorm: `extract_features(keep_seq=False)`), or with ``tokens=True`` every token's feature [batch, N, D]. Only the
batch axis is dynamic. The file's metadata carries the model's config (``marlin_config``) and the output kind.

Exporter: torch's TorchScript-based one (``torch.onnx.export(..., dynamo=False)``). Since torch 2.9 the default is the
torch.export-based exporter, which needs the extra `onnxscript` package; the TorchScript one needs only `onnx`, exports
this graph (SDPA attention included) and gives ONNX Runtime results within ~1e-6 of torch. Its deprecation warning is
silenced here.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..utils.fileio import atomic_write

ONNX_INSTALL = "pip install 'marlin[onnx]'"
DEFAULT_OPSET = 17  # LayerNormalization is a native op from 17 on
MIN_OPSET = 14  # scaled_dot_product_attention needs 14
INPUT_NAME = "video"
OUTPUT_NAME = "features"


class _Features(nn.Module):
    """What the graph computes: the encoder's clip features, pooled or per token."""

    def __init__(self, encoder: nn.Module, tokens: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.tokens = tokens

    def forward(self, video: Tensor) -> Tensor:
        return self.encoder.extract_features(video, seq_mean_pool=not self.tokens)


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"ONNX export needs the {module} package: {ONNX_INSTALL}") from None


def export_onnx(model: Any, path: str | os.PathLike, *, tokens: bool = False, opset: int = DEFAULT_OPSET) -> Path:
    """Write `model`'s encoder to `path` as ONNX (atomically: a failed export leaves no file) and return the path.

    `tokens` exports [batch, N, D] token features instead of the pooled [batch, D]; `opset` >= 14. The model is left
    as it was (mode, device, dtype); a model off the CPU or not in float32 is exported from a float32 CPU copy.
    """
    onnx = _require("onnx")
    if opset < MIN_OPSET:
        raise ValueError(
            f"--opset {opset}: marlin's attention needs ONNX opset >= {MIN_OPSET} (default {DEFAULT_OPSET})"
        )
    encoder = model.encoder
    if encoder.norm.weight.device.type != "cpu" or encoder.norm.weight.dtype != torch.float32:
        encoder = copy.deepcopy(encoder).float().cpu()
    was_training = encoder.training
    graph = _Features(encoder, tokens).eval()
    c = model.config
    example = torch.rand(2, c.in_chans, c.clip_frames, c.img_size, c.img_size)
    meta = {
        "marlin_config": json.dumps(c.to_dict(), sort_keys=True),
        "marlin_output": "tokens [batch, N, D]" if tokens else "pooled [batch, D]",
        "marlin_input": f"{INPUT_NAME} [batch, {c.in_chans}, {c.clip_frames}, {c.img_size}, {c.img_size}] float32 RGB "
        "in [0, 1]",
    }

    def write(tmp: str) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings("ignore", category=DeprecationWarning)  # "legacy TorchScript-based ONNX export"
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # the input-shape check, traced once
            torch.onnx.export(
                graph, (example,), tmp, dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                do_constant_folding=True,
            )  # fmt: skip
        proto = onnx.load(tmp)
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.save(proto, tmp)

    try:
        return atomic_write(path, write)
    finally:
        encoder.train(was_training)


def verify_onnx(model: Any, path: str | os.PathLike, *, batch_size: int = 2, seed: int = 0) -> float:
    """Max absolute difference between ONNX Runtime (CPU) running `path` and `model` in torch on one random batch;
    the output kind (pooled or tokens) is read from the graph's output rank."""
    ort = _require("onnxruntime")
    import numpy as np

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    c = model.config
    x = torch.rand(
        batch_size, c.in_chans, c.clip_frames, c.img_size, c.img_size, generator=torch.Generator().manual_seed(seed)
    )
    (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
    tokens = len(session.get_outputs()[0].shape) == 3
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            want = model.extract_features(x.to(model.device), keep_seq=tokens).float().cpu().numpy()
    finally:
        model.train(was_training)
    if got.shape != want.shape:
        raise ValueError(f"{path}: ONNX output {list(got.shape)} does not match the model's {list(want.shape)}")
    return float(np.abs(got - want).max())
