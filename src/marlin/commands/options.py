"""Options shared by several commands, so that one option name means one thing everywhere.

``--sample-rate`` is always the distance between the frames of a clip (the official ``sample_rate``) and ``--stride``
always the step between extraction windows (``marlin extract``); ``--model`` / ``--random-init`` always pick the
encoder the same way.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_model_arguments(p: argparse.ArgumentParser | Any) -> None:
    p.add_argument("--model", default="marlin_vit_base_ytf",
                   help="registered name (released weights are downloaded once) or checkpoint path "
                        "(default: %(default)s)")  # fmt: skip
    p.add_argument(
        "--random-init",
        action="store_true",
        help="use the named architecture untrained (offline smoke tests; features are meaningless)",
    )


def add_sample_rate(p: argparse.ArgumentParser, default: int = 2) -> None:
    """``--sample-rate N`` (frames between clip frames), and the old spelling ``--stride`` as a clear error."""
    p.add_argument("--sample-rate", type=int, default=default,
                   help="frames between the frames of a clip (default: %(default)s)")  # fmt: skip
    p.add_argument("--stride", action=_Renamed, new="--sample-rate", help=argparse.SUPPRESS)


class _Renamed(argparse.Action):
    """An option that was renamed: using it stops with a one-line message naming the new spelling."""

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", **kwargs)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: Any = None) -> None:
        parser.error(f"{option_string} is now {self.new} here (frames between clip frames); "
                     "--stride means the step between extraction windows, as in `marlin extract`")  # fmt: skip


def add_video_run_arguments(p: argparse.ArgumentParser, defaults: Any, model_file: str) -> None:
    """The options every fixed-step run over videos with sound has (``sync-train``, ``lipsync-train``): inputs, the
    held-out set, the encoder, the run folder (holding `model_file`), framing, steps and the optimiser basics;
    `defaults` is the command's config dataclass (a :class:`marlin.train.steprun.VideoRunConfig`)."""
    d = defaults
    p.add_argument("inputs", nargs="+", help="training videos with sound: files, folders, globs, CSV lists or marlin "
                   "prepare stores (STORE, STORE#train, STORE#val: the items whose video has sound)")  # fmt: skip
    p.add_argument("--val", nargs="+", default=[], help="held-out videos (default: --val-fraction of the inputs)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help="(default: %(default)s)")
    add_model_arguments(p)
    p.add_argument("--out", required=True, help=f"run folder: {model_file}, last.pt, results.json")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--encoder-lr-scale", type=float, default=d.encoder_lr_scale, help="the encoder's lr = lr x this "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--no-crop-face", action="store_true", help="the videos are face crops already (centre crop)")
    p.add_argument("--detector", default=d.detector, help="face detector (default: %(default)s)")
    p.add_argument("--fps", type=float, default=d.fps, help="frame rate the mel windows are sized for "
                   "(default: %(default)s)")  # fmt: skip
    for name, help_text in (("steps", "optimiser steps"), ("batch-size", "items per process and step"), ("lr", ""),
                            ("warmup-steps", ""), ("weight-decay", ""), ("workers", "DataLoader processes"),
                            ("seed", ""), ("save-every", "steps between last.pt writes"),
                            ("val-every", "steps between validations"), ("log-every", "")):  # fmt: skip
        default = getattr(d, name.replace("-", "_"))
        p.add_argument(f"--{name}", type=type(default), default=default, help=f"{help_text} (default: %(default)s)")
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=d.precision)


def video_run_fields(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The :class:`marlin.train.steprun.VideoRunConfig` fields of parsed :func:`add_video_run_arguments` options,
    the inputs expanded (store items without sound are left out, and `command` says so on stderr)."""
    import sys

    from marlin.sync.data import sync_inputs

    videos, skipped = sync_inputs(args.inputs)
    val, skipped_val = sync_inputs(args.val) if args.val else ([], [])
    if skipped or skipped_val:
        print(f"marlin {command}: {len(skipped) + len(skipped_val)} store items have no sound and are left out "
              f"(e.g. {(skipped or skipped_val)[0]})", file=sys.stderr)  # fmt: skip
    return dict(videos=tuple(videos), val_videos=tuple(val), val_fraction=args.val_fraction, model=args.model,
                random_init=args.random_init, encoder_lr_scale=args.encoder_lr_scale, fps=args.fps,
                crop_face=not args.no_crop_face, detector=args.detector, steps=args.steps,
                batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                weight_decay=args.weight_decay, workers=args.workers, seed=args.seed, out=args.out,
                device=args.device, precision=args.precision, save_every=args.save_every,
                val_every=args.val_every, log_every=args.log_every)  # fmt: skip


def report_run(result: Any, what: str) -> int:
    """Print how a fixed-step run ended (its held-out metrics and the `what` file it wrote); the exit code: 130 when
    a signal stopped it (resumable), else 0."""
    if result.stopped_by:
        print(f"stopped at step {result.step}; continue with --resume")
        return 130
    if result.val:
        print("val: " + ", ".join(f"{k} {v:.4f}" for k, v in result.val.items()))
    if result.checkpoint is not None:
        print(f"{what}: {result.checkpoint}")
    return 0
