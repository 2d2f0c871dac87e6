"""`marlin info [CHECKPOINT]`: registered models, or what a checkpoint file holds."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", help="a checkpoint file or save_pretrained directory to describe")


def run(args: argparse.Namespace) -> int:
    from marlin.models.checkpoint import describe, infer_config, read_checkpoint
    from marlin.models.registry import get_entry, list_models

    if not args.checkpoint:
        for name in list_models():
            e = get_entry(name)
            c = e.config
            print(
                f"{name:<24} enc {c.encoder_embed_dim}/{c.encoder_depth}/{c.encoder_num_heads}  "
                f"dec {c.decoder_embed_dim}/{c.decoder_depth}/{c.decoder_num_heads}  "
                f"{'released' if e.downloadable else '':<9}{e.description}"
            )
        return 0
    ckpt = read_checkpoint(args.checkpoint)
    cfg = ckpt.config or infer_config(ckpt.state_dict, ckpt.path)
    n = sum(v.numel() for v in ckpt.state_dict.values())
    print(
        f"{ckpt.path}: format {ckpt.format}, variant {cfg.name}, {'full' if ckpt.has_decoder else 'encoder-only'}, "
        f"{len(ckpt.state_dict)} tensors, {n / 1e6:.1f}M values"
    )
    print("  " + ", ".join(f"{k}={v}" for k, v in describe(ckpt.state_dict).items()))
    if ckpt.dropped:
        print(f"  dropped on load: {len(ckpt.dropped)} keys ({ckpt.dropped[0]}, ...)")
    return 0
