"""`marlin extract INPUT... -o OUT`: features for many videos, resumable, one .npy per video plus index.csv."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from marlin.commands.options import add_model_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="video files, folders (recursive), globs (quote them) or CSV manifests "
                                             "with a 'path' column")  # fmt: skip
    p.add_argument("-o", "--out", required=True, type=Path, help="output folder (mirrors the input tree)")
    add_model_arguments(p)
    p.add_argument("--crop-face", action="store_true", help="detect, track and crop the face (in-the-wild video)")
    p.add_argument("--all-faces", action="store_true", help="with --crop-face: one feature file per face track")
    p.add_argument("--resize", action="store_true", help="squash non-square / non-224 frames instead of failing")
    p.add_argument("--sample-rate", type=int, default=2, help="take every N-th frame (default: %(default)s)")
    p.add_argument("--stride", type=int, default=16, help="window step in sampled frames (default: %(default)s)")
    p.add_argument("--reduction", choices=("none", "mean", "max"), default="none", help="pool over windows")
    p.add_argument("--keep-seq", action="store_true", help="keep all tokens per window: [windows, 1568, D]")
    p.add_argument("--batch-size", type=int, default=8, help="windows per encoder call, across videos")
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16 autocast (fast only on CPUs with AVX512-BF16/AMX, or GPUs)",
    )
    p.add_argument("--workers", type=int, default=1, help="decode/detect processes beside the model (0: inline)")
    p.add_argument("--device", default="cpu", help="torch device for the encoder (cpu, cuda, cuda:1, ...)")
    p.add_argument("--overwrite", action="store_true", help="recompute videos whose output exists")
    p.add_argument("--preview", type=Path, metavar="DIR", help="write a contact sheet PNG of the crops per video")
    p.add_argument("--combined", type=Path, metavar="FILE", help="also write all features to one .npz/.safetensors")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from marlin.data.sources import collect_inputs
    from marlin.models.model import from_spec
    from marlin.video.extract import ExtractOptions, extract_many, write_combined

    inputs = collect_inputs(args.inputs)
    if not inputs:
        print("no video found in the given inputs", file=sys.stderr)
        return 2
    model = from_spec(args.model, random_init=args.random_init).to(args.device).eval()
    opts = ExtractOptions(
        crop_face=args.crop_face, sample_rate=args.sample_rate, stride=args.stride, reduction=args.reduction,
        keep_seq=args.keep_seq, batch_size=args.batch_size, dtype=args.dtype, workers=args.workers,
        all_faces=args.all_faces, resize=args.resize, overwrite=args.overwrite, preview_dir=args.preview,
        progress=not args.no_progress,
    )  # fmt: skip
    summary = extract_many(model, inputs, args.out, opts)
    print_summary(summary)
    if args.combined:
        print(f"combined features: {write_combined(args.combined, summary, args.out)}")
    return 1 if summary.failed else 0


def print_summary(summary) -> None:  # noqa: ANN001
    counts = ", ".join(f"{v} {k}" for k, v in sorted(summary.counts().items()))
    t = summary.timings
    print(
        f"{len(summary.results)} inputs: {counts}; {summary.seconds:.1f} s "
        f"(decode {t.decode:.1f} s, detect {t.detect:.1f} s, crop {t.crop:.1f} s, encode {t.encode:.1f} s)"
    )
    print(f"index: {summary.index_path}")
    for r in summary.failed:
        print(f"  {r.status}: {r.error}", file=sys.stderr)
