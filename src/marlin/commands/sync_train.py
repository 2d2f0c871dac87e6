"""`marlin sync-train`: train the lip-sync expert (MARLIN visual stream + mel audio stream) on videos with sound.

    marlin sync-train /data/grid_s1/videos --out runs/sync --model marlin_vit_small_ytf --steps 3000
    marlin sync-train train.csv --val val.csv --out runs/sync --freeze-encoder
    marlin sync-train crops/ --no-crop-face --out runs/sync --resume
    marlin sync-train STORE#train --val STORE#val --out runs/sync       # marlin prepare stores: crops made once
    marlin sync-train videos/ --visual pixels --model marlin_vit_tiny --out runs/sync_pixels   # raw-pixel baseline
    torchrun --nproc_per_node 4 -m marlin.cli sync-train videos/ --out runs/sync

Writes OUT/expert.pt (read by `marlin sync --model`), OUT/last.pt (resume point) and OUT/results.json. See
`marlin.sync.train`.
"""

from __future__ import annotations

import argparse
import sys

from marlin.utils.errors import one_line


def add_arguments(p: argparse.ArgumentParser) -> None:
    from marlin.commands.options import add_model_arguments
    from marlin.sync.train import SyncTrainConfig

    d = SyncTrainConfig()
    p.add_argument("inputs", nargs="+", help="training videos with sound: files, folders, globs, CSV lists or marlin "
                   "prepare stores (STORE, STORE#train, STORE#val: the items whose video has sound)")  # fmt: skip
    p.add_argument("--val", nargs="+", default=[], help="held-out videos (default: --val-fraction of the inputs)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help="(default: %(default)s)")
    add_model_arguments(p)
    p.add_argument("--out", required=True, help="run folder: expert.pt, last.pt, results.json")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--freeze-encoder", action="store_true", help="train the two heads and the audio net only")
    p.add_argument("--visual", choices=("encoder", "pixels"), default=d.visual, help="visual stream: the encoder, or "
                   "the raw-pixel baseline (--model then gives only the sizes; default: %(default)s)")  # fmt: skip
    p.add_argument("--encoder-lr-scale", type=float, default=d.encoder_lr_scale, help="the encoder's lr = lr x this "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--no-crop-face", action="store_true", help="the videos are face crops already (centre crop)")
    p.add_argument("--detector", default=d.detector, help="face detector (default: %(default)s)")
    p.add_argument("--fps", type=float, default=d.fps, help="frame rate the mel windows are sized for "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--embed-dim", type=int, default=d.embed_dim, help="(default: %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="optimiser steps (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="clips per process and step "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--negatives", type=int, default=d.negatives, help="shifted audio windows per clip "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--min-shift", type=int, default=d.min_shift, help="(frames; default: %(default)s)")
    p.add_argument("--max-shift", type=int, default=d.max_shift, help="(frames; default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="(default: %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="(default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="(default: %(default)s)")
    p.add_argument("--workers", type=int, default=d.workers, help="DataLoader processes (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=d.precision)
    p.add_argument("--save-every", type=int, default=d.save_every, help="steps between last.pt writes "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--val-every", type=int, default=d.val_every, help="steps between validations "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--log-every", type=int, default=d.log_every, help="(default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from marlin.sync.data import sync_inputs
    from marlin.sync.train import SyncTrainConfig, sync_train

    try:
        videos, skipped = sync_inputs(args.inputs)
        val, skipped_val = sync_inputs(args.val) if args.val else ([], [])
        if skipped or skipped_val:
            print(f"marlin sync-train: {len(skipped) + len(skipped_val)} store items have no sound and are left out "
                  f"(e.g. {(skipped or skipped_val)[0]})", file=sys.stderr)  # fmt: skip
        cfg = SyncTrainConfig(
            videos=tuple(videos), val_videos=tuple(val), val_fraction=args.val_fraction, model=args.model,
            random_init=args.random_init, visual=args.visual, freeze_encoder=args.freeze_encoder,
            encoder_lr_scale=args.encoder_lr_scale,
            embed_dim=args.embed_dim, fps=args.fps, crop_face=not args.no_crop_face, detector=args.detector,
            steps=args.steps, batch_size=args.batch_size, negatives=args.negatives, min_shift=args.min_shift,
            max_shift=args.max_shift, lr=args.lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
            workers=args.workers, seed=args.seed, out=args.out, device=args.device, precision=args.precision,
            save_every=args.save_every, val_every=args.val_every, log_every=args.log_every,
        )  # fmt: skip
        result = sync_train(cfg, resume=args.resume)
    except (ValueError, OSError, RuntimeError, ImportError) as e:
        print(f"marlin sync-train: {one_line(e)}", file=sys.stderr)
        return 2
    if result.stopped_by:
        print(f"stopped at step {result.step}; continue with --resume")
        return 130
    if result.val:
        print("val: " + ", ".join(f"{k} {v:.4f}" for k, v in result.val.items()))
    if result.checkpoint is not None:
        print(f"expert: {result.checkpoint}")
    return 0
