"""`marlin pretrain`: adversarial masked-autoencoder pretraining, from one CPU to a multi-node torchrun job.

    marlin pretrain --config marlin_vit_small.yaml --data /data/clips --out runs/s1     # official or native YAML
    marlin pretrain --config marlin_vit_tiny --data synthetic max_steps=200 mask.strategy=tube
    torchrun --nproc_per_node 8 -m marlin.cli pretrain --config cfg.yaml --data ... --resume auto
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        -m marlin.cli pretrain --config cfg.yaml --data ...                           # on every node
    marlin pretrain --export-from runs/s1/checkpoints/last.pt --out runs/s1             # write the model exports

Trailing `dotted.key=value` arguments override any config field (see `marlin.train.config`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("marlin")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=3e-4")
    p.add_argument("--config", help="native or official YAML file, or a registered model name (default ViT-B)")
    p.add_argument("--data", help="'synthetic', or video directories / globs / files, comma-separated")
    p.add_argument(
        "--val-data",
        help="held-out clips for the reconstruction error: 'auto' (the val split of the "
        "--data stores), 'none', a store or videos",
    )
    p.add_argument("--out", help="run directory (checkpoints, metrics.jsonl, images, exports)")
    p.add_argument("--resume", nargs="?", const="auto", help="continue from a checkpoint ('auto' or no value: "
                   "OUT/checkpoints/last.pt when present)")  # fmt: skip
    p.add_argument("--init", help="start from a VideoMAE or marlin checkpoint (weights only)")
    p.add_argument("--max-steps", type=int, help="optimiser steps (overrides epochs)")
    p.add_argument("--stop-at", type=int, help="end this session at this step, checkpoint saved; the schedule still "
                   "spans the whole run and --resume goes on")  # fmt: skip
    p.add_argument("--epochs", type=float)
    p.add_argument("--batch-size", type=int, help="per process and micro-step")
    p.add_argument("--accum", type=int, help="gradient accumulation micro-steps per optimiser step")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], help="auto (default): bf16 where bf16 is native")
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--workers", type=int, help="DataLoader workers per process")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute encoder activations in backward")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block (GPUs)")
    p.add_argument("--seed", type=int)
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--export-from", metavar="CHECKPOINT", help="only export a training checkpoint's model to OUT")


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """The options as ``key=value`` overrides. Overrides are parsed as YAML, so text values (paths) are written as
    quoted YAML strings: a path holding ``: ``, ``#``, brackets or a newline stays the path it was."""
    import json

    pairs = [
        ("data.source", args.data), ("val.source", args.val_data), ("out_dir", args.out), ("init", args.init),
        ("max_steps", args.max_steps), ("stop_at", args.stop_at),
        ("epochs", args.epochs), ("batch_size", args.batch_size), ("accum_steps", args.accum),
        ("precision", args.precision), ("device", args.device), ("data.num_workers", args.workers),
        ("seed", args.seed), ("grad_checkpointing", True if args.grad_checkpointing else None),
        ("compile", True if args.compile else None),
    ]  # fmt: skip
    return [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in pairs if v is not None]


def run(args: argparse.Namespace) -> int:
    from marlin.train.config import load_config

    try:
        if args.export_from:
            return _export(args)
        overrides = list(args.overrides)
        if args.resume and "=" in args.resume and not Path(args.resume).exists():
            overrides.insert(0, args.resume)  # `--resume key=value`: a bare --resume followed by an override
            args.resume = "auto"
        if args.resume and not args.config and args.out and (Path(args.out) / "config.yaml").is_file():
            args.config = str(Path(args.out) / "config.yaml")  # `--out RUN --resume`: the run's own config
            log.info("resuming with the run's config %s (and the options given now)", args.config)
        cfg = load_config(args.config, [*_flag_overrides(args), *overrides])
        if args.print_config:
            sys.stdout.write(cfg.to_yaml())
            return 0
        from marlin.train.pretrain import NonFiniteLossError, train

        try:
            result = train(cfg, resume=args.resume)
        except NonFiniteLossError as e:
            print(f"marlin pretrain: {e}", file=sys.stderr)
            return 3
        if result.stopped_by:  # SIGINT / SIGTERM: checkpoint saved; exit as the shell reports a signal
            return 128 + result.stopped_by
    except (ValueError, FileNotFoundError) as e:
        print(f"marlin pretrain: {e}", file=sys.stderr)
        return 2
    return 0


def _export(args: argparse.Namespace) -> int:
    from marlin.train.state import export_checkpoint

    out = Path(args.out) if args.out else Path(args.export_from).resolve().parent.parent
    for kind, path in export_checkpoint(args.export_from, out / "export").items():
        print(f"{kind}: {path}")
    return 0
