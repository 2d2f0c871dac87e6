"""Does a short CPU pretraining run learn to reconstruct clips it never saw? Held-out hidden-patch error vs baselines.

One command, three resumable stages (outputs in ``--work``; a stage whose outputs exist is skipped):

1. ``stores``   ``marlin prepare`` stores (224 px face crops + LaPa parse maps): GRID s1 with every sentence its own
                group, so ``--val-fraction 0.1`` holds out 100 whole sentences of the (one) speaker; the talking-head
                clips with 15% held out by identity (5 people never trained on).
2. ``pretrain`` a tiny MARLIN (ViT 192-d depth 6, decoder 128-d depth 2, 112 px, 16 frames at stride 2) with the
                official objective: raw-pixel targets, face-guided masking at 90%, the WGAN patch critic at weight
                0.01; batch 8, lr 5e-4 (100 warmup steps, cosine), ``--steps`` steps (600), on the train splits only.
                The run logs the held-out error every 50 steps (metrics.jsonl).
3. ``evaluate`` the final model on each held-out set apart: mean hidden-patch MSE over the clips (one centred window
                each, fasking, masks seeded per clip) next to predicting the clip's mean colour and the visible
                patches' mean colour; ``marlin reconstruct --crop-face`` pictures of one held-out sentence and one
                unseen person, from the raw videos.

    python benchmarks/pretrain_heldout.py                              # everything, in runs/pretrain_heldout
    python benchmarks/pretrain_heldout.py --stores /tmp/stores --steps 2000

Needs ../shared/data (or --data). Prints a Markdown table and writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("stores", "pretrain", "evaluate")
OVERRIDES = [
    "model.name=marlin_vit_tiny_112", "model.img_size=112", "mask.ratio=0.9", "mask.strategy=fasking",
    "optim.scale_lr=false", "optim.lr=5e-4", "optim.min_lr=1e-5", "optim.warmup_lr=1e-5", "optim.warmup_steps=100",
    "val.every=50", "log.every=25", "log.image_every=100", "ckpt.every=200",
]  # fmt: skip
HELD_OUT = {"grid_s1": "unseen sentences of the GRID speaker", "talking_heads": "unseen people (talking heads)"}
PICTURES = {"grid_s1": "grid_s1/videos", "talking_heads": "talking_heads"}  # where the raw videos are, under --data


def log(msg: str) -> None:
    print(f"[pretrain_heldout {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def marlin_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "marlin.cli", *args]


def stage_stores(args: argparse.Namespace) -> dict[str, Path]:
    stores = {name: args.stores / name for name in HELD_OUT}
    options = {"grid_s1": ["--val-fraction", "0.1"], "talking_heads": ["--val-fraction", "0.15"]}
    for name, out in stores.items():
        if (out / "store.json").is_file():
            log(f"store {out} exists, reusing it")
            continue
        src = args.data / PICTURES[name]
        log(f"preparing {src} -> {out}")
        subprocess.run(marlin_cmd("prepare", str(src), "--out", str(out), "--workers", "2", *options[name]), check=True)
    return stores


def stage_pretrain(args: argparse.Namespace, stores: dict[str, Path]) -> None:
    out = args.work / "run"
    cmd = marlin_cmd("pretrain", "--config", "marlin_vit_tiny", "--data", ",".join(map(str, stores.values())),
                     "--out", str(out), "--max-steps", str(args.steps), "--batch-size", "8", "--workers", "1",
                     "--seed", "0", "--resume", "auto", *OVERRIDES)  # fmt: skip
    log(" ".join(cmd[2:]))
    subprocess.run(cmd, check=True)


def stage_evaluate(args: argparse.Namespace, stores: dict[str, Path]) -> dict:
    from marlin.data.store import ClipStore
    from marlin.models.model import from_spec
    from marlin.train import load_config
    from marlin.train.inputs import build_val_sets, val_indices
    from marlin.train.validate import validate

    run = args.work / "run"
    model_dir = run / "export" / "marlin_vit_tiny_112"
    model = from_spec(model_dir, full=True)
    results: dict = {"steps": args.steps, "held_out": {}}
    for name, store in stores.items():
        cfg = load_config(str(run / "config.yaml"), [f"val.source={store}", "batch_size=8"])
        (data,) = build_val_sets(cfg).values()
        data.items = [it for it in data.items if it.split == "val"]  # the held-out part only
        res = validate(model, data, val_indices(len(data), 1000), cfg)
        results["held_out"][name] = res
        val_item = max(ClipStore(store).split("val"), key=lambda it: (it.n_frames, it.id))  # the longest clip
        video = Path(val_item.source) if Path(val_item.source).is_file() else _raw_video(args, name, val_item.id)
        png = args.work / f"reconstruct_{name}_{val_item.id}.png"
        cmd = marlin_cmd("reconstruct", str(video), "--crop-face", "--model", str(model_dir), "--strategy",
                         "fasking", "--start", "20", "--out", str(png))  # fmt: skip
        p = subprocess.run(cmd, capture_output=True, text=True)
        results["held_out"][name]["picture"] = str(png) if p.returncode == 0 else f"failed: {p.stderr[-300:]}"
    pictures = [
        (HELD_OUT[n], Path(r["picture"])) for n, r in results["held_out"].items() if Path(r["picture"]).is_file()
    ]
    if pictures:
        results["figure"] = str(_stack(pictures, args.work / "reconstructions.jpg", args.steps))
    print(f"\n{args.steps} steps; hidden-patch MSE on held-out clips (fasking, 90% hidden):\n")
    print("| held out | clips | model | clip-mean colour | visible-mean colour |\n|---|---|---|---|---|")
    for name, r in results["held_out"].items():
        print(f"| {HELD_OUT[name]} | {int(r['val/clips'])} | {r['val/mse']:.4f} | {r['val/clip_mean_mse']:.4f} | "
              f"{r['val/visible_mean_mse']:.4f} |")  # fmt: skip
    (args.work / "results.json").write_text(json.dumps(results, indent=2))
    return results


def _stack(pictures: list[tuple[str, Path]], out: Path, steps: int) -> Path:
    """The reconstruction grids one above the other, each under a caption, as one JPEG (for the README)."""
    from PIL import Image, ImageDraw

    images = [Image.open(p).convert("RGB") for _, p in pictures]
    caption_h = 18
    width = max(im.width for im in images)
    canvas = Image.new("RGB", (width, sum(im.height + caption_h for im in images)), (255, 255, 255))
    draw, y = ImageDraw.Draw(canvas), 0
    for (caption, _), im in zip(pictures, images, strict=True):
        draw.text((4, y + 3), f"{caption}: tiny MARLIN after {steps} CPU steps, fasking 90%", fill=(0, 0, 0))
        canvas.paste(im, (0, y + caption_h))
        y += im.height + caption_h
    canvas.save(out, quality=85)
    return out


def _raw_video(args: argparse.Namespace, name: str, item_id: str) -> Path:
    found = sorted((args.data / PICTURES[name]).rglob(f"{item_id}.*"))
    if not found:
        raise SystemExit(f"no source video for held-out item {item_id} under {args.data / PICTURES[name]}")
    return found[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="the shared data folder")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "pretrain_heldout", help="outputs")
    ap.add_argument("--stores", type=Path, default=None, help="where the stores are / go (default WORK/stores)")
    ap.add_argument("--steps", type=int, default=600, help="optimiser steps of the pretraining run")
    ap.add_argument("--from", dest="start", choices=STAGES, default=STAGES[0])
    ap.add_argument("--until", choices=STAGES, default=STAGES[-1])
    args = ap.parse_args()
    args.stores = args.stores or args.work / "stores"
    if not (args.data / "grid_s1").is_dir():
        raise SystemExit(f"{args.data}: no grid_s1 folder (pass --data)")
    args.work.mkdir(parents=True, exist_ok=True)
    first, last = STAGES.index(args.start), STAGES.index(args.until)
    stores = stage_stores(args) if first <= 0 <= last else {n: args.stores / n for n in HELD_OUT}
    if first <= 1 <= last:
        stage_pretrain(args, stores)
    if first <= 2 <= last:
        stage_evaluate(args, stores)


if __name__ == "__main__":
    main()
