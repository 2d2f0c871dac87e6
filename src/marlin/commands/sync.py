"""`marlin sync`: audio-visual offset, LSE-D and LSE-C of videos, with a trained lip-sync expert.

    marlin sync clip.mp4 --model runs/sync/expert.pt
    marlin sync videos/ --model runs/sync/expert.pt --json sync.json --csv sync.csv --plot sync.png

Per video: the offset in frames (> 0: the sound is late by that many frames), LSE-D (lower: better sync) and LSE-C
(higher: a more confident offset), overall and per window (JSON). See `marlin.sync.score`.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys

from marlin.utils.errors import one_line

CSV_FIELDS = ("path", "offset", "lse_d", "lse_c", "n_frames", "fps", "windows", "padded", "error")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="videos with sound: files, folders, globs, CSV lists or marlin prepare "
                   "stores (STORE, STORE#val)")  # fmt: skip
    p.add_argument("--model", required=True, help="lip-sync expert (expert.pt from marlin sync-train)")
    p.add_argument("--max-offset", type=int, default=15, help="offsets searched: -N..N frames (default: %(default)s)")
    p.add_argument("--stride", type=int, default=1, help="frames between scored windows (default: %(default)s)")
    p.add_argument("--crop-face", choices=("auto", "yes", "no"), default="auto",
                   help="crop around the face (auto: as the expert was trained)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=16, help="(default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--json", help="write every score, with the distances per offset and per window, here")
    p.add_argument("--csv", help="write one row per video here")
    p.add_argument("--plot", help="PNG of mean distance vs offset, one line per video")


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({**r, "windows": len(r.get("windows", []))} if "offset" in r else r)
    return buf.getvalue()


def run(args: argparse.Namespace) -> int:
    import torch

    from marlin.sync.data import sync_inputs
    from marlin.sync.expert import load_expert
    from marlin.sync.score import plot_distances, score_video
    from marlin.utils.fileio import atomic_write_text, json_safe

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    expert = load_expert(args.model, map_location=device)
    crop = bool(expert.meta.get("crop_face", True)) if args.crop_face == "auto" else args.crop_face == "yes"
    detector = expert.meta.get("detector", "mediapipe")
    scores, rows, failed = [], [], 0
    paths, skipped = sync_inputs(args.inputs)
    if skipped:
        print(f"marlin sync: {len(skipped)} store items have no sound and are left out (e.g. {skipped[0]})",
              file=sys.stderr)  # fmt: skip
    for path in paths:
        try:
            s = score_video(expert, path, max_offset=args.max_offset, stride=args.stride, batch_size=args.batch_size,
                            crop_face=crop, detector=detector, device=device)  # fmt: skip
        except (ValueError, OSError) as e:
            failed += 1
            print(f"marlin sync: {one_line(e)}", file=sys.stderr)
            rows.append({"path": str(path), "error": one_line(e)})
            continue
        scores.append(s)
        rows.append(s.to_dict())
        print(f"{path}: offset {s.offset:+d} frames, LSE-D {s.lse_d:.4f}, LSE-C {s.lse_c:.4f}"
              f"{' (short video: audio padded)' if s.padded else ''}")  # fmt: skip
    if args.json:
        atomic_write_text(args.json, json.dumps(json_safe({"model": args.model, "videos": rows}), indent=2) + "\n")
    if args.csv:
        atomic_write_text(args.csv, _csv_text(rows))
    if args.plot and scores:
        plot_distances(scores, args.plot)
    return 2 if failed and not scores else (1 if failed else 0)
