"""`marlin demo`: the whole feature pipeline on a real face clip generated offline, with a crop preview and report."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--out", type=Path, default=Path("marlin-demo"), help="output folder (default: %(default)s)")
    p.add_argument("--model", default="marlin_vit_small_ytf",
                   help="name or checkpoint; released weights are used when cached or downloadable, else the "
                        "architecture is built untrained (default: %(default)s)")  # fmt: skip
    p.add_argument("--video", type=Path, help="use this video instead of the generated sample clip")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from marlin.commands.extract import print_summary
    from marlin.models.model import from_spec
    from marlin.video.extract import ExtractOptions, extract_many
    from marlin.viz.sample import make_sample_clip

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    video = args.video or make_sample_clip(out / "sample_face.mp4")
    print(f"input video: {video}")
    try:
        model, weights = from_spec(args.model), "released/checkpoint weights"
    except (ConnectionError, ValueError) as e:
        print(f"note: {e}\nnote: continuing with an untrained {args.model} (shapes and speed are real, features not)")
        model, weights = from_spec(args.model, random_init=True), "untrained (random init)"
    opts = ExtractOptions(crop_face=True, workers=0, batch_size=4, preview_dir=out / "preview", overwrite=True)
    t0 = time.perf_counter()
    summary = extract_many(model, [Path(video)], out / "features", opts)
    wall = time.perf_counter() - t0
    print_summary(summary)
    r = summary.results[0]
    if r.status != "ok":
        return 1
    feats = np.load(r.output)
    clips_per_s = r.windows / max(summary.timings.encode, 1e-9)
    report = "\n".join([
        f"model: {model.config.name} ({weights}), {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters",
        f"video: {video} -> {r.frames} frames, {r.windows} windows, {r.faceless_frames} face-less frames",
        f"features: {r.output} shape {tuple(feats.shape)} (windows x dim), sd {feats.std():.3f}",
        f"throughput: {clips_per_s:.2f} clips/s in the encoder, {wall:.1f} s end to end",
        f"crop preview: {out / 'preview'}",
        f"index: {summary.index_path}",
    ])  # fmt: skip
    (out / "report.txt").write_text(report + "\n")
    print(report)
    print(f"report: {out / 'report.txt'}")
    return 0
