"""`marlin lipsync-train`: train the lip generator (MARLIN face encoder + audio + decoder; Wav2Lip-style) on videos
with sound, with the sync loss of a `marlin sync-train` expert.

    marlin lipsync-train videos/ --out runs/lipsync --model marlin_vit_small_ytf --expert runs/sync/expert.pt
    marlin lipsync-train STORE#train --val STORE#val --out runs/lipsync --expert runs/sync/expert.pt --resume
    marlin lipsync-train crops/ --no-crop-face --out runs/lipsync --sync-weight 0      # L1 only
    torchrun --nproc_per_node 4 -m marlin.cli lipsync-train videos/ --out runs/lipsync --expert EXPERT

Writes OUT/generator.pt (read by `marlin lipsync --model`), OUT/last.pt (resume point) and OUT/results.json. See
`marlin.lipsync.train`.
"""

from __future__ import annotations

import argparse
import sys

from marlin.utils.errors import one_line


def add_arguments(p: argparse.ArgumentParser) -> None:
    from marlin.commands.options import add_model_arguments
    from marlin.lipsync.train import LipsyncTrainConfig

    d = LipsyncTrainConfig()
    p.add_argument("inputs", nargs="+", help="training videos with sound: files, folders, globs, CSV lists or marlin "
                   "prepare stores (STORE, STORE#train: the items whose video has sound)")  # fmt: skip
    p.add_argument("--val", nargs="+", default=[], help="held-out videos (default: --val-fraction of the inputs)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help="(default: %(default)s)")
    add_model_arguments(p)
    p.add_argument("--expert", help="lip-sync expert (expert.pt from marlin sync-train): its P(in sync) of the drawn "
                   "mouths is reported, and with --sync-weight > 0 it is a loss")  # fmt: skip
    p.add_argument("--sync-weight", type=float, default=d.sync_weight, help="loss = (1 - w) pixel loss + w sync loss "
                   "(default: %(default)s; see marlin.lipsync.train for why not Wav2Lip's 0.03)")  # fmt: skip
    p.add_argument("--pixel-loss", choices=("mse", "l1"), default=d.pixel_loss, help="(default: %(default)s)")
    p.add_argument("--out", required=True, help="run folder: generator.pt, last.pt, results.json")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--encoder-lr-scale", type=float, default=d.encoder_lr_scale, help="the encoder's lr = lr x this "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--no-crop-face", action="store_true", help="the videos are face crops already (centre crop)")
    p.add_argument("--detector", default=d.detector, help="face detector (default: %(default)s)")
    p.add_argument("--fps", type=float, default=d.fps, help="frame rate the mel windows are sized for "
                   "(default: %(default)s)")  # fmt: skip
    for name, help_text in (("steps", "optimiser steps"), ("batch-size", "windows per process and step"),
                            ("lr", None), ("warmup-steps", None), ("weight-decay", None),
                            ("workers", "DataLoader processes"), ("seed", None),
                            ("save-every", "steps between last.pt writes"), ("val-every", "steps between validations"),
                            ("log-every", None)):  # fmt: skip
        default = getattr(d, name.replace("-", "_"))
        p.add_argument(f"--{name}", type=type(default), default=default,
                       help=f"{help_text + ' ' if help_text else ''}(default: %(default)s)")  # fmt: skip
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default=d.precision)


def run(args: argparse.Namespace) -> int:
    from marlin.lipsync.train import LipsyncTrainConfig, lipsync_train
    from marlin.sync.data import sync_inputs

    try:
        videos, skipped = sync_inputs(args.inputs)
        val, skipped_val = sync_inputs(args.val) if args.val else ([], [])
        if skipped or skipped_val:
            print(f"marlin lipsync-train: {len(skipped) + len(skipped_val)} store items have no sound and are left "
                  f"out (e.g. {(skipped or skipped_val)[0]})", file=sys.stderr)  # fmt: skip
        cfg = LipsyncTrainConfig(
            videos=tuple(videos), val_videos=tuple(val), val_fraction=args.val_fraction, model=args.model,
            random_init=args.random_init, expert=args.expert, sync_weight=args.sync_weight, pixel_loss=args.pixel_loss,
            encoder_lr_scale=args.encoder_lr_scale, fps=args.fps, crop_face=not args.no_crop_face,
            detector=args.detector, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
            warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, workers=args.workers, seed=args.seed,
            out=args.out, device=args.device, precision=args.precision, save_every=args.save_every,
            val_every=args.val_every, log_every=args.log_every,
        )  # fmt: skip
        result = lipsync_train(cfg, resume=args.resume)
    except (ValueError, OSError, RuntimeError, ImportError) as e:
        print(f"marlin lipsync-train: {one_line(e)}", file=sys.stderr)
        return 2
    if result.stopped_by:
        print(f"stopped at step {result.step}; continue with --resume")
        return 130
    if result.val:
        print("val: " + ", ".join(f"{k} {v:.4f}" for k, v in result.val.items()))
    if result.checkpoint is not None:
        print(f"generator: {result.checkpoint}")
    return 0
