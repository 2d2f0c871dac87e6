"""`marlin extract INPUT... -o OUT`: features for many videos, resumable, one .npy per video plus index.csv.

Sharded: under ``torchrun`` every rank extracts its shard of the inputs on its own device and rank 0 merges the
shard indexes into ``index.csv``; ``--shard I/N`` runs one shard without a process group (job arrays), and
``marlin extract --merge OUT`` merges afterwards.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from marlin.commands.options import add_model_arguments

if TYPE_CHECKING:
    import torch

    from marlin import Marlin

# Ranks wait for the slowest at the end (extraction shards can differ by hours): far beyond torch's 30 min default.
RANK_TIMEOUT = timedelta(days=7)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", help="video files, folders (recursive), globs (quote them) or CSV manifests "
                                             "with a 'path' column")  # fmt: skip
    p.add_argument("-o", "--out", type=Path, help="output folder (mirrors the input tree); required unless --merge")
    add_model_arguments(p)
    p.add_argument("--crop-face", action="store_true", help="detect, track and crop the face (in-the-wild video)")
    p.add_argument("--all-faces", action="store_true", help="with --crop-face: one feature file per face track")
    p.add_argument("--resize", action="store_true", help="squash non-square / non-224 frames instead of failing")
    p.add_argument("--sample-rate", type=int, default=2, help="take every N-th frame (default: %(default)s)")
    p.add_argument("--stride", type=int, default=16, help="window step in sampled frames (default: %(default)s)")
    p.add_argument("--reduction", choices=("none", "mean", "max"), default="none", help="pool over windows")
    p.add_argument("--keep-seq", action="store_true", help="keep all tokens per window: [windows, 1568, D]")
    p.add_argument("--batch-size", type=int, default=8, help="windows per encoder call, across videos")
    p.add_argument("--compile", action="store_true", help="torch.compile each encoder block (GPUs; the first batch "
                   "of each size compiles)")  # fmt: skip
    p.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16", "fp16", "int8"),
        default="auto",
        help="encoder precision; auto (default): bf16 on GPUs and CPUs with bf16 units, else fp32; int8 (fastest on "
        "CPUs, coarser: it warns) only when asked for (README: Precision)",
    )
    p.add_argument("--min-score", type=float, default=0.6, help="with --crop-face: detections scoring below this "
                   "are not faces (default: %(default)s)")  # fmt: skip
    p.add_argument("--min-face-fraction", type=float, default=0.5, help="with --crop-face: drop windows where the "
                   "face was detected on fewer of the frames (default: %(default)s)")  # fmt: skip
    p.add_argument("--no-verify-faces", action="store_true", help="with --crop-face: skip the face-mesh check of "
                   "each track (README: Face tracks you can trust)")  # fmt: skip
    p.add_argument("--workers", type=int, default=1, help="decode/detect processes beside the model (0: inline)")
    p.add_argument("--device", default="cpu", help="torch device for the encoder (cpu, cuda, cuda:1, ...; under "
                                                   "torchrun 'cuda' is each rank's local GPU)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="recompute videos whose output exists")
    p.add_argument("--preview", type=Path, metavar="DIR", help="write a contact sheet PNG of the crops per video")
    p.add_argument("--combined", type=Path, metavar="FILE", help="also write all features to one .npz/.safetensors")
    p.add_argument("--shard", metavar="I/N", help="extract only shard I of N (from 0): inputs I, I+N, ... of the "
                   "sorted list, indexed in OUT/index.shardI-of-N.csv (job arrays; then --merge)")  # fmt: skip
    p.add_argument("--merge", type=Path, metavar="OUT", help="merge the shard indexes of OUT into OUT/index.csv "
                   "(given the INPUTS too, the ones no shard finished are listed as pending)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true")


def _options(args: argparse.Namespace, shard=None):  # noqa: ANN001, ANN202
    from marlin.video.extract import ExtractOptions
    from marlin.video.faces import FaceChecks

    checks = FaceChecks(min_score=args.min_score, min_face_fraction=args.min_face_fraction,
                        verify=not args.no_verify_faces)  # fmt: skip
    return ExtractOptions(
        crop_face=args.crop_face, sample_rate=args.sample_rate, stride=args.stride, reduction=args.reduction,
        keep_seq=args.keep_seq, batch_size=args.batch_size, dtype=None, workers=args.workers,
        all_faces=args.all_faces, resize=args.resize, overwrite=args.overwrite, preview_dir=args.preview,
        progress=not args.no_progress, shard=shard, face_checks=checks,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from marlin.data.sources import collect_inputs

    if args.merge is not None:
        return _merge(args, collect_inputs(args.inputs) if args.inputs else None)
    if args.out is None:
        raise ValueError("-o/--out: the output folder is required (or --merge OUT to merge shard indexes)")
    inputs = collect_inputs(args.inputs)
    if not inputs:
        print("no video found in the given inputs", file=sys.stderr)
        return 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _run_rank(args, inputs)
    from marlin.video.extract import extract_many, write_combined
    from marlin.video.shard import Shard

    shard = Shard.parse(args.shard) if args.shard else None
    if shard is not None and args.combined:
        raise ValueError(f"--combined with --shard: a shard has part of the features; once every shard is done run "
                         f"`marlin extract --merge {args.out} --combined {args.combined}`")  # fmt: skip
    options = _options(args, shard)  # checks the option values before the model loads
    model = _model(args, args.device)
    summary = extract_many(model, inputs, args.out, options)
    print_summary(summary)
    if args.combined:
        print(f"combined features: {write_combined(args.combined, summary, args.out)}")
    return 1 if summary.failed else 0


def _model(args: argparse.Namespace, device: str | torch.device) -> Marlin:
    """The encoder the options ask for, on `device`, ready for inference in ``--dtype`` (compiled with --compile)."""
    from marlin.models.model import from_spec

    model = from_spec(args.model, random_init=args.random_init).to(device).eval().for_inference(args.dtype)
    return model.compile_blocks() if args.compile else model


def _run_rank(args: argparse.Namespace, inputs: list[Path]) -> int:
    """One rank of a torchrun job: extract shard RANK/WORLD_SIZE; rank 0 then merges every rank's rows."""
    from marlin.utils.distributed import barrier, gather_to_main, init_distributed, shutdown_distributed
    from marlin.video.extract import extract_many, index_row
    from marlin.video.shard import Shard, merge_shards

    if args.shard:
        raise ValueError("--shard: not under torchrun, whose ranks split the inputs already (rank R of W is shard R/W)")
    info = init_distributed(args.device, backend="gloo", timeout=RANK_TIMEOUT)  # gloo: only rows are exchanged
    try:
        shard = Shard(info.rank, info.world_size)
        options = _options(args, shard)
        model = _model(args, info.device)
        summary = extract_many(model, inputs, args.out, options)
        print_summary(summary, f"rank {info.rank} (shard {shard}): ")
        gathered = gather_to_main([index_row(r) for r in summary.results])
        if gathered is not None:
            rows = {Shard(rank, info.world_size): r for rank, r in enumerate(gathered)}
            _report_merge(merge_shards(args.out, inputs, rows=rows), args)
        barrier()  # leave together: a rank that exits first can tear down the rendezvous another still needs
        # 0 even when some inputs failed (they are in the index and printed above): torchrun reads a non-zero exit
        # as a crash, restarts the job (--max-restarts) or holds the other nodes in its exit barrier for minutes
        return 0
    finally:
        shutdown_distributed()


def _merge(args: argparse.Namespace, inputs: list[Path] | None) -> int:
    from marlin.video.shard import merge_shards

    if args.out is not None and args.out.resolve() != args.merge.resolve():
        raise ValueError(f"--merge {args.merge} with -o {args.out}: give the folder once, as --merge OUT")
    return _report_merge(merge_shards(args.merge, inputs), args)


def _report_merge(merged, args: argparse.Namespace) -> int:  # noqa: ANN001
    from marlin.video.extract import write_combined

    counts = ", ".join(f"{v} {k}" for k, v in sorted(merged.counts().items()))
    source = f"{len(merged.sources)} shard indexes" if merged.sources else "every rank"
    print(f"merged {source}: {len(merged.results)} inputs: {counts}")
    print(f"index: {merged.index_path}")
    for s in merged.missing:
        print(f"  shard {s} wrote no index (it did not run, or died before it began): rerun it with --shard {s}",
              file=sys.stderr)  # fmt: skip
    for r in merged.pending[:10] + merged.failed:
        print(f"  {r.status}: {r.error}", file=sys.stderr)
    if len(merged.pending) > 10:
        print(f"  ... and {len(merged.pending) - 10} more pending (see the index)", file=sys.stderr)
    if args.combined:
        print(f"combined features: {write_combined(args.combined, merged, merged.index_path.parent)}")
    return 0 if merged.complete else 1


def print_summary(summary, prefix: str = "") -> None:  # noqa: ANN001
    counts = ", ".join(f"{v} {k}" for k, v in sorted(summary.counts().items()))
    t = summary.timings
    print(
        f"{prefix}{len(summary.results)} inputs: {counts}; {summary.seconds:.1f} s "
        f"(decode {t.decode:.1f} s, detect {t.detect:.1f} s, crop {t.crop:.1f} s, encode {t.encode:.1f} s)"
    )
    print(f"{prefix}index: {summary.index_path}")
    for r in summary.failed:
        print(f"  {r.status}: {r.error}", file=sys.stderr)
