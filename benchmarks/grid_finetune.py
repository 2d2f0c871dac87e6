"""Low-data fine-tuning on GRID s1: does a pretrained encoder fine-tune better than a random one? (issue 14)

The protocol MAE-style pretraining is known to help most (fine-tuning with little labelled data), on the clean GRID
protocol: the fixed train / test split of :func:`marlin.evaluate.manifest.grid_protocol_splits` (200 test sentences,
never used for training or any choice; validation = 10% of the training sentences, chosen by ``marlin finetune``).
Stages, each resumable (done work is skipped):

1. ``crops``     every GRID sentence's face crops from a ``marlin prepare`` store (``benchmarks/transfer_curve.py
                 --until stores`` makes it; the protocol's test sentences are its ``val`` split, so pretraining on
                 the store never read them), resized to the encoder's side and written as videos, with a manifest
                 (path, the six word slots, the protocol split).
2. ``finetune``  ``marlin finetune`` per word slot and training fraction, from ``--model`` (pretrained) and from the
                 same architecture untrained (``--random-init``), with one recipe: the whole sentence in one clip
                 (``--sample-rate 4``: 16 frames over 61 of its 75), the same centred clip in training and testing
                 (``--train-clip centre --test-clips 1``: a word slot is a moment in the sentence, which a random
                 clip start moves), the head reading one standardised feature per time step in order (``--pool time
                 --head-norm``; with ``--centre`` each step minus the clip's mean over them), AdamW at ``--lr`` with
                 ``--layer-decay``. README "Does pretraining transfer?" lists
                 the recipes that stayed at chance before this one.
3. ``report``    test accuracy with its 95% bootstrap interval per slot, and where the intervals do not overlap.

    python benchmarks/grid_finetune.py --model runs/transfer_curve/pretrain_marlin/checkpoints/step_1000.pt \
        --fractions 1.0 --slots command adverb --lr 1e-3 --layer-decay 0.5 --epochs 6 --patience 6   # stop 26's run
    python benchmarks/grid_finetune.py --model M --fractions 1.0 --slots command adverb --from report

Needs ../shared/data (or --data) and the GRID store.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("crops", "finetune", "report")
SLOTS = ("command", "color", "preposition", "letter", "digit", "adverb")
INITS = ("pretrained", "random")


def log(msg: str) -> None:
    print(f"[grid_finetune {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stage_crops(args: argparse.Namespace, side: int) -> Path:
    """``crops/<id>.mp4`` (every frame, ``side`` px) and ``manifest.csv``; returns the manifest."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from marlin.data.store import ClipStore
    from marlin.evaluate.manifest import grid_protocol_splits
    from marlin.video.io import write_video

    manifest = args.work / "manifest.csv"
    if manifest.is_file():
        return manifest
    with open(args.data / "grid_s1" / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    splits = grid_protocol_splits(args.data / "grid_s1")
    store = ClipStore(args.store)
    items = {it.id: it for it in store.split(None)}
    missing = [r["video"] for r in rows if Path(r["video"]).stem not in items]
    if missing:
        raise SystemExit(f"{len(missing)} GRID videos are not in {args.store} (e.g. {missing[0]})")
    (args.work / "crops").mkdir(parents=True, exist_ok=True)
    out_rows = []
    for k, (row, split) in enumerate(zip(rows, splits, strict=True)):
        item = items[Path(row["video"]).stem]
        path = args.work / "crops" / f"{item.id}.mp4"
        if not path.is_file():
            v = torch.from_numpy(store.read_video(item, list(range(item.n_frames)))).permute(0, 3, 1, 2).float()
            small = F.interpolate(v, size=(side, side), mode="area").round().clamp(0, 255).byte()
            tmp = path.with_name(path.stem + ".part.mp4")
            write_video(tmp, small.permute(0, 2, 3, 1).numpy().astype(np.uint8))
            os.replace(tmp, path)
        out_rows.append({"path": str(path), **{s: row[s] for s in SLOTS}, "split": split})
        if (k + 1) % 200 == 0:
            log(f"  cropped {k + 1}/{len(rows)} sentences")
    tmp = manifest.with_name("manifest.part.csv")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(out_rows[0]))
        w.writeheader()
        w.writerows(out_rows)
    os.replace(tmp, manifest)
    return manifest


def run_dir(args: argparse.Namespace, init: str, slot: str, fraction: float) -> Path:
    return args.work / "runs" / f"{init}_{slot}_{fraction:g}{'_centred' if args.centre else ''}"


def stage_finetune(args: argparse.Namespace, manifest: Path) -> None:
    """One ``marlin finetune`` per (fraction, slot, init), smallest fraction first; a finished run is skipped."""
    for fraction in sorted(args.fractions):
        for slot in args.slots:
            for init in INITS:
                out = run_dir(args, init, slot, fraction)
                if (out / "results.json").is_file():
                    continue
                cmd = [sys.executable, "-m", "marlin.cli", "finetune", "--model", str(args.model),
                       *(["--random-init"] if init == "random" else []), "--labels", str(manifest),
                       "--label", slot, "--split-col", "split", "--train-fraction", str(fraction),
                       "--sample-rate", "4", "--pool", "time", "--head-norm", *(["--centre"] if args.centre else []),
                       "--train-clip", "centre", "--test-clips", "1", "--lr", str(args.lr), "--layer-decay",
                       str(args.layer_decay), "--epochs", str(args.epochs), "--patience", str(args.patience),
                       "--batch-size", "8", "--workers", "1", "--seed", "0",
                       "--no-train-eval", "--log-every", "0", "--out", str(out)]  # fmt: skip
                t0 = time.time()
                with open(args.work / "finetune.log", "a") as logf:
                    subprocess.run(cmd, check=True, stdout=logf, stderr=subprocess.STDOUT)
                test = json.loads((out / "results.json").read_text())["metrics"]["test"]
                log(f"{init:10s} {slot:12s} fraction {fraction:g}: test accuracy {test['accuracy']:.3f} "
                    f"[{test['ci95_low']:.3f}, {test['ci95_high']:.3f}] ({time.time() - t0:.0f} s)")  # fmt: skip


def report(args: argparse.Namespace) -> str:
    """Markdown: per fraction and slot, each init's test accuracy [95% interval], and the verdict."""
    lines = ["| train fraction | init | " + " | ".join(SLOTS) + " | mean |", "|---|---|" + "---|" * (len(SLOTS) + 1)]
    verdicts = []
    for fraction in sorted(args.fractions):
        got: dict[str, dict[str, dict]] = {}
        for init in INITS:
            for slot in SLOTS:
                f = run_dir(args, init, slot, fraction) / "results.json"
                if f.is_file():
                    got.setdefault(init, {})[slot] = json.loads(f.read_text())["metrics"]["test"]
        for init, cells in got.items():
            row = [f"{c['accuracy']:.3f} [{c['ci95_low']:.2f}, {c['ci95_high']:.2f}]" if (c := cells.get(s)) else ""
                   for s in SLOTS]  # fmt: skip
            mean = sum(c["accuracy"] for c in cells.values()) / len(cells)
            lines.append(f"| {fraction:g} | {init} | " + " | ".join(row) + f" | {mean:.3f} ({len(cells)} slots) |")
        both = [s for s in SLOTS if all(s in got.get(i, {}) for i in INITS)]
        if both:
            p, r = got["pretrained"], got["random"]
            better = [s for s in both if p[s]["ci95_low"] > r[s]["ci95_high"]]
            worse = [s for s in both if p[s]["ci95_high"] < r[s]["ci95_low"]]
            verdicts.append(f"fraction {fraction:g}: pretrained above random with non-overlapping intervals on "
                            f"{len(better)} of {len(both)} slots ({', '.join(better) or 'none'}), below on "
                            f"{len(worse)} ({', '.join(worse) or 'none'})")  # fmt: skip
    return "\n".join(lines + [""] + verdicts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = Path(os.environ.get("MARLIN_SHARED_DATA", REPO.parent / "shared" / "data"))
    ap.add_argument("--data", type=Path, default=shared, help="shared data folder (grid_s1/)")
    ap.add_argument("--store", type=Path, default=REPO / "runs" / "transfer_curve" / "stores" / "grid_s1",
                    help="marlin prepare store of GRID s1 (transfer_curve.py --until stores)")  # fmt: skip
    ap.add_argument("--model", type=Path, required=True, help="the pretrained encoder (exported model or checkpoint)")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "grid_finetune")
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.1], help="training fractions (default: 0.1)")
    ap.add_argument("--slots", nargs="+", choices=SLOTS, default=list(SLOTS))
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--layer-decay", type=float, default=1.0, help="block k below the head trains at lr x this^k")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--patience", type=int, default=8)
    ap.add_argument("--centre", action="store_true", help="the head reads each time step minus the clip's mean over "
                    "them (marlin finetune --centre); runs kept apart (<run>_centred)")  # fmt: skip
    ap.add_argument("--from", dest="start", choices=STAGES, default=STAGES[0])
    ap.add_argument("--until", choices=STAGES, default=STAGES[-1])
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    order = STAGES.index
    from marlin.models.model import from_spec

    side = from_spec(str(args.model)).config.img_size
    manifest = stage_crops(args, side) if order(args.start) <= order("crops") else args.work / "manifest.csv"
    if order(args.start) <= order("finetune") <= order(args.until):
        stage_finetune(args, manifest)
    if order(args.until) >= order("report"):
        text = report(args)
        print(text)
        (args.work / "report.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
