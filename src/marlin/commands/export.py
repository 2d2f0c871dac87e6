"""`marlin export MODEL --onnx OUT.onnx`: the encoder as an ONNX graph for deployment, checked against torch."""

from __future__ import annotations

import argparse

VERIFY_TOLERANCE = 1e-3  # max abs difference (float32) above which the export is reported as failed


def add_arguments(p: argparse.ArgumentParser) -> None:
    from marlin.models.onnx import DEFAULT_OPSET

    p.add_argument("model", help="registered name, checkpoint file, save_pretrained directory or hf://OWNER/NAME[@REV]")
    p.add_argument("--onnx", required=True, metavar="OUT", help="the .onnx file to write")
    p.add_argument(
        "--tokens",
        action="store_true",
        help="output every token's feature [batch, N, D] instead of the pooled clip feature [batch, D]",
    )
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset, >= 14 (default: %(default)s)")
    p.add_argument(
        "--random-init",
        action="store_true",
        help="export the named architecture untrained (no download; for trying the pipeline)",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime check against torch")


def run(args: argparse.Namespace) -> int:
    import sys

    from marlin.models.model import from_spec
    from marlin.models.onnx import export_onnx, verify_onnx

    model = from_spec(args.model, random_init=args.random_init).eval()
    out = export_onnx(model, args.onnx, tokens=args.tokens, opset=args.opset)
    c = model.config
    shape = f"[batch, {c.num_tokens}, {c.encoder_embed_dim}]" if args.tokens else f"[batch, {c.encoder_embed_dim}]"
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, opset {args.opset}): video [batch, {c.in_chans}, "
          f"{c.clip_frames}, {c.img_size}, {c.img_size}] float32 RGB in [0, 1] -> features {shape}")  # fmt: skip
    if args.no_verify:
        return 0
    try:
        diff = verify_onnx(model, out, batch_size=2)
    except ImportError as e:
        print(f"not verified: {e}", file=sys.stderr)
        return 0
    print(f"onnxruntime vs torch on a random batch of 2: max abs diff {diff:.2e}")
    if not diff <= VERIFY_TOLERANCE:
        print(f"marlin export: {out} differs from torch by {diff:.2e} (> {VERIFY_TOLERANCE:g})", file=sys.stderr)
        return 1
    return 0
