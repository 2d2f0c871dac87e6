"""Does the lip-sync expert find known audio offsets on people and sentences it never saw? (issue 12, stage 1, item 4)

One command, resumable stages (each keeps its outputs in ``--work`` and is skipped when they exist):

1. ``train``  ``marlin sync-train`` one expert per visual stream, same recipe, data and steps:
              ``pixels`` (raw lower-face pixels, no encoder), ``random`` (the tiny encoder, random init),
              ``marlin`` and ``tube`` (that encoder pretrained by ``benchmarks/transfer_curve.py``; the checkpoints
              named by ``--marlin`` / ``--tube``), every encoder fine-tuned at the heads' learning rate.
              Training data: the GRID s1 protocol's *training* sentences and the training identities of the other
              shared clips with sound (``STORE#train`` of transfer_curve's two ``marlin prepare`` stores).
2. ``eval``   the held-out clips: GRID s1's protocol *test* sentences and the held-out identities with sound
              (``STORE#val``), never used by pretraining nor by the expert's training. Each clip's audio is delayed
              by every ``--delays`` value (the spectrogram shifted: what an out-of-sync track gives,
              :func:`marlin.audio.mel.delay_mel`) and the offset search of ``marlin sync`` (-15..15 frames) is run on
              it. Reported: offset accuracy (found within +-1 frame of the delay, and exactly), with a 95% bootstrap
              interval over clips; the in-sync vs shifted AUC of single 16-frame windows (distance at the true
              alignment vs at offsets 2..15 frames away, as the expert was trained); LSE-D / LSE-C of in-sync clips.
3. ``report`` the Markdown table, accuracy by confidence (LSE-C terciles) and a picture (mean distance vs offset).

    python benchmarks/transfer_curve.py --until stores     # the stores (once; transfer_curve's pretraining: --marlin)
    python benchmarks/sync_eval.py                         # train, eval, report in runs/sync_eval
    python benchmarks/sync_eval.py --from report           # the tables again
    python benchmarks/sync_eval.py --arms pixels random    # no pretraining needed (the architecture is made untrained)

Needs the stores and pretraining checkpoints of ``benchmarks/transfer_curve.py`` (its ``--work``); the ``pixels`` and
``random`` arms alone need only the stores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
STAGES = ("train", "eval", "report")
ARMS = ("pixels", "random", "marlin", "tube")
MAX_OFFSET = 15


def log(msg: str) -> None:
    print(f"[sync_eval {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def untrained_tiny(path: Path) -> Path:
    """The tiny 112 px architecture of ``benchmarks/transfer_curve.py``, untrained, saved at `path` (once): all the
    ``pixels`` and ``random`` arms need from a checkpoint is its config, so they run without any pretraining."""
    if not (path / "config.json").is_file():
        import dataclasses

        from marlin.models.model import Marlin, create_model

        tiny = create_model("marlin_vit_tiny", full=True).config
        config = dataclasses.replace(tiny, img_size=112, name="marlin_vit_tiny_112")  # transfer_curve's COMMON
        Marlin(config, as_feature_extractor=False).save_pretrained(path)
    return path


def stores(args: argparse.Namespace) -> tuple[Path, Path]:
    return args.curve / "stores" / "grid_s1", args.curve / "stores" / "faces"


def arm_model(args: argparse.Namespace, arm: str) -> list[str]:
    """The ``--model`` options of an arm (the tiny 112 px config comes from the pretraining checkpoints)."""
    ckpt = {"marlin": args.marlin, "tube": args.tube}.get(arm, args.tube)
    extra = {"pixels": ["--visual", "pixels"], "random": ["--random-init"]}.get(arm, [])
    return ["--model", str(ckpt), *extra]


def stage_train(args: argparse.Namespace) -> None:
    grid, faces = stores(args)
    for arm in args.arms:
        out = args.work / arm
        if (out / "expert.pt").is_file():
            log(f"{arm}: trained ({out / 'expert.pt'})")
            continue
        cmd = [sys.executable, "-m", "marlin.cli", "sync-train", f"{grid}#train", f"{faces}#train",
               *arm_model(args, arm), "--out", str(out), "--steps", str(args.steps), "--batch-size",
               str(args.batch_size), "--encoder-lr-scale", "1", "--workers", "2", "--val-every", "200",
               "--log-every", "20", "--seed", "0"]  # fmt: skip
        if (out / "last.pt").is_file():
            cmd.append("--resume")
        log(f"{arm}: {' '.join(cmd)}")
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "train.log", "a") as f:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
        if rc:
            raise SystemExit(f"{arm}: marlin sync-train exited with {rc}; see {out / 'train.log'}")


def clip_result(expert, source: str, delays: list[int], windows: int) -> dict:  # noqa: ANN001
    """Offsets found at each delay, and the in-sync clip's distances, for one held-out clip (at most `windows`
    evenly spaced windows: GRID's 75 frames give 30 with every audio offset inside the clip; longer clips many more)."""
    from marlin.audio.mel import delay_mel
    from marlin.sync.data import load_video_audio, read_frames_for_sync
    from marlin.sync.score import embed_windows, offset_distances, summarise, window_starts

    va = load_video_audio(source)
    frames = read_frames_for_sync(source, range(va.n_frames), expert.config.img_size, crop_face=True)
    starts, padded = window_starts(va.n_frames, expert.clip_frames, MAX_OFFSET, 1)
    starts = [starts[i] for i in np.unique(np.linspace(0, len(starts) - 1, windows).round().astype(int))]
    v, offsets = embed_windows(expert, frames, starts), list(range(-MAX_OFFSET, MAX_OFFSET + 1))
    out: dict = {"source": source, "padded": padded, "found": {}}
    for d in delays:
        dist = offset_distances(expert, v, starts, delay_mel(va.mel, d, va.fps), va.fps, offsets)  # [W, K]
        score = summarise(source, va.n_frames, va.fps, starts, offsets, dist, padded)
        out["found"][str(d)] = score.offset
        if d == 0:
            out |= {"lse_d": score.lse_d, "lse_c": score.lse_c, "distances": score.distances,
                    "window_dist": dist.round(5).tolist()}  # fmt: skip
    return out


def stage_eval(args: argparse.Namespace) -> None:
    import torch

    from marlin.sync.data import sync_inputs
    from marlin.sync.expert import load_expert

    torch.set_num_threads(args.threads)
    grid, faces = stores(args)
    sources, _ = sync_inputs([f"{grid}#val", f"{faces}#val"])
    for arm in args.arms:
        path = args.work / arm / "eval.json"
        done = json.loads(path.read_text()) if path.is_file() else {"delays": args.delays, "clips": []}
        if done["delays"] != args.delays:
            raise SystemExit(f"{path}: made with delays {done['delays']}; remove it to use {args.delays}")
        expert, seen = load_expert(args.work / arm / "expert.pt"), {c["source"] for c in done["clips"]}
        todo = [s for s in sources if s not in seen]
        log(f"{arm}: {len(seen)} of {len(sources)} held-out clips scored; {len(todo)} to go")
        for i, source in enumerate(todo):
            done["clips"].append(clip_result(expert, source, args.delays, args.windows))
            if (i + 1) % 25 == 0 or i + 1 == len(todo):
                tmp = path.with_suffix(".part")
                tmp.write_text(json.dumps(done))
                tmp.replace(path)
                log(f"{arm}: {len(done['clips'])} / {len(sources)}")


def _interval(per_clip: np.ndarray, seed: int = 0, n: int = 1000) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = per_clip[rng.integers(0, len(per_clip), (n, len(per_clip)))].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def arm_metrics(doc: dict) -> dict:
    """Offset accuracy (+-1 and exact, with clip-bootstrap intervals), window AUC and LSE of one arm's eval.json."""
    from marlin.evaluate.metrics import binary_auc

    clips, delays = doc["clips"], doc["delays"]
    err = np.array([[abs(c["found"][str(d)] - d) for d in delays] for c in clips])  # [clips, delays]
    near, exact = (err <= 1).mean(1), (err == 0).mean(1)
    # relative: does the found offset move with the delay, whatever the clip's own alignment? (d != 0)
    moved = np.array([[abs(c["found"][str(d)] - c["found"]["0"] - d) <= 1 for d in delays if d] for c in clips])
    offsets = np.arange(-MAX_OFFSET, MAX_OFFSET + 1)
    pos, neg = [], []
    for c in clips:
        w = np.asarray(c["window_dist"])  # [W, K] at delay 0
        pos.append(-w[:, offsets == 0].ravel())
        neg.append(-w[:, np.abs(offsets) >= 2].ravel())
    p, n = np.concatenate(pos), np.concatenate(neg)
    auc = binary_auc(np.r_[np.ones(len(p)), np.zeros(len(n))].astype(np.int64), np.r_[p, n])
    grid = np.array(["grid_s1" in c["source"] for c in clips])
    return {"clips": len(clips), "grid_clips": int(grid.sum()), "near": float(near.mean()), "near_ci": _interval(near),
            "exact": float(exact.mean()), "exact_ci": _interval(exact), "near_grid": float(near[grid].mean()),
            "near_other": float(near[~grid].mean()) if (~grid).any() else None, "auc": auc,
            "moved_grid": float(moved[grid].mean()),
            "moved_other": round(float(moved[~grid].mean()), 3) if (~grid).any() else None,
            "lse_c_grid": float(np.median([c["lse_c"] for c, g in zip(clips, grid, strict=True) if g])),
            "lse_c_other": [round(c["lse_c"], 3) for c, g in zip(clips, grid, strict=True) if not g],
            "lse_d": float(np.mean([c["lse_d"] for c in clips])), "lse_c": float(np.mean([c["lse_c"] for c in clips])),
            "near_by_lse_c": _by_confidence(clips, near)}  # fmt: skip


def _by_confidence(clips: list[dict], near: np.ndarray) -> list[tuple[float, float, float]]:
    """(low LSE-C, high LSE-C, offset accuracy) per tercile of the in-sync clips' LSE-C."""
    conf = np.array([c["lse_c"] for c in clips])
    edges = np.quantile(conf, [0, 1 / 3, 2 / 3, 1])
    out = []
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (conf >= lo) & (conf <= hi)
        out.append((float(lo), float(hi), float(near[sel].mean())))
    return out


def report(args: argparse.Namespace) -> str:
    rows, lines = {}, []
    for arm in args.arms:
        path = args.work / arm / "eval.json"
        if path.is_file():
            rows[arm] = arm_metrics(json.loads(path.read_text()))
    if not rows:
        return "no evaluated arms yet"
    any_row = next(iter(rows.values()))
    lines += [f"Held-out clips: {any_row['clips']} ({any_row['grid_clips']} GRID s1 test sentences, the rest unseen "
              f"people); delays {args.delays} frames; chance of +-1: 3/31 = 0.097.", "",
              "| visual stream | offset within +-1 (95% CI) | exact | GRID / others within +-1 | window AUC | "
              "LSE-D | LSE-C |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for arm, m in rows.items():
        others = f"{m['near_other']:.3f}" if m["near_other"] is not None else "-"
        lines.append(
            f"| {arm} | {m['near']:.3f} ({m['near_ci'][0]:.3f}-{m['near_ci'][1]:.3f}) | {m['exact']:.3f} | "
            f"{m['near_grid']:.3f} / {others} | {m['auc']:.3f} | {m['lse_d']:.3f} | {m['lse_c']:.3f} |"
        )
    lines += [
        "",
        "Tracking a delay whatever the clip's own alignment (found(d) - found(0) within +-1 of d, d != 0) and "
        "the in-sync clips' LSE-C:",
        "",
    ]
    for arm, m in rows.items():
        lines.append(
            f"- {arm}: GRID {m['moved_grid']:.3f}, others {m['moved_other']}; LSE-C median on GRID "
            f"{m['lse_c_grid']:.3f}, on the others {m['lse_c_other']}"
        )
    lines += ["", "Offset accuracy (+-1) by the in-sync clip's LSE-C tercile (low / middle / high confidence):", ""]
    for arm, m in rows.items():
        cells = ", ".join(f"LSE-C {lo:.2f}-{hi:.2f}: {acc:.2f}" for lo, hi, acc in m["near_by_lse_c"])
        lines.append(f"- {arm}: {cells}")
    (args.work / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    return "\n".join(lines)


def plot(args: argparse.Namespace) -> Path | None:
    """Mean distance vs offset over the held-out in-sync clips, one line per arm (min marks the found offset)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    offsets = np.arange(-MAX_OFFSET, MAX_OFFSET + 1)
    for arm in args.arms:
        path = args.work / arm / "eval.json"
        if not path.is_file():
            continue
        d = np.array([c["distances"] for c in json.loads(path.read_text())["clips"]])
        ax.plot(offsets, d.mean(0) - d.mean(), marker=".", label=f"{arm} ({len(d)} clips)")
    ax.axvline(0, color="grey", alpha=0.4, linestyle="--")
    ax.set(xlabel="offset searched (frames; the clips are in sync: 0 is right)",
           ylabel="mean embedding distance (centred)", title="Held-out clips: distance vs audio offset")  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = args.work / "sync_eval.png"
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    curve = REPO / "runs" / "transfer_curve"
    ap.add_argument("--curve", type=Path, default=curve, help="transfer_curve's --work (stores, checkpoints)")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "sync_eval")
    ap.add_argument("--marlin", type=Path, default=curve / "pretrain_marlin" / "checkpoints" / "step_3000.pt")
    ap.add_argument("--tube", type=Path, default=curve / "pretrain_tube" / "checkpoints" / "step_6000.pt")
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="visual streams (~20-30 min each)")
    ap.add_argument("--steps", type=int, default=600, help="sync-train steps per expert")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--delays", type=lambda t: [int(v) for v in t.split(",")], default=[-12, -6, -3, 0, 3, 6, 12])
    ap.add_argument("--windows", type=int, default=15, help="scored windows per clip, evenly spaced")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--from", dest="start", choices=STAGES, default=STAGES[0])
    ap.add_argument("--until", choices=STAGES, default=STAGES[-1])
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.tube.exists() and set(args.arms) <= {"pixels", "random"}:
        args.tube = untrained_tiny(args.work / "tiny112_init")
        log(f"no tube checkpoint: the pixels / random arms take the architecture from {args.tube}")
    ckpts = [args.marlin] * ("marlin" in args.arms) + [args.tube] * any(a != "marlin" for a in args.arms)  # configs
    for need in (*stores(args), *ckpts):
        if not need.exists():
            raise SystemExit(f"{need}: missing; run benchmarks/transfer_curve.py first (see this script's doc)")
    order = STAGES.index
    if order(args.start) <= order("train") <= order(args.until):
        stage_train(args)
    if order(args.start) <= order("eval") <= order(args.until):
        stage_eval(args)
    if order(args.until) >= order("report"):
        print(report(args))
        picture = plot(args)
        if picture:
            print(f"\npicture: {picture}")


if __name__ == "__main__":
    main()
