"""`marlin prepare SOURCE... --out STORE`: face crops + parse maps of many videos, for pretraining."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (
        "examples:\n"
        "  marlin prepare videos/ --out store/ --workers 2\n"
        "  marlin prepare frame_images_DB/ --out ytf_store/ --val-fraction 0.05      # YouTube Faces, group = person\n"
        "  marlin prepare crops/ --out store/ --no-crop-face --no-parse               # pre-cropped, no fasking\n"
        "  marlin prepare grid/s1/videos --out grid/ --group-regex 'grid/(s\\d+)/'     # group = speaker\n"
        "\n"
        "The split is by identity: whole groups go to val. The group is the first folder below the source folder\n"
        "(<person>/<clip>.mp4), the file stem for a flat folder, a CSV 'group' column, or what --group-regex\n"
        "captures from the path (named group 'group', else group 1). A single group (one speaker) cannot be split by\n"
        "identity: everything goes to train and a warning says so; a within-speaker val set needs a regex over\n"
        "something else (e.g. the sentence), which is then not identity-disjoint.\n"
        "\n"
        "Resumable: rerun the same command after a crash or kill; finished items are skipped. Exit status 1 when any\n"
        "item failed (listed in STORE/errors.csv), 0 otherwise."
    )
    p.add_argument("sources", nargs="+", help="video files, folders (recursive), YouTube Faces frame folders, or CSV "
                                              "manifests (a 'path' column; optional 'group' and 'split')")  # fmt: skip
    p.add_argument("-o", "--out", required=True, type=Path, help="store folder (created; reused to resume)")
    p.add_argument("--model", default="marlin_vit_base_ytf", help="registered model whose img_size sets the crop "
                                                                   "size (default: %(default)s)")  # fmt: skip
    p.add_argument("--size", type=int, default=None, help="crop side in pixels (default: the model's img_size)")
    p.add_argument("--crop-face", action=argparse.BooleanOptionalAction, default=True,
                   help="detect, track and crop the face; --no-crop-face for inputs already cropped (centre square "
                        "resized to --size)")  # fmt: skip
    p.add_argument("--parse", action=argparse.BooleanOptionalAction, default=True,
                   help="store LaPa face-parse maps (needed for fasking); --no-parse for tube/random/frame "
                        "pretraining only")  # fmt: skip
    p.add_argument("--frame-step", type=int, default=1, help="keep every N-th frame (default: %(default)s); the "
                                                               "dataset stride must be a multiple of it")  # fmt: skip
    p.add_argument("--max-frames", type=int, default=None, help="keep at most N frames per video (default: all)")
    p.add_argument("--layout", choices=("auto", "videos", "frames"), default="auto",
                   help="folders hold videos, or frame-image folders (YouTube Faces); auto: videos if any")  # fmt: skip
    p.add_argument("--group-regex", default=None, help="identity key from the source path (see below)")
    p.add_argument("--val-fraction", type=float, default=0.0, help="fraction of items, by whole groups, in the "
                                                                    "val split (default: %(default)s)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the split (default: %(default)s)")
    p.add_argument("--codec", choices=("jpeg", "raw"), default="jpeg",
                   help="crop storage: jpeg (~13 KB a 224 px frame) or raw uint8 (150 KB, no decoding)")  # fmt: skip
    p.add_argument("--jpeg-quality", type=int, default=95)
    p.add_argument("--detector", choices=("mediapipe", "haar"), default="mediapipe")
    p.add_argument(
        "--preview",
        type=Path,
        metavar="DIR",
        help="write one PNG per item prepared in this run: crops with the face parse overlaid",
    )
    p.add_argument("--workers", type=int, default=1, help="processes (0: in this process; default: %(default)s)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from marlin.data.prepare import PrepareSettings, collect_sources, prepare_store
    from marlin.data.store import StoreError
    from marlin.models.registry import get_config

    try:
        size = args.size if args.size is not None else get_config(args.model).img_size
        settings = PrepareSettings(
            size=size, crop_face=args.crop_face, parse=args.parse, frame_step=args.frame_step,
            max_frames=args.max_frames, video_codec=args.codec, parse_codec="zlib" if args.codec == "jpeg" else "raw",
            jpeg_quality=args.jpeg_quality, detector=args.detector,
        )  # fmt: skip
        sources = collect_sources(args.sources, layout=args.layout, group_regex=args.group_regex)
        if not 0.0 <= args.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), found {args.val_fraction}")
    except (ValueError, KeyError) as e:
        print(f"marlin prepare: {e}", file=sys.stderr)
        return 2
    print(f"{len(sources)} sources -> {args.out} (crops {size} px, crop_face={args.crop_face}, parse={args.parse}, "
          f"frame_step={args.frame_step}, max_frames={args.max_frames}, workers={args.workers})")  # fmt: skip
    try:
        summary = prepare_store(
            sources, args.out, settings, workers=args.workers, val_fraction=args.val_fraction, seed=args.seed,
            progress=not args.no_progress,
        )  # fmt: skip
    except StoreError as e:
        print(f"marlin prepare: {e}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{v} {k}" for k, v in sorted(summary.counts.items()))
    frames = sum(r.n_frames for r in summary.results if r.status == "ok")
    print(f"{len(summary.results)} sources: {counts}; {frames} frames written in {summary.seconds:.1f} s")
    print(f"store: {summary.n_items} items ({summary.n_train} train, {summary.n_val} val), "
          f"{summary.bytes / 2**20:.1f} MiB; manifest {args.out / 'manifest.csv'}")  # fmt: skip
    for r in summary.failed:
        print(f"  {r.status}: {r.error if r.source in r.error else f'{r.source}: {r.error}'}", file=sys.stderr)
    if args.preview is not None:
        from marlin.viz.preview import write_store_previews

        ids = [r.id for r in summary.results if r.status == "ok"]
        written = write_store_previews(args.out, args.preview, ids=ids)
        print(f"previews: {len(written)} PNGs in {args.preview}")
    if summary.failed:
        print(f"{len(summary.failed)} failed (see {args.out / 'errors.csv'}); rerun to retry them", file=sys.stderr)
    return 1 if summary.failed else 0
