"""`marlin crop INPUT... -o OUT`: face-cropped square H.264 videos (dataset preparation), resumable."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="video files, folders (recursive), globs or CSV manifests")
    p.add_argument("-o", "--out", required=True, type=Path, help="output folder (mirrors the input tree, .mp4)")
    p.add_argument("--size", type=int, default=224, help="crop side in pixels (default: %(default)s)")
    p.add_argument("--all-faces", action="store_true", help="one video per face track (<name>.face<k>.mp4)")
    p.add_argument("--detector", default="mediapipe", choices=("mediapipe", "haar"))
    p.add_argument("--crf", type=int, default=18, help="H.264 quality, lower is better (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="redo videos whose output exists")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from marlin.data.sources import collect_inputs
    from marlin.face import NoFaceError
    from marlin.face.detect import create_detector
    from marlin.video.extract import output_paths
    from marlin.video.faces import iter_face_crops, plan_face_crops
    from marlin.video.io import probe_video, write_video

    inputs = collect_inputs(args.inputs)
    if not inputs:
        print("no video found in the given inputs", file=sys.stderr)
        return 2
    outputs = {p: o.with_suffix(".mp4") for p, o in output_paths(inputs, args.out).items()}
    failures, done, skipped = [], 0, 0
    with create_detector(args.detector) as det:
        for path in tqdm(inputs, unit="video", desc="crop", disable=args.no_progress):
            out = outputs[path]
            if not args.overwrite and (out.exists() or any(out.parent.glob(f"{out.stem}.face*.mp4"))):
                skipped += 1
                continue
            try:
                fps = probe_video(path).fps or 25
                plans = plan_face_crops(path, det, all_faces=args.all_faces)
                for k, plan in enumerate(plans):
                    target = out if not args.all_faces else out.with_name(f"{out.stem}.face{k}.mp4")
                    target.parent.mkdir(parents=True, exist_ok=True)
                    crops = (c for _, c in iter_face_crops(plan, size=args.size))
                    write_video(target, crops, fps=fps, crf=args.crf)  # atomic: temp file, then rename
                done += 1
            except (NoFaceError, ValueError, OSError, RuntimeError) as e:
                failures.append(f"{e}".splitlines()[0] if str(e) else f"{path}: {type(e).__name__}")
    print(f"{len(inputs)} inputs: {done} cropped, {skipped} skipped (exist), {len(failures)} failed -> {args.out}")
    for f in failures:
        print(f"  failed: {f}", file=sys.stderr)
    return 1 if failures else 0
