"""Does dubbing with the lip generator improve sync on sentences it never saw? (issue 12, stage 2, item 6)

One command, resumable stages (each keeps its outputs in ``--work`` and is skipped when they exist):

1. ``train``  ``marlin lipsync-train`` the generator: the tiny 112 px MARLIN encoder pretrained by
              ``benchmarks/transfer_curve.py`` (``--marlin``), on GRID s1's protocol *training* sentences and the
              training identities of the other shared clips with sound (as ``benchmarks/sync_eval.py``'s experts);
              pixel MSE only by default (``--sync-weight 0``: see ``marlin.lipsync.train`` for why), so every
              expert below is a judge the generator never trained against (the report marks the one it did, when
              ``--sync-weight`` > 0). ``--init`` continues a generator, ``--still-upper`` / ``--expert-audio`` /
              ``--sync-expert`` / ``--sync-jitter`` / ``--adv-weight`` / ``--refine`` are ``marlin lipsync-train``'s
              options: the README's Dubbing section gives the chain of runs behind its table.
2. ``choose`` the sound guidance (``marlin lipsync --guidance``) on the generator's *own* held-out GRID videos
              (training-pool sentences it never trained on, not the test sentences), each dubbed with the next one's
              sound: the candidate (``--guidance``) with the highest mean LSE-C by ``--chooser`` (default: the
              expert whose sound net seeded the generator's) wins, among those whose patch-grid seams rise by at
              most ``--max-seam-rise`` over the smallest candidate's (strong guidance draws blotches and seams as
              well as mouths); 0 when guidance is not asked for.
3. ``eval``   GRID s1's protocol *test* sentences (never used by pretraining, the experts or the generator). Clip
              ``i`` is dubbed with the sound of clip ``i + 1`` (another sentence of the same speaker). Each judge
              (``--judges``: experts from ``benchmarks/sync_eval.py``) scores, with the new sound: the undubbed video
              and the dubbed one (plain, and with the chosen guidance); and the real clip with its own sound (the
              ceiling). LSE-D (lower: better), LSE-C (higher: better) and the found offset (0 is right) over the
              windows whose shifted sound stays inside the clip. Since both sentences are by the same speaker in
              the same framing, the mouth of clip ``i + 1`` itself is what the new sound looked like: the lower-face
              MSE to it, dubbed vs undubbed, is a second, expert-free measure. Reconstruction on in-sync sound:
              the held-out windows of ``marlin lipsync-train``'s validation (reference from another moment), drawn
              vs copying the reference (MSE, PSNR, L1).
4. ``report`` Markdown tables and a picture strip (original mouth / dubbed mouth / the mouth that spoke the sound).

    python benchmarks/transfer_curve.py --until stores     # stores and pretraining (once)
    python benchmarks/sync_eval.py --arms pixels random     # the judges (once)
    python benchmarks/lipsync_eval.py                       # train, eval, report in runs/lipsync_eval
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
STAGES = ("train", "choose", "eval", "report")
MAX_OFFSET = 15


def log(msg: str) -> None:
    print(f"[lipsync_eval {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stage_train(args: argparse.Namespace) -> None:
    out = args.work / "generator"
    if (out / "generator.pt").is_file():
        log(f"trained ({out / 'generator.pt'})")
        return
    grid, faces = args.curve / "stores" / "grid_s1", args.curve / "stores" / "faces"
    expert = args.sync_expert or args.judges[0]
    cmd = [sys.executable, "-m", "marlin.cli", "lipsync-train", f"{grid}#train", f"{faces}#train", "--model",
           str(args.marlin), "--expert", str(expert), "--sync-weight", str(args.sync_weight), "--sync-jitter",
           str(args.sync_jitter), "--steps", str(args.steps), "--batch-size", "8", "--lr",
           str(args.lr), "--warmup-steps", str(args.warmup), "--adv-weight", str(args.adv_weight),
           "--pixel-loss", args.pixel_loss, "--sound-dropout", str(args.sound_dropout), "--refine", str(args.refine),
           "--workers", "2", "--val-every", str(args.val_every), "--save-every", "50", "--log-every", "20", "--seed",
           "0", "--out", str(out)]  # fmt: skip
    others = [str(j) for j in args.judges if j.resolve() != Path(expert).resolve()]
    cmd += ["--judge", others[0]] if others else []
    cmd += ["--init", str(args.init)] if args.init else []
    cmd += ["--still-upper"] if args.still_upper else []
    cmd += ["--expert-audio"] if args.expert_audio else []
    cmd += ["--random-init"] if args.random_init else []
    if (out / "last.pt").is_file():
        cmd.append("--resume")
    log(" ".join(cmd))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train.log", "a") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
    if rc:
        raise SystemExit(f"marlin lipsync-train exited with {rc}; see {out / 'train.log'}")


def sync_of(expert, frames, mel, fps: float) -> dict:  # noqa: ANN001
    """Offset, LSE-D, LSE-C of crops uint8 ``[3, N, S, S]`` with sound `mel`, as ``marlin sync`` computes them."""
    from marlin.sync.score import embed_windows, offset_distances, summarise, window_starts

    n = frames.shape[1]
    starts, padded = window_starts(n, expert.clip_frames, MAX_OFFSET, 1)
    offsets = list(range(-MAX_OFFSET, MAX_OFFSET + 1))
    dist = offset_distances(expert, embed_windows(expert, frames, starts), starts, mel, fps, offsets)
    s = summarise("", n, fps, starts, offsets, dist, padded)
    return {"offset": s.offset, "lse_d": s.lse_d, "lse_c": s.lse_c}


def lower_mse(a, b, top: int) -> float:  # noqa: ANN001
    """MSE in [0, 1] units of the rows from `top` down of two uint8 crop stacks ``[3, N, S, S]``."""
    return float(((a[..., top:, :].float() - b[..., top:, :].float()) / 255.0).square().mean())


def seam_ratio(crops, patch: int, top: int) -> float:  # noqa: ANN001
    """Mean absolute step between neighbouring pixels across the generator's patch borders, over that inside its
    patches, in the lower face of uint8 crops ``[3, N, S, S]``: about 1 for camera footage, above 1 when the drawing
    shows its patch grid (the seams a fooled expert or a weak decoder leave)."""
    x = crops[..., top:, :].float().mean(0)  # [N, H, S] grey
    dx = (x[..., 1:] - x[..., :-1]).abs()  # [N, H, S - 1]: step between column j and j + 1
    dy = (x[:, 1:] - x[:, :-1]).abs()  # [N, H - 1, S]
    col_seam = (np.arange(dx.shape[-1]) + 1) % patch == 0
    row_seam = (np.arange(dy.shape[1]) + 1) % patch == 0
    across = (dx[..., col_seam].mean() + dy[:, row_seam].mean()) / 2
    within = (dx[..., ~col_seam].mean() + dy[:, ~row_seam].mean()) / 2
    return float(across / within.clamp_min(1e-6))


def pair_clips(src: str, dst: str, size: int, spoke: bool = True) -> tuple:
    """``(va_src, va_dst, orig, spoke)`` for clip `src` dubbed with the sound of `dst`: both clips' sound, the face
    crops of `src` uint8 ``[3, n, S, S]`` over the frames both clips have, and those of `dst` (the mouth that made the
    new sound; None unless `spoke`)."""
    from marlin.sync.data import load_video_audio, read_frames_for_sync

    va_src, va_dst = load_video_audio(src), load_video_audio(dst)
    n = min(va_src.n_frames, va_dst.n_frames)
    orig = read_frames_for_sync(src, range(n), size, crop_face=True)
    return va_src, va_dst, orig, read_frames_for_sync(dst, range(n), size, crop_face=True) if spoke else None


def pair_result(gen, judges: dict, src: str, dst: str, top: int, guidance: float = 0.0) -> dict:  # noqa: ANN001
    """Clip `src` dubbed with the sound of clip `dst` (plain, and ``guided`` with `guidance` when it is > 0), scored by
    every judge."""
    from marlin.lipsync.dub import dub_crops

    va_src, va_dst, orig, spoke = pair_clips(src, dst, gen.config.img_size)
    n = orig.shape[1]
    videos = {"undubbed": orig, "dubbed": dub_crops(gen, orig, va_dst.mel, va_dst.fps)}
    if guidance:
        videos["guided"] = dub_crops(gen, orig, va_dst.mel, va_dst.fps, guidance=guidance)
    out: dict = {"src": src, "dst": dst, "n": n, "guidance": guidance,
                 "mse_to_sound": {k: lower_mse(v, spoke, top) for k, v in videos.items()},
                 "self_change": lower_mse(videos["dubbed"], orig, top),
                 "seams": {k: seam_ratio(v, gen.config.patch_size, top) for k, v in videos.items()}}  # fmt: skip
    for name, expert in judges.items():
        out[name] = {k: sync_of(expert, v, va_dst.mel, va_dst.fps) for k, v in videos.items()}
        out[name]["real"] = sync_of(expert, orig, va_src.mel, va_src.fps)
    return out


def _own_held_out(args: argparse.Namespace, gen) -> list[str]:  # noqa: ANN001
    """GRID training-pool videos the generator never trained on (its run's held-out split; not test sentences)."""
    from types import SimpleNamespace

    from marlin.sync.data import sync_inputs
    from marlin.train.steprun import split_videos

    cfg = gen.meta.get("train_config") or {}
    if not cfg.get("videos"):
        raise SystemExit("the generator's file names no training videos: cannot tell its held-out ones")
    fields = SimpleNamespace(videos=cfg["videos"], val_videos=cfg.get("val_videos") or [],
                             val_fraction=cfg.get("val_fraction", 0.1), seed=cfg.get("seed", 0))  # fmt: skip
    grid_train = set(sync_inputs([f"{args.curve / 'stores' / 'grid_s1'}#train"])[0])
    return [v for v in split_videos(fields)[1] if v in grid_train]


def stage_choose(args: argparse.Namespace) -> None:
    """Pick the sound guidance on the generator's own held-out videos (see the module docstring)."""
    import torch

    from marlin.lipsync.dub import dub_crops
    from marlin.lipsync.model import load_generator
    from marlin.sync.expert import load_expert

    path = args.work / "choose.json"
    if path.is_file():
        log(f"guidance chosen before: {chosen_guidance(args):g} ({path}; move it away to choose again)")
        return
    if args.guidance == [0.0]:
        return
    torch.set_num_threads(args.threads)
    gen = load_generator(args.work / "generator" / "generator.pt")
    chooser = args.chooser or args.sync_expert or args.judges[-1]
    expert = load_expert(chooser)
    clips = _own_held_out(args, gen)[: args.choose_pairs]
    log(f"choosing the guidance among {args.guidance} on {len(clips)} held-out training-pool videos by {chooser}")
    keys = ["undubbed", *map(str, args.guidance)]
    scores: dict[str, dict[str, list[float]]] = {k: {"lse_c": [], "lse_d": [], "seams": []} for k in keys}
    for i, src in enumerate(clips):
        _, va, orig, _ = pair_clips(src, clips[(i + 1) % len(clips)], gen.config.img_size, spoke=False)
        for g in [None, *args.guidance]:  # None: the undubbed video with the new sound, for comparison
            dubbed = orig if g is None else dub_crops(gen, orig, va.mel, va.fps, guidance=g)
            sync = sync_of(expert, dubbed, va.mel, va.fps)
            for k, v in (("lse_c", sync["lse_c"]), ("lse_d", sync["lse_d"]),
                         ("seams", seam_ratio(dubbed, gen.config.patch_size, gen.top))):  # fmt: skip
                scores["undubbed" if g is None else str(g)][k].append(v)
    means = {g: {k: float(np.mean(v)) for k, v in d.items()} for g, d in scores.items()}
    plain = means[str(min(args.guidance))]["seams"]  # guidance draws more than the sound's mouth at some point: the
    allowed = [g for g in args.guidance if means[str(g)]["seams"] <= plain + args.max_seam_rise]  # seams tell when
    best = max(allowed, key=lambda g: (round(means[str(g)]["lse_c"], 4), -g))
    for g in keys:
        log(f"{'guidance ' * (g != 'undubbed')}{g}: LSE-C {means[g]['lse_c']:.3f}, LSE-D {means[g]['lse_d']:.3f}, "
            f"seams {means[g]['seams']:.3f}")  # fmt: skip
    log(f"chosen guidance: {best:g}")
    path.write_text(json.dumps({"chooser": str(chooser), "clips": clips, "means": means, "chosen": best,
                                "max_seam_rise": args.max_seam_rise}, indent=1))  # fmt: skip


def chosen_guidance(args: argparse.Namespace) -> float:
    path = args.work / "choose.json"
    return float(json.loads(path.read_text())["chosen"]) if path.is_file() else 0.0


def _held_out(args: argparse.Namespace) -> list[str]:
    from marlin.sync.data import sync_inputs

    return sync_inputs([f"{args.curve / 'stores' / 'grid_s1'}#val"])[0][: args.pairs]


def stage_eval(args: argparse.Namespace) -> None:
    import torch

    from marlin.lipsync.data import LipWindows
    from marlin.lipsync.model import load_generator
    from marlin.lipsync.train import evaluate_generator
    from marlin.sync.expert import load_expert

    torch.set_num_threads(args.threads)
    gen = load_generator(args.work / "generator" / "generator.pt")
    judges = {Path(p).parent.name: load_expert(p) for p in args.judges}
    clips = _held_out(args)
    path = args.work / "eval.json"
    done = json.loads(path.read_text()) if path.is_file() else {"judges": list(judges), "pairs": []}
    train = gen.meta.get("train_config") or {}
    done["loss_expert"] = next((name for name, p in zip(judges, args.judges, strict=True) if train.get("sync_weight")
                                and Path(train.get("expert") or "").resolve() == p.resolve()), None)  # fmt: skip
    if "reconstruction" not in done:
        data = LipWindows(clips, clip_frames=gen.clip_frames, size=gen.config.img_size, mel_length=gen.mel_length,
                          train=False)  # fmt: skip
        done["reconstruction"] = evaluate_generator(gen, data, batch_size=8)
        log(f"reconstruction on {len(clips)} held-out windows: {done['reconstruction']}")
    top, guidance = gen.top, chosen_guidance(args)
    if done["pairs"] and done["pairs"][0].get("guidance", 0.0) != guidance:
        raise SystemExit(f"{path} was scored with guidance {done['pairs'][0].get('guidance', 0.0)}, now {guidance}: "
                         "move it away to start again")  # fmt: skip
    seen = {p["src"] for p in done["pairs"]}
    for i, src in enumerate(clips):
        if src in seen:
            continue
        done["pairs"].append(pair_result(gen, judges, src, clips[(i + 1) % len(clips)], top, guidance))
        if len(done["pairs"]) % 20 == 0 or i + 1 == len(clips):
            tmp = path.with_suffix(".part")
            tmp.write_text(json.dumps(done))
            tmp.replace(path)
            log(f"{len(done['pairs'])} / {len(clips)} pairs")


def _ci(x: np.ndarray, seed: int = 0, n: int = 1000) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = [x[rng.integers(0, len(x), len(x))].mean() for _ in range(n)]
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_differences(doc: dict) -> list[str]:
    """Report lines: per judge, dubbed minus undubbed LSE-C and LSE-D clip by clip, with paired 95% bootstrap
    intervals (the same clips and sounds in both: tighter than comparing the two means' own intervals)."""
    pairs = doc["pairs"]
    lines = ["", "Dubbed minus undubbed, clip by clip (mean, paired 95% bootstrap interval; LSE-C should rise, "
             "LSE-D fall):", "", "| judge | video | LSE-C change | LSE-D change |", "|---|---|---|---|"]  # fmt: skip
    for judge in doc["judges"]:
        for cond in [c for c in ("dubbed", "guided") if c in pairs[0][judge]]:
            cells = []
            for metric in ("lse_c", "lse_d"):
                diff = np.array([p[judge][cond][metric] - p[judge]["undubbed"][metric] for p in pairs])
                lo, hi = _ci(diff)
                cells.append(f"{diff.mean():+.4f} ({lo:+.4f} to {hi:+.4f})")
            lines.append(f"| {judge} | {cond} | {cells[0]} | {cells[1]} |")
    return lines


def report(args: argparse.Namespace) -> str:
    doc = json.loads((args.work / "eval.json").read_text())
    if (args.work / "choose.json").is_file():
        doc["choose"] = json.loads((args.work / "choose.json").read_text())
    pairs, lines = doc["pairs"], []
    r = doc["reconstruction"]
    psnr = lambda mse: 10 * np.log10(1 / mse)  # noqa: E731
    lines += [f"Reconstruction, in-sync sound, reference from another moment ({len(pairs)} held-out GRID windows):",
              "", "| lower face | MSE | PSNR (dB) | L1 |", "|---|---|---|---|",
              f"| drawn by the generator | {r['mse']:.5f} | {psnr(r['mse']):.2f} | {r['l1']:.4f} |",
              f"| copying the reference | {r['ref_mse']:.5f} | {psnr(r['ref_mse']):.2f} | {r['ref_l1']:.4f} |",
              ]  # fmt: skip
    if "mse_other_sound" in r:
        lines.append(f"| drawn with another window's sound | {r['mse_other_sound']:.5f} | "
                     f"{psnr(r['mse_other_sound']):.2f} | |")  # fmt: skip
    lines.append("")
    lines += [f"Dubbing: {len(pairs)} held-out GRID sentences, each with the sound of the next one "
              "(LSE-D lower and LSE-C higher are better; offset: share of clips found within +-1 frame of 0):", "",
              "| judge | video + new sound | LSE-D | LSE-C (95% CI) | offset within +-1 |",
              "|---|---|---|---|---|"]  # fmt: skip
    for judge in doc["judges"]:
        dubbed = "dubbed (its sync loss: not independent)" if judge == doc.get("loss_expert") else "dubbed"
        guided = [("guided", f"{dubbed}, guidance {pairs[0]['guidance']:g}")] if "guided" in pairs[0][judge] else []
        for cond, label in (("undubbed", "undubbed"), ("dubbed", dubbed), *guided,
                            ("real", "real clip, its own sound")):  # fmt: skip
            d = np.array([p[judge][cond]["lse_d"] for p in pairs])
            c = np.array([p[judge][cond]["lse_c"] for p in pairs])
            near = np.mean([abs(p[judge][cond]["offset"]) <= 1 for p in pairs])
            lo, hi = _ci(c)
            lines.append(f"| {judge} | {label} | {d.mean():.3f} | {c.mean():.3f} ({lo:.3f}-{hi:.3f}) | {near:.3f} |")
        for cond in ("dubbed", *(g[0] for g in guided)):
            better = np.mean([p[judge][cond]["lse_c"] > p[judge]["undubbed"]["lse_c"]
                              and p[judge][cond]["lse_d"] < p[judge]["undubbed"]["lse_d"] for p in pairs])  # fmt: skip
            lines.append(f"| {judge} | share of clips with LSE-C up and LSE-D down, {cond} | | {better:.3f} | |")
    lines += paired_differences(doc)
    if "choose" in doc:
        lines += ["", "Guidance chosen on the generator's own held-out training-pool videos (mean LSE-C by "
                  f"{Path(doc['choose']['chooser']).parent.name}): " + ", ".join(
                      f"{g}: LSE-C {m['lse_c']:.3f}, LSE-D {m['lse_d']:.3f} (seams {m['seams']:.3f})"
                      for g, m in doc["choose"]["means"].items())
                  + f"; chosen {doc['choose']['chosen']:g}."]  # fmt: skip
    m = {k: np.array([p["mse_to_sound"][k] for p in pairs]) for k in ("undubbed", "dubbed")}
    closer = float(np.mean(m["dubbed"] < m["undubbed"]))
    lines += ["", f"Lower-face MSE to the clip that spoke the sound: undubbed {m['undubbed'].mean():.5f}, dubbed "
              f"{m['dubbed'].mean():.5f} (dubbed closer for {closer:.3f} of clips); how much dubbing changes the "
              f"lower face: MSE {np.mean([p['self_change'] for p in pairs]):.5f}."]  # fmt: skip
    if all("seams" in p for p in pairs):
        seams = {k: np.mean([p["seams"][k] for p in pairs]) for k in pairs[0]["seams"]}
        lines += ["", "Patch-grid seams in the lower face (step across the generator's patch borders / step inside "
                  "its patches; about 1 for camera footage): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in seams.items()) + "."]  # fmt: skip
    return "\n".join(lines)


def strip(args: argparse.Namespace, rows: int = 3, frames: tuple[int, ...] = tuple(range(20, 52, 4))) -> Path:
    """Original / dubbed / sound's own mouth for the first `rows` pairs, lower face only, every 4th frame."""
    import torch
    from PIL import Image, ImageDraw

    from marlin.lipsync.dub import dub_crops
    from marlin.lipsync.model import load_generator

    gen = load_generator(args.work / "generator" / "generator.pt")
    clips, size = _held_out(args), gen.config.img_size
    top, guidance = gen.top, chosen_guidance(args)
    label_w, blocks = 150, []
    for i in range(rows):
        src, dst = clips[i], clips[(i + 1) % len(clips)]
        _, va, orig, spoke = pair_clips(src, dst, size)
        shown = [(f"{Path(src).name}: original", orig),
                 (f"+ sound of {Path(dst).name}", dub_crops(gen, orig, va.mel, va.fps))]  # fmt: skip
        if guidance:
            shown.append((f"  same, guidance {guidance:g}", dub_crops(gen, orig, va.mel, va.fps, guidance=guidance)))
        for name, x in (*shown, (f"{Path(dst).name}: who spoke it", spoke)):
            row = torch.cat([x[:, f, top - 8 :] for f in frames], dim=2)  # [3, S - top + 8, F * S]
            img = Image.new("RGB", (label_w + row.shape[2], row.shape[1]), "white")
            img.paste(Image.fromarray(row.permute(1, 2, 0).numpy()), (label_w, 0))
            ImageDraw.Draw(img).text((4, row.shape[1] // 2 - 6), name, fill="black")
            blocks.append(np.asarray(img))
        blocks.append(np.full((6, blocks[-1].shape[1], 3), 255, np.uint8))
    path = args.work / "lipsync_strip.jpg"  # photographs: JPEG is a fifth of the PNG's size
    Image.fromarray(np.concatenate(blocks)).save(path, quality=88)
    return path


def main(argv: list[str] | None = None) -> None:
    curve = REPO / "runs" / "transfer_curve"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--curve", type=Path, default=curve, help="transfer_curve's --work (stores, checkpoints)")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "lipsync_eval")
    ap.add_argument("--marlin", type=Path, default=curve / "pretrain_marlin" / "checkpoints" / "step_3000.pt")
    ap.add_argument("--judges", nargs="+", type=Path, default=[REPO / "runs" / "sync_eval" / a / "expert.pt"
                    for a in ("pixels", "random")], help="experts that score the dubbed clips (the first also reports "
                    "P(in sync) during training)")  # fmt: skip
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--val-every", type=int, default=200)
    ap.add_argument("--init", type=Path, help="start from this generator.pt (the sync-loss stage)")
    ap.add_argument("--sync-weight", type=float, default=0.0, help="0: pixel loss only, every judge independent")
    ap.add_argument("--sync-expert", type=Path, help="the expert of the sync loss (default: the first judge); the "
                    "report marks it, since it is no independent judge of this generator")  # fmt: skip
    ap.add_argument("--sync-jitter", type=int, default=0)
    ap.add_argument("--still-upper", action="store_true", help="the generator sees one still upper half per window")
    ap.add_argument("--expert-audio", action="store_true", help="its sound trunk starts from the sync expert's")
    ap.add_argument("--adv-weight", type=float, default=0.0, help="weight of the patch critic's term (0: none)")
    ap.add_argument("--random-init", action="store_true", help="the generator's encoder starts untrained (--marlin "
                    "then only names the architecture)")  # fmt: skip
    ap.add_argument("--pixel-loss", choices=("mse", "l1"), default="mse")
    ap.add_argument("--sound-dropout", type=float, default=0.0, help="share of windows trained with silence (needed "
                    "by --guidance)")  # fmt: skip
    ap.add_argument("--refine", type=int, default=0, help="channels of the generator's conv refiner across patch "
                    "borders (0: none; added to an --init generator without one)")  # fmt: skip
    ap.add_argument("--guidance", nargs="+", type=float, default=[0.0], help="sound guidance candidates; the choose "
                    "stage keeps the best on the generator's own held-out videos")  # fmt: skip
    ap.add_argument("--chooser", type=Path, help="the expert that chooses the guidance (default: --sync-expert, else "
                    "the last judge)")  # fmt: skip
    ap.add_argument("--choose-pairs", type=int, default=40, help="held-out training-pool videos the choice is made on")
    ap.add_argument("--max-seam-rise", type=float, default=0.05, help="a guidance whose patch-grid seam ratio exceeds "
                    "that of the smallest candidate by more than this is not chosen (artefacts)")  # fmt: skip
    ap.add_argument("--pairs", type=int, default=200, help="held-out GRID test sentences dubbed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--from", dest="first", choices=STAGES, default="train")
    ap.add_argument("--until", choices=STAGES, default="report")
    args = ap.parse_args(argv)
    todo = STAGES[STAGES.index(args.first) : STAGES.index(args.until) + 1]
    if "train" in todo:
        stage_train(args)
    if "choose" in todo:
        stage_choose(args)
    if "eval" in todo:
        stage_eval(args)
    if "report" in todo:
        text = report(args)
        (args.work / "report.md").write_text(text + "\n")
        print(text)
        log(f"picture: {strip(args)}")


if __name__ == "__main__":
    main()
