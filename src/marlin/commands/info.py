"""`marlin info [CHECKPOINT]`: registered models, or what a checkpoint file holds."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", help="a checkpoint file or save_pretrained directory to describe")


def run(args: argparse.Namespace) -> int:
    import sys

    from marlin.models.checkpoint import (
        CheckpointError,
        check_config_matches,
        describe,
        infer_config,
        read_checkpoint,
    )
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
    task_file = describe_task_file(args.checkpoint)
    if task_file:
        lines, sd = task_file
        print("\n".join(lines))
        return _report_nonfinite(sd)
    try:
        ckpt = read_checkpoint(args.checkpoint)
        cfg = ckpt.config or infer_config(ckpt.state_dict, ckpt.path)
        check_config_matches(cfg, ckpt.state_dict, ckpt.path)  # a config.json edited to sizes nothing can load
    except (CheckpointError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"marlin info: {e}", file=sys.stderr)
        return 2
    n = sum(v.numel() for v in ckpt.state_dict.values())
    print(
        f"{ckpt.path}: format {ckpt.format}, variant {cfg.name}, {'full' if ckpt.has_decoder else 'encoder-only'}, "
        f"{len(ckpt.state_dict)} tensors, {n / 1e6:.1f}M values"
    )
    print("  " + ", ".join(f"{k}={v}" for k, v in describe(ckpt.state_dict).items()))
    if ckpt.dropped:
        print(f"  dropped on load: {len(ckpt.dropped)} keys ({ckpt.dropped[0]}, ...)")
    return _report_nonfinite(ckpt.state_dict)


def _report_nonfinite(sd: dict) -> int:
    """1 (and a line on stderr) when tensors of `sd` hold NaN / inf values, else 0."""
    import sys

    from marlin.models.checkpoint import nonfinite_tensors

    bad = nonfinite_tensors(sd)
    if bad:
        print(f"  NOT USABLE: {len(bad)} tensors hold NaN / inf values, e.g. {bad[0][0]} ({bad[0][1]} NaN, "
              f"{bad[0][2]} inf); loading refuses them", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def describe_task_file(path: str) -> tuple[list[str], dict] | None:
    """(lines describing, state dict of) a file of a task command (a lip generator, a sync expert:
    models.checkpoint.TASK_FILES), or None for any other file."""
    import json
    from pathlib import Path

    import torch

    from marlin.models.checkpoint import TASK_FILES
    from marlin.models.config import MarlinConfig

    if not Path(path).is_file():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not a torch file: the checkpoint reader says what it is
        return None
    if not isinstance(obj, dict) or obj.get("format") not in TASK_FILES:
        return None
    what, reader = TASK_FILES[obj["format"]]
    sd = obj.get("state_dict", {})
    n = sum(v.numel() for v in sd.values())
    encoder = MarlinConfig.from_dict(obj["config"]).name if isinstance(obj.get("config"), dict) else "?"
    lines = [f"{path}: {what} (format {obj['format']}; read by {reader}), encoder {encoder}, {len(sd)} tensors, "
             f"{n / 1e6:.1f}M values"]  # fmt: skip
    skip = {"format", "config", "state_dict", "train_config", "val_metrics"}
    lines.append("  " + ", ".join(f"{k}={v}" for k, v in obj.items() if k not in skip))
    if obj.get("val_metrics"):
        lines.append("  held-out: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                  for k, v in obj["val_metrics"].items()}))  # fmt: skip
    return lines, sd
