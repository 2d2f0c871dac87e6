"""Does pretraining with marlin learn transferable face features? A scaling curve on GRID s1, with a clean protocol.

One command runs every stage; each stage keeps its outputs in ``--work`` and is skipped (or resumed) when they exist,
so an interrupted run continues where it stopped:

1. ``stores``   ``marlin prepare`` face-crop stores (224 px + LaPa parse maps):
                - ``grid_s1``: every GRID s1 sentence; the protocol's test sentences
                  (:func:`marlin.evaluate.manifest.grid_protocol_splits`: a fixed, letter-stratified, seeded 20%) are
                  its ``val`` split, so pretraining (which reads ``train``) never sees them;
                - ``faces``: every other shared face clip (talking heads, MARLIN samples, ``faces_more``); 15% of the
                  ``faces_more`` identities are its ``val`` split: unseen *people* for the held-out reconstruction.
2. ``pretrain`` tiny models (ViT 192-d, depth 6; 112 px crops, 16 frames at stride 2, 90% of tokens hidden,
                per-patch normalised targets) with the same data, schedule, batch and learning rate:
                ``marlin`` (fasking + adversarial critic) and ``tube`` (VideoMAE-style tube masking, no critic), and
                the masking variants (what the encoder sees: ``fasking``, ``fasking_opp``, ``random_mask`` at 90% and
                ``fasking_75``, none with a critic), the learning rate (``tube_lr1e-4``), four register tokens
                (``fasking_reg``, ``marlin_reg``) and a second seed (``*_seed1``), stopped at ``--variant-steps`` of
                that schedule.
                Checkpoints along the way are kept (``--ckpt-every``) for the curve.
3. ``features`` per encoder (random init = step 0, and every kept checkpoint of each run) the tokens of every GRID
                clip: three 16-frame windows at stride 2 (start / middle / end), pooled per time step over the face
                (``face``) and kept whole at half spatial resolution for the attentive probe; plus raw mouth pixels.
4. ``probe``    every GRID word slot, trained on the protocol's train sentences only (hyper-parameters by inner CV on
                them), scored once on the test sentences with a 95% bootstrap interval: a linear probe on the
                time-kept face features and an attentive probe on the tokens.
5. ``report``   the table (Markdown), the curve (PNG) and ``results.json``.

    python benchmarks/transfer_curve.py                    # everything, in runs/transfer_curve
    python benchmarks/transfer_curve.py --until stores     # stop after a stage (--from to start at one)

Needs ../shared/data (or --data).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("stores", "pretrain", "features", "probe", "report")


def log(msg: str) -> None:
    print(f"[transfer_curve {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def marlin_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "marlin.cli", *args]


# ---- stage 1: stores -------------------------------------------------------------------------------------------------
def _write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "group", "split"])
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def store_manifests(args: argparse.Namespace) -> dict[str, tuple[Path, list[str]]]:
    """CSV manifests (path, group, split) of the two stores and the extra `marlin prepare` options of each."""
    from marlin.evaluate.manifest import grid_protocol_splits

    grid = args.data / "grid_s1"
    with open(grid / "labels.csv", newline="") as f:
        videos = [r["video"] for r in csv.DictReader(f)]
    splits = grid_protocol_splits(grid, seed=0)
    grid_rows = [{"path": str(grid / "videos" / v), "group": "s1", "split": "val" if s == "test" else "train"}
                 for v, s in zip(videos, splits, strict=True)]  # fmt: skip
    face_rows = []
    for folder in ("talking_heads", "marlin_samples"):
        for f in sorted((args.data / folder).glob("*.mp4")):
            face_rows.append({"path": str(f), "group": f"{folder}:{f.stem}", "split": "train"})
    more = args.data / "faces_more"
    with open(more / "manifest.csv", newline="") as f:
        for r in csv.DictReader(f):
            face_rows.append({"path": str(more / "videos" / r["video"]), "group": r["identity"], "split": ""})
    out = {}
    for name, rows in (("grid_s1", grid_rows), ("faces", face_rows)):
        path = args.work / "manifests" / f"{name}.csv"
        _write_csv(path, rows)
        out[name] = (path, ["--val-fraction", "0.15", "--max-frames", "300"] if name == "faces" else [])
    return out


def store_paths(args: argparse.Namespace) -> dict[str, Path]:
    return {name: args.work / "stores" / name for name in ("grid_s1", "faces")}


def stage_stores(args: argparse.Namespace) -> dict[str, Path]:
    """`marlin prepare` each store; it is resumable, so a finished store costs a quick check of its items."""
    stores = store_paths(args)
    for name, (manifest, options) in store_manifests(args).items():
        log(f"preparing {manifest} -> {stores[name]}")
        cmd = marlin_cmd("prepare", str(manifest), "--out", str(stores[name]), "--workers", "2", "--no-progress",
                         *options)  # fmt: skip
        subprocess.run(cmd, check=True)
    return stores


# ---- stage 2: pretraining --------------------------------------------------------------------------------------------
# The two runs share everything but the masking strategy and the critic (as benchmarks/grid_probe.py, whose critic
# weight note applies: the released 0.01 stalled learning with normalised targets at this size, 0.001 does not).
COMMON = [
    "--config", "marlin_vit_tiny", "--batch-size", "8", "--workers", "1",
    "model.name=marlin_vit_tiny_112", "model.img_size=112", "data.temporal_sample_rate=2",
    "mask.ratio=0.9", "loss.norm_target=true", "precision=fp32",
    "optim.scale_lr=false", "optim.lr=5e-4", "optim.min_lr=1e-5", "optim.warmup_lr=1e-5", "optim.warmup_steps=100",
    "ckpt.keep=1000", "log.every=20", "log.image_every=500", "val.max_clips=48",
]  # fmt: skip
RUNS_MARLIN = ["mask.strategy=fasking", "loss.adversarial=true", "loss.adv_weight=0.001", "loss.gp_weight=10"]
RUNS = {
    "marlin": RUNS_MARLIN,
    "tube": ["mask.strategy=tube", "loss.adversarial=false"],
    # What the encoder sees (issue 14's lead: under fasking at 90% no visible token shows an eye, nose or mouth): the
    # masking alone changes, no critic, everything else as above; stopped at --variant-steps of the same schedule.
    "fasking": ["mask.strategy=fasking", "loss.adversarial=false"],
    "fasking_opp": ["mask.strategy=fasking_opp", "loss.adversarial=false"],
    "random_mask": ["mask.strategy=random", "loss.adversarial=false"],
    "fasking_75": ["mask.strategy=fasking", "mask.ratio=0.75", "loss.adversarial=false"],
    # the attention sink seen under fasking (attention piled onto 1-3 background patches): 4 register tokens give
    # the encoder somewhere else to put it
    "fasking_reg": ["mask.strategy=fasking", "loss.adversarial=false", "model.num_registers=4"],
    "marlin_reg": [*RUNS_MARLIN, "model.num_registers=4"],
    # a second seed (initialisation, clip order, masks): how far two runs of one recipe land apart
    "fasking_seed1": ["mask.strategy=fasking", "loss.adversarial=false", "seed=1"],
    "fasking_reg_seed1": ["mask.strategy=fasking", "loss.adversarial=false", "model.num_registers=4", "seed=1"],
    "tube_seed1": ["mask.strategy=tube", "loss.adversarial=false", "seed=1"],
    # the target (issue 14's "effect of normalised targets"): raw pixels, as the released MARLIN models were trained,
    # and for MARLIN the released critic weight (0.01), which stalled only with normalised targets
    "marlin_raw": [*RUNS_MARLIN, "loss.adv_weight=0.01", "loss.norm_target=false"],
    "tube_raw": ["mask.strategy=tube", "loss.adversarial=false", "loss.norm_target=false"],
    # one speaker is 86% of the clips ("what the models learn is one speaker"): each store drawn as often as the other
    "marlin_balance": [*RUNS_MARLIN, "data.balance=store"],
    "marlin_seed1": [*RUNS_MARLIN, "seed=1"],
    "marlin_balance_seed1": [*RUNS_MARLIN, "data.balance=store", "seed=1"],
    # the learning rate: 5x lower (MAE's linear scaling rule would give 4.7e-6 for batch 8; the runs use 5e-4)
    "tube_lr1e-4": ["mask.strategy=tube", "loss.adversarial=false", "optim.lr=1e-4"],
}
# per run, in RUNS order
COLOURS = ("tab:red", "tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:olive", "tab:pink",
           "tab:gray", "black", "lightsteelblue", "darkred", "goldenrod", "lightcoral", "khaki", "navy",
           "tab:cyan")  # fmt: skip
# short runs, stopped at --variant-steps
VARIANTS = ("fasking", "fasking_opp", "random_mask", "fasking_75", "fasking_reg", "marlin_reg", "fasking_seed1",
            "fasking_reg_seed1", "tube_seed1", "marlin_raw", "tube_raw", "marlin_balance", "marlin_seed1",
            "marlin_balance_seed1", "tube_lr1e-4")  # fmt: skip


def run_dir(args: argparse.Namespace, name: str) -> Path:
    return args.work / f"pretrain_{name}"


def _pretrain_cmd(args: argparse.Namespace, stores: dict[str, Path], name: str) -> list[str]:
    at = args.variant_steps if name in VARIANTS else args.stop_at
    stop = ["--stop-at", str(at)] if at else []
    return marlin_cmd("pretrain", *COMMON, *RUNS[name], "--data", f"{stores['grid_s1']},{stores['faces']}",
                      "--out", str(run_dir(args, name)), f"val.source={stores['faces']}#val",
                      f"val.every={args.ckpt_every}", f"ckpt.every={args.ckpt_every}", "--max-steps", str(args.steps),
                      *stop, "--seed", "0", "--resume", "auto")  # fmt: skip


def stage_pretrain(args: argparse.Namespace, stores: dict[str, Path]) -> None:
    """The runs, ``--parallel`` at a time (``--threads-per-run`` each), each resumed from its last checkpoint when
    interrupted. Held-out reconstruction is measured on the unseen people only (``faces#val``): the GRID test sentences
    stay out."""
    todo = sorted(args.runs, key=lambda n: n not in VARIANTS)
    running: dict[str, subprocess.Popen] = {}
    while todo or running:
        while todo and len(running) < args.parallel:
            name = todo.pop(0)
            out, cmd = run_dir(args, name), _pretrain_cmd(args, stores, name)
            out.mkdir(parents=True, exist_ok=True)
            log(f"{name}: {' '.join(cmd[2:])}")
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads_per_run), PYTHONUNBUFFERED="1")
            running[name] = subprocess.Popen(cmd, env=env, stdout=open(out / "log.txt", "a"), stderr=subprocess.STDOUT)
        time.sleep(2)
        for name, p in list(running.items()):
            if p.poll() is None:
                continue
            del running[name]
            if p.returncode != 0:
                raise SystemExit(f"pretraining {name} failed (exit {p.returncode}); see {run_dir(args, name)}/log.txt")
            log(f"{name}: done")


# ---- stage 3: features ----------------------------------------------------------------------------------------------
N_WINDOWS = 3  # start / middle / end of each 75-frame GRID clip, 16 frames at stride 2
MOUTH = (7, 8, 9)  # LaPa upper lip, inner mouth, lower lip
CLIP_FRAMES, RATE, SIDE, TUBELET = 16, 2, 112, 2


def grid_items(args: argparse.Namespace, store) -> list:  # noqa: ANN001
    """Store items in labels.csv order (the probes' row order)."""
    with open(args.data / "grid_s1" / "labels.csv", newline="") as f:
        ids = [Path(r["video"]).stem for r in csv.DictReader(f)]
    by_id = {it.id: it for it in store.split(None)}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise SystemExit(f"{len(missing)} GRID videos are not in the store (e.g. {missing[0]}); rerun --from stores")
    return [by_id[i] for i in ids]


def window_frames(n_frames: int) -> list[list[int]]:
    import numpy as np

    span = (CLIP_FRAMES - 1) * RATE + 1
    starts = np.linspace(0, max(n_frames - span, 0), N_WINDOWS).round().astype(int)
    return [[min(s + i * RATE, n_frames - 1) for i in range(CLIP_FRAMES)] for s in starts]


def mouth_centre(parse) -> tuple[float, float]:  # noqa: ANN001
    """Median (row, col) of the lip / mouth pixels of parse maps ``[T, H, W]`` as fractions of the side (the usual
    place of the mouth in a face crop when the parser found none)."""
    import numpy as np

    ys, xs = np.nonzero(np.isin(parse, MOUTH).any(0))
    if not len(ys):
        return 0.75, 0.5
    return float(np.median(ys)) / parse.shape[1], float(np.median(xs)) / parse.shape[2]


def cache_clips(args: argparse.Namespace, stores: dict[str, Path]) -> Path:
    """Decode every GRID window once: ``clips.npy`` uint8 ``[N, W, T, S, S, 3]`` (S = 112), each window's mouth
    centre ``mouth_centres.npy`` ``[N, W, 2]`` (fractions of the side), and the raw-pixel baseline
    ``features/pixels.npy`` ``[N, 25, 256]`` (an 80 px square around the mouth of the 224 px crop, grey, 16 x 16,
    every 3rd frame), so each encoder's pass is compute only."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from marlin.data.store import ClipStore

    path = args.work / "features" / "clips.npy"
    pixels_path = args.work / "features" / "pixels.npy"
    mouth_path = args.work / "features" / "mouth_centres.npy"
    if path.is_file() and pixels_path.is_file() and mouth_path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    store = ClipStore(stores["grid_s1"])
    items = grid_items(args, store)
    part = path.with_name("clips.part.npy")
    clips = np.lib.format.open_memmap(part, "w+", np.uint8, (len(items), N_WINDOWS, CLIP_FRAMES, SIDE, SIDE, 3))
    pixels, centres = [], np.zeros((len(items), N_WINDOWS, 2), np.float32)
    for k, item in enumerate(items):
        for w, frames in enumerate(window_frames(item.n_frames)):
            v = torch.from_numpy(store.read_video(item, frames)).permute(0, 3, 1, 2).float()  # [T, 3, 224, 224]
            clips[k, w] = F.interpolate(v, size=(SIDE, SIDE), mode="area").round().byte().permute(0, 2, 3, 1).numpy()
            centres[k, w] = mouth_centre(store.read_parse(item, frames))
        every = [min(i, item.n_frames - 1) for i in range(0, 75, 3)]  # 25 frames (a short clip repeats its last)
        video, parse = store.read_video(item, every), store.read_parse(item, every)
        size, box = video.shape[1], 80
        cy, cx = (int(c * size) for c in mouth_centre(parse))
        y0, x0 = min(max(cy - box // 2, 0), size - box), min(max(cx - box // 2, 0), size - box)
        grey = video[:, y0 : y0 + box, x0 : x0 + box].astype(np.float32).mean(-1) / 255.0  # [25, 80, 80]
        pixels.append(F.interpolate(torch.from_numpy(grey)[:, None], size=(16, 16), mode="area")[:, 0].reshape(25, -1))
        if (k + 1) % 200 == 0:
            log(f"  decoded {k + 1}/{len(items)} clips")
    clips.flush()
    del clips
    np.save(pixels_path, torch.stack(pixels).numpy().astype(np.float32))
    np.save(mouth_path, centres)
    os.replace(part, path)
    return path


def encoders(args: argparse.Namespace) -> dict[str, Path | None]:
    """The encoders of the curve: ``random`` (step 0: the runs' architecture, seeded, untrained), and per run its
    checkpoints ``<run>@<step>`` at the ``--curve-steps`` and its latest one (a run still going, or stopped early,
    still gives its furthest point); then the ``--encoder NAME=PATH`` models, and with ``--copies int8 bf16`` each
    trained encoder again as ``<name>+int8`` / ``<name>+bf16`` (features from `Marlin.for_inference(precision)`:
    what that precision does to a probe), and with ``--views steps`` every fp32 encoder again as ``<name>~steps``
    (each time step's tokens encoded on their own: see `encode_all`)."""
    out: dict[str, Path | None] = {"random": None}
    for name in args.runs:
        ckpts = sorted((int(p.stem.split("_")[1]), p) for p in run_dir(args, name).glob("checkpoints/step_*.pt"))
        for i, (step, ck) in enumerate(ckpts):
            if step in args.curve_steps or i == len(ckpts) - 1:
                out[f"{name}@{step}"] = ck
    out.update(args.encoder)
    for precision in args.copies:
        out.update({f"{name}+{precision}": ck for name, ck in list(out.items()) if ck is not None and "+" not in name})
    for view in args.views:
        out.update({f"{name}~{view}": ck for name, ck in list(out.items()) if "+" not in name and "~" not in name})
    return out


def encoder_model(args: argparse.Namespace, name: str, ckpt: Path | None):  # noqa: ANN201
    """The model of `encoders()` entry `name`: random init (seeded; the runs' architecture, or that of the first
    ``--encoder`` when no run has started), a checkpoint, or a checkpoint in another precision (``+int8``)."""
    import torch

    from marlin.models.model import create_model, from_spec
    from marlin.train.config import load_config

    name = name.split("~")[0]  # a view changes how the features are taken, not the model
    if ckpt is not None:
        model = from_spec(str(ckpt)).eval()
        precision = name.split("+")[1] if "+" in name else None
        if precision == "int8-7bit":  # the int8 path as CPUs without VNNI run it (see marlin.models.quantize)
            from marlin.models.quantize import quantize_int8

            return quantize_int8(model.for_inference("fp32"), full_range=False)
        return model.for_inference(precision) if precision else model
    torch.manual_seed(0)
    config = run_dir(args, args.runs[0]) / "config.yaml"
    if config.is_file() or not args.encoder:
        return create_model(load_config(config).model).eval()
    return create_model(from_spec(str(next(iter(args.encoder.values())))).config).eval()


def encode_all(model, clips, centres, layers: tuple[int, ...], batch: int = 12, per_step: bool = False) -> dict:  # noqa: ANN001
    """One pass of `model` over every cached window. Per kept block `k` (1-based, after the final norm) the tokens
    averaged over the crop per time step (``L<k>`` ``[N, W * T', D]``); for the last block also the 3 x 3 patches
    around the window's mouth averaged per time step (``mouth``, the region the raw-pixel baseline sees) and all
    its tokens averaged over 2 x 2 patch regions (``tokens`` ``[N, W * T' * ceil(g / 2)^2, D]`` float16; 4x fewer
    for the attentive probe to attend, which keeps it to minutes on a CPU).

    `per_step`: each time step's g * g tokens (with their own positions) pass through the blocks as a sequence of
    their own, so no token attends across time. Pretraining shows the encoder ~10% of a clip's tokens (39 of 392
    for the tiny models); one time step is 49, near what it was trained on, where the whole clip is 10x more."""
    import numpy as np
    import torch

    enc, cfg = model.encoder, model.config
    t_steps, g = cfg.clip_frames // cfg.tubelet_size, cfg.img_size // cfg.patch_size
    n, w = clips.shape[:2]
    flat = clips.reshape(n * w, *clips.shape[2:])  # [N*W, T, S, S, 3]
    rc = np.clip((centres.reshape(n * w, 2) * g).astype(int) - 1, 0, g - 3)  # top-left of the 3 x 3 mouth patches
    per_layer: dict[int, list] = {k: [] for k in layers}
    tokens, mouth = [], []
    from marlin.utils.precision import autocast

    low = model.precision if model.precision in ("bf16", "fp16") else "fp32"  # under autocast, as extract_features
    for i in range(0, len(flat), batch):
        x = torch.from_numpy(np.array(flat[i : i + batch])).permute(0, 4, 1, 2, 3).float().div_(255)  # a copy: writable
        with torch.inference_mode(), autocast("cpu", low):
            e = enc.embed(x)  # [b, T' * g * g, D]
            e = e.reshape(len(x) * t_steps, g * g, -1) if per_step else e  # [b * T', g * g, D]: one step a sequence
            for k, h in enumerate(enc.iter_blocks(e), 1):
                h = h.reshape(len(x), t_steps * g * g, -1)  # [b, T' * g * g, D] after block k
                if k in per_layer:
                    per_layer[k].append(enc.norm(h).float().reshape(len(x), t_steps, g * g, -1).mean(2).numpy())
            z = enc.norm(h).float().reshape(len(x), t_steps, g, g, -1)  # [b, T', g, g, D]
        for j, (r, c) in enumerate(rc[i : i + batch]):
            mouth.append(z[j, :, r : r + 3, c : c + 3].mean((1, 2)).numpy())  # [T', D]
        zt = z.permute(0, 1, 4, 2, 3).flatten(0, 1)  # [b * T', D, g, g]
        zt = torch.nn.functional.avg_pool2d(zt, 2, ceil_mode=True)  # 2 x 2 patch regions: 4x fewer tokens to attend
        tokens.append(zt.flatten(2).transpose(1, 2).reshape(len(x), -1, z.shape[-1]).half().numpy())
    out: dict[str, object] = {f"L{k}": np.concatenate(v).reshape(n, w * t_steps, -1) for k, v in per_layer.items()}
    out["mouth"] = np.stack(mouth).reshape(n, w * t_steps, -1)
    out["tokens"] = np.concatenate(tokens).reshape(n, -1, tokens[0].shape[-1])
    return out


def feature_file(args: argparse.Namespace, encoder: str, kind: str) -> Path:
    return args.work / "features" / encoder.replace("@", "_") / f"{kind}.npy"


def stage_features(args: argparse.Namespace, stores: dict[str, Path]) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    clips = np.load(cache_clips(args, stores), mmap_mode="r")
    centres = np.load(args.work / "features" / "mouth_centres.npy")
    for name, ckpt in encoders(args).items():
        if feature_file(args, name, "tokens").is_file():
            continue
        t0 = time.time()
        model = encoder_model(args, name, ckpt)
        depth = len(model.encoder.blocks)
        layers = tuple(sorted({depth // 3, 2 * depth // 3, depth}))
        # int8 quantises activations per call: one clip per call, as `Marlin.for_inference` runs it on a CPU
        feats = encode_all(model, clips, centres, layers, batch=1 if "+int8" in name else 12,
                           per_step=name.endswith("~steps"))  # fmt: skip
        for kind, arr in feats.items():
            target = feature_file(args, name, kind)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".part.npy")
            np.save(tmp, arr)
            os.replace(tmp, target)  # tokens last: its presence marks the encoder done
        log(f"features {name}: {', '.join(f'{k} {tuple(v.shape)}' for k, v in feats.items())} in "
            f"{time.time() - t0:.0f} s")  # fmt: skip


# ---- stage 4: probes -------------------------------------------------------------------------------------------------
SLOTS = ("command", "color", "preposition", "letter", "digit", "adverb")
L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def protocols(depth: int) -> dict[str, tuple[str, str]]:
    """Protocol name -> (feature kind, head): linear probes on the time-kept face features of the last block and of
    the block at two thirds of the depth and on the last block's mouth features, the attentive probe on the last
    block's tokens, and ``centred`` linear probes on the last block's face and mouth features (each window's mean
    over its time steps subtracted, or not, chosen with the L2 strength by the inner CV: ``ProbeConfig.centre``), and
    the attentive probe again on tokens centred so, per place (always: beside the plain one, both are scored).
    (Features of the block at one third are kept too; probing them as well doubles the stage's time.)"""
    out = {f"linear L{k}": (f"L{k}", "linear") for k in sorted({2 * depth // 3, depth})}
    out[f"linear L{depth} mouth"] = ("mouth", "linear")
    out["attentive"] = ("tokens", "attentive")
    out["centred attentive"] = ("tokens", "centred attentive")
    out[f"centred L{depth}"] = (f"L{depth}", "centred")
    out[f"centred L{depth} mouth"] = ("mouth", "centred")
    return out


def _probe_one(x, labels, head: str, clip_steps: int | None) -> dict:  # noqa: ANN001
    from marlin.evaluate.attentive import AttentiveConfig
    from marlin.evaluate.probe import ProbeConfig, run_probe

    if head == "linear":
        x = x.reshape(len(x), -1)  # time-kept: the steps in order
        cfg = ProbeConfig(folds=None, pca=200, seed=0, l2_grid=L2_GRID, inner_folds=3)
    elif head == "centred":  # the same probe on [N, steps, D], each clip centred in time or not, by the inner CV
        cfg = ProbeConfig(folds=None, pca=200, seed=0, l2_grid=L2_GRID, inner_folds=3, centre="auto",
                          clip_steps=clip_steps)  # fmt: skip
    else:
        # one pool per time step (3 windows x 8), in order: a word slot is *when* the mouth says it; the epoch count is
        # chosen on a held-out fifth of the training sentences
        acfg = AttentiveConfig(epochs=20, lr_grid=(3e-3,), time_steps=N_WINDOWS * CLIP_FRAMES // TUBELET)
        centre = "on" if head == "centred attentive" else "off"
        cfg = ProbeConfig(head="attentive", folds=None, seed=0, attentive=acfg, centre=centre, clip_steps=clip_steps)
    res = run_probe(x, labels, cfg)["by_fraction"]["1"]
    ci = res["ci95"]
    return {"accuracy": res["metrics"]["accuracy"]["mean"], "low": ci["low"], "high": ci["high"],
            "chosen": res.get("l2", res.get("chosen"))}  # fmt: skip


# job order: the most telling first
PRIORITY = ("linear L6 mouth", "centred L6 mouth", "attentive", "centred attentive", "centred L6", "linear L6",
            "linear L4")  # fmt: skip
PIXELS = ("pixels", "centred pixels")  # the raw-pixel baseline's protocols (its encoder is "pixels")


def probe_jobs(args: argparse.Namespace) -> list[tuple[str, str, str, str, tuple[str, ...]]]:
    """(protocol, encoder, feature kind, head, slots) for every encoder with features, most telling protocol first;
    the attentive probes (the costly ones) on ``--attentive-slots`` of ``--attentive-encoders`` only; with
    ``--protocols``, only those."""
    jobs = [("pixels", "pixels", "pixels", "linear", SLOTS), ("centred pixels", "pixels", "pixels", "centred", SLOTS)]
    jobs = [j for j in jobs if args.protocols is None or j[0] in args.protocols]
    per_encoder = []
    for name in encoders(args):
        if not feature_file(args, name, "tokens").is_file():
            continue
        depth = int(max(int(f.stem[1:]) for f in feature_file(args, name, "x").parent.glob("L*.npy")))
        for proto, (kind, head) in protocols(depth).items():
            slots = SLOTS
            if head.endswith("attentive"):
                wanted = args.attentive_encoders is None or name in args.attentive_encoders
                slots = tuple(args.attentive_slots) if wanted else ()
            if slots and (args.protocols is None or proto in args.protocols):
                per_encoder.append((proto, name, kind, head, slots))
    rank = {p: i for i, p in enumerate(PRIORITY)}
    return jobs + sorted(per_encoder, key=lambda j: rank.get(j[0], len(rank)))


def load_results(args: argparse.Namespace) -> dict:
    """``{protocol: {encoder: {slot: result}}}`` from the per-job files of the probe stage."""
    table: dict = {}
    for f in sorted((args.work / "probes").glob("*.json")):
        job = json.loads(f.read_text())
        table.setdefault(job["protocol"], {})[job["encoder"]] = job["slots"]
    return table


def stage_probe(args: argparse.Namespace) -> dict:
    """Every job of :func:`probe_jobs` (with ``--part I/N`` every N-th from the I-th: processes on disjoint jobs), each
    kept in its own ``probes/<protocol>__<encoder>.json`` after every slot (resumable)."""
    import numpy as np
    import torch

    from marlin.evaluate.manifest import read_grid

    torch.set_num_threads(args.threads)
    labels = {slot: read_grid(args.data / "grid_s1", slot, protocol=True) for slot in SLOTS}
    part, parts = args.part
    (args.work / "probes").mkdir(parents=True, exist_ok=True)
    for proto, name, kind, head, slots in probe_jobs(args)[part::parts]:
        path = args.work / "probes" / f"{proto.replace(' ', '_')}__{name.replace('@', '_')}.json"
        job = json.loads(path.read_text()) if path.is_file() else {"protocol": proto, "encoder": name, "slots": {}}
        todo = [s for s in slots if s not in job["slots"]]
        if not todo:
            continue
        src = args.work / "features" / "pixels.npy" if name == "pixels" else feature_file(args, name, kind)
        x = np.load(src, mmap_mode="r" if head.endswith("attentive") else None)
        # a window's 8 time steps are centred together; the pixels' 25 frames span the sentence: one clip
        clip = None if name == "pixels" else CLIP_FRAMES // TUBELET
        for slot in todo:
            t0 = time.time()
            r = job["slots"][slot] = _probe_one(x, labels[slot], head, clip)
            log(f"{proto:15s} {name:12s} {slot:12s} {r['accuracy']:.3f} [{r['low']:.3f}, {r['high']:.3f}] "
                f"({time.time() - t0:.0f} s)")  # fmt: skip
            tmp = path.with_name(path.name + ".part")
            tmp.write_text(json.dumps(job, indent=1))
            os.replace(tmp, path)
    return load_results(args)


# ---- stage 5: report ------------------------------------------------------------------------------------------------
def _step(name: str) -> int:
    """The pretraining step of a curve encoder (``run@step``, also as a ``+int8`` / ``+bf16`` copy or a ``~steps``
    view; random init 0); -1 for ``--encoder`` models."""
    name = name.split("~")[0]
    return 0 if name == "random" else int(name.split("@")[1].split("+")[0]) if "@" in name else -1


def _label(name: str) -> str:
    """An encoder's row label: its run, with the copy or view it is (``marlin+int8``, ``tube~steps``); the step has a
    column of its own."""
    run, _, rest = name.partition("@")
    return run + rest.lstrip("0123456789")


def _slot_mean(cells: dict) -> float | None:
    """Mean test accuracy over the six slots; None until every slot is probed."""
    return sum(cells[s]["accuracy"] for s in SLOTS) / len(SLOTS) if all(s in cells for s in SLOTS) else None


def _mean_cell(cells: dict) -> str:
    mean = _slot_mean(cells)
    return "" if mean is None else f"{mean:.3f}"


def markdown(table: dict) -> str:
    """Per protocol and encoder: test accuracy (protocol split, 200 sentences) per slot and the mean over slots."""
    lines = ["| protocol | encoder | step | " + " | ".join(SLOTS) + " | mean |", "|---|---|---|" + "---|" * 7]
    for proto, rows in table.items():
        for name, cells in sorted(rows.items(), key=lambda kv: (kv[0].split("@")[0] != "random", kv[0].split("@")[0],
                                                                  _step(kv[0]) if "@" in kv[0] else 0)):  # fmt: skip
            if _slot_mean(cells) is None:
                continue
            shown = [f"{cells[s]['accuracy']:.3f} [{cells[s]['low']:.2f}, {cells[s]['high']:.2f}]" for s in SLOTS]
            step = "-" if name == "pixels" or _step(name) < 0 else str(_step(name))
            lines.append(f"| {proto} | {_label(name)} | {step} | " + " | ".join(shown) +
                         f" | {_mean_cell(cells)} |")  # fmt: skip
    return "\n".join(lines)


def summary(table: dict) -> str:
    """Mean test accuracy over the six slots, one row per encoder and one column per protocol (the curve's numbers)."""
    protos = [p for p in table if p not in PIXELS]
    names = sorted({n for p in protos for n in table[p]}, key=lambda n: (n != "random", n.split("@")[0], _step(n)))
    lines = ["| encoder | step | " + " | ".join(protos) + " |", "|---|---|" + "---|" * len(protos)]
    for name in names:
        cells = [_mean_cell(table[proto].get(name, {})) for proto in protos]
        step = _step(name)
        lines.append(f"| {_label(name)} | {step if step >= 0 else '-'} | " + " | ".join(cells) + " |")
    for proto in PIXELS:
        pixels = table.get(proto, {}).get("pixels", {})
        if all(s in pixels for s in SLOTS):
            lines.append(f"| raw mouth pixels | - | {_mean_cell(pixels)} ({proto.replace('pixels', 'linear')}) |")
    return "\n".join(lines)


def _save_png(fig, path: Path) -> Path:  # noqa: ANN001
    """Write a matplotlib figure to `path` atomically (a partial file never takes its name) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(path.name + ".part")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def plot_curve(table: dict, path: Path) -> Path | None:
    """Mean test accuracy over the six slots against pretraining steps, one panel per protocol."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    protos = sorted((p for p in table if p not in PIXELS), key=lambda p: (p.startswith("centred"), p))
    cols = min(len(protos), 4)  # plain protocols on the first row, centred ones below
    rows_ = -(-len(protos) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4.4 * cols, 4.0 * rows_), sharey=True, squeeze=False)
    for ax in axes.flat[len(protos) :]:
        ax.set_visible(False)
    for ax, proto in zip(axes.flat, protos, strict=False):
        rows = table[proto]
        pixels = table.get("centred pixels" if proto.startswith("centred") else "pixels", {}).get("pixels", {})
        for run, colour in zip(RUNS, COLOURS, strict=True):
            pts = sorted((_step(n), _slot_mean(c)) for n, c in rows.items()
                         if (n == "random" or n.startswith(run + "@")) and _label(n) in ("random", run)
                         and _slot_mean(c) is not None)  # fmt: skip
            if len(pts) > 1:  # step 0 alone (a run not probed yet) is not drawn; a variant's point joins step 0 dotted
                ls = "-" if run in ("marlin", "tube") else ":"
                ax.plot(*zip(*pts, strict=True), marker="o", color=colour, ls=ls, label=run)
        if all(s in pixels for s in SLOTS):
            ax.axhline(_slot_mean(pixels), color="black", ls="--", lw=1,
                       label="raw mouth pixels")  # fmt: skip
        ax.set_title(proto)
        ax.set_xlabel("pretraining steps (0 = random init)")
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("GRID test accuracy, mean of 6 slots")
    legend: dict = {}  # every run drawn in any panel (a variant may lack a protocol)
    for ax in axes.flat:
        legend.update({label: handle for handle, label in zip(*ax.get_legend_handles_labels(), strict=True)})
    axes[0][0].legend(list(legend.values()), list(legend), fontsize=8)
    return _save_png(fig, path)


def plot_centring(args: argparse.Namespace, table: dict, path: Path) -> Path | None:
    """The mouth probe of every encoder against how much of its mouth features changes within a window (log scale),
    linear (open) and centred (filled) joined by an arrow: the less a window's features change, the lower the plain
    probe and the more centring gives back."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    plain, centred = table.get("linear L6 mouth", {}), table.get("centred L6 mouth", {})
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for name in sorted(set(plain) & set(centred)):
        if _label(name) != name.split("@")[0] or _step(name) not in (-1, 0, 1000):  # 1000-step encoders, as they are
            continue
        a, b = _slot_mean(plain[name]), _slot_mean(centred[name])
        share = _changing_share(feature_file(args, name, "mouth"))
        if a is None or b is None or share != share:  # nan: no features
            continue
        colour = "black" if "@" not in name else "tab:blue" if "tube" in name else "tab:red"  # no step: random init
        ax.annotate("", (share, b), (share, a), arrowprops={"arrowstyle": "->", "color": colour, "alpha": 0.6})
        ax.scatter([share], [a], facecolors="none", edgecolors=colour, s=30)
        ax.scatter([share], [b], color=colour, s=30)
        ax.annotate(name.replace("@1000", ""), (share, b), xytext=(4, 2), textcoords="offset points", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("share of the mouth features' variance that changes within a window")
    ax.set_ylabel("GRID test accuracy, mean of 6 slots")
    ax.set_title("linear L6 mouth (open) -> centred (filled); red: MARLIN, fasking, other masks; blue: tube; "
                 "black: random init", fontsize=8)  # fmt: skip
    ax.grid(alpha=0.3)
    return _save_png(fig, path)


RECON_SETS = (("grid_s1", "train", "GRID train sentences"), ("grid_s1", "val", "GRID test sentences"),
              ("faces", "train", "other people, trained on"), ("faces", "val", "unseen people"))  # fmt: skip


def recon_table(args: argparse.Namespace, clips: int = 24) -> str:
    """Hidden-patch error (normalised targets) of each probed checkpoint on four sets — what the model learnt to
    reconstruct and for whom — next to predicting each hidden patch's own mean (~1.0); for the raw-pixel runs their
    pixel MSE next to the visible patches' mean colour. Evaluation only: nothing is chosen on it (the GRID test
    sentences are never trained on)."""
    import torch

    from marlin.data.datasets import PretrainDataset
    from marlin.models.model import create_model
    from marlin.train.config import load_config
    from marlin.train.validate import validate

    torch.set_num_threads(args.threads)
    head = "| run | step | " + " | ".join(label for *_, label in RECON_SETS) + " |"
    lines = [head, "|---|---|" + "---|" * len(RECON_SETS)]
    cache_path = args.work / "recon.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    for name, ckpt in encoders(args).items():
        # curve checkpoints only: a copy or a view has its weights' reconstructions, an --encoder model no run config
        if ckpt is None or "@" not in name or _label(name) != name.split("@")[0]:
            continue
        run, step = name.split("@")
        cfg = load_config(run_dir(args, run) / "config.yaml")
        if name not in cache:
            model = create_model(cfg.model, full=True)
            state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
            model.load_state_dict({k: v for k, v in state.items() if not k.startswith("discriminator.")})  # no critic
            row = {}
            for store, split, label in RECON_SETS:
                ds = PretrainDataset.from_config(args.work / "stores" / store, cfg.model, split=split,
                                                 sample_rate=cfg.data.temporal_sample_rate, mode="eval")  # fmt: skip
                idx = list(range(0, len(ds), max(1, len(ds) // clips)))[:clips]
                m = validate(model, ds, idx, cfg)
                # raw-pixel targets (``*_raw``): pixel MSE against the visible patches' mean colour instead
                row[label] = [m["val/rec"], m["val/patch_mean_rec"]] if cfg.loss.norm_target else [
                    m["val/mse"], m["val/visible_mean_mse"]]  # fmt: skip
            cache[name] = row
            cache_path.write_text(json.dumps(cache, indent=1))
        run += "" if cfg.loss.norm_target else " (raw pixels: MSE vs visible mean)"
        cells = [f"{cache[name][label][0]:.3f} ({cache[name][label][1]:.3f})" for *_, label in RECON_SETS]
        lines.append(f"| {run} | {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def health_table(args: argparse.Namespace) -> str:
    """Collapse check per encoder, on the last block's clip features (face tokens averaged over the clip, ``[N, D]``):
    the effective rank (exp of the entropy of the normalised PCA spectrum; D when every direction carries equal
    variance, 1 when all clips lie on a line) and the share of variance in the first principal direction; and on the
    time-kept mouth features (standardised as the probe does) the share of variance that changes within a window (1
    minus the share of the windows' own means over their time steps): what a centred probe keeps."""
    import numpy as np

    lines = ["| encoder | step | effective rank (of D) | top direction's variance share | changing within a window |",
             "|---|---|---|---|---|"]  # fmt: skip
    for folder in sorted((args.work / "features").iterdir(), key=lambda f: (f.name != "random", f.name)):
        layers = sorted(folder.glob("L*.npy"), key=lambda f: int(f.stem[1:])) if folder.is_dir() else []
        if not layers:
            continue
        x = np.load(layers[-1]).mean(1).astype(np.float64)  # [N, D]
        ev = np.clip(np.linalg.eigvalsh(np.cov(x, rowvar=False))[::-1], 0, None)
        p = ev / ev.sum()
        rank = float(np.exp(-(p[p > 0] * np.log(p[p > 0])).sum()))
        name = _encoder_of_folder(folder.name)
        step = "-" if _step(name) < 0 else _step(name)
        lines.append(f"| {_label(name)} | {step} | {rank:.1f} (of {x.shape[1]}) | {p[0]:.3f} | "
                     f"{_changing_share(folder / 'mouth.npy'):.4f} |")  # fmt: skip
    return "\n".join(lines)


def _encoder_of_folder(folder: str) -> str:
    """The encoder name a features folder was written for (`feature_file` turns ``run@step`` into ``run_step``)."""
    m = re.fullmatch(r"(.+)_(\d+)([+~].*)?", folder)
    return f"{m[1]}@{m[2]}{m[3] or ''}" if m else folder


def _changing_share(path: Path) -> float:
    """Share of the (per-feature standardised) variance of time-kept features ``[N, W * T', D]`` that is not each
    window's mean over its T' steps; nan without the file."""
    import numpy as np

    from marlin.evaluate.linear import centre_steps

    if not path.is_file():
        return float("nan")
    x = np.load(path).astype(np.float64)
    n, steps, d = x.shape
    z = x.reshape(n, -1)
    z = ((z - z.mean(0)) / (z.std(0) + 1e-8)).reshape(n, steps, d)  # [N, W * T', D], standardised per feature
    return float((centre_steps(z, steps // N_WINDOWS) ** 2).sum() / (z**2).sum())


PARTS = {"mouth": (7, 8, 9), "eyes": (2, 3, 4, 5), "nose": (6,)}  # LaPa labels (brows with the eyes)


def sees_table(args: argparse.Namespace, clips: int = 24, seeds: int = 4) -> str:
    """What the encoder sees in each run: visible tokens per clip (of the run's masking and ratio, at the runs'
    112 px geometry) that touch a mouth / eye / nose pixel in either frame of their tubelet, over GRID training
    clips and a few mask seeds, next to how many tokens of the clip touch one."""
    import torch

    from marlin.data.datasets import PretrainDataset
    from marlin.mae.masking import generate_visible, patch_has_label
    from marlin.train.config import load_config

    lines = ["| run | masking | visible tokens | with mouth | with eyes | with nose |", "|---|---|---|---|---|---|"]
    for name in args.runs:
        if not (run_dir(args, name) / "config.yaml").is_file():
            continue
        cfg = load_config(run_dir(args, name) / "config.yaml")
        m = cfg.model
        ds = PretrainDataset.from_config(args.work / "stores" / "grid_s1", m, split="train",
                                         sample_rate=cfg.data.temporal_sample_rate, mode="eval")  # fmt: skip
        idx = list(range(0, len(ds), max(1, len(ds) // clips)))[:clips]
        parse = torch.stack([ds[i]["parse"] for i in idx])  # [B, T, S, S]
        gen = torch.Generator().manual_seed(0)
        vis = torch.cat([generate_visible(cfg.mask.strategy, len(idx), parse=parse, mask_ratio=cfg.mask.ratio,
                                          clip_frames=m.clip_frames, tubelet=m.tubelet_size, img_size=m.img_size,
                                          patch=m.patch_size, generator=gen) for _ in range(seeds)])  # fmt: skip
        cells = []
        for labels in PARTS.values():
            hit = patch_has_label(parse, labels, m.patch_size)  # [B, T, h, w]
            hit = hit.unflatten(1, (-1, m.tubelet_size)).any(2).flatten(1).repeat(seeds, 1)  # [B * seeds, N]
            cells.append(f"{(vis & hit).sum(1).float().mean():.1f} of {hit.sum(1).float().mean():.0f}")
        lines.append(f"| {name} | {cfg.mask.strategy} {cfg.mask.ratio:.0%} | {int(vis[0].sum())} | " +
                     " | ".join(cells) + " |")  # fmt: skip
    return "\n".join(lines)


def heldout_table(args: argparse.Namespace) -> str:
    """Held-out reconstruction of unseen people (normalised targets) per evaluation: the run's error against the
    trivial predictor of each hidden patch's own mean (1.0 by construction)."""
    lines = ["| run | step | held-out rec. error (unseen people) | patch-mean baseline |", "|---|---|---|---|"]
    for name in args.runs:
        metrics = run_dir(args, name) / "metrics.jsonl"
        if not metrics.is_file():
            continue
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            rec = next((v for k, v in row.items() if k.startswith("val") and k.endswith("/rec")), None)
            base = next((v for k, v in row.items() if k.startswith("val") and k.endswith("/patch_mean_rec")), None)
            if rec is not None and base is not None:
                lines.append(f"| {name} | {row.get('step')} | {rec:.4f} | {base:.4f} |")
    return "\n".join(lines)


def _named_path(ap: argparse.ArgumentParser, text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not Path(path).exists():
        ap.error(f"--encoder expects NAME=PATH of an existing model, got {text!r}")
    return name, Path(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = Path(os.environ.get("MARLIN_SHARED_DATA", REPO.parent / "shared" / "data"))
    ap.add_argument("--data", type=Path, default=shared, help="shared data folder (grid_s1/, talking_heads/, ...)")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "transfer_curve")
    ap.add_argument("--steps", type=int, default=6000, help="optimiser steps of each pretraining run (its schedule)")
    ap.add_argument("--ckpt-every", type=int, default=250, help="steps between kept checkpoints (points of the curve)")
    ap.add_argument(
        "--curve-steps",
        type=lambda t: {int(v) for v in t.split(",")},
        default={1000, 1500, 2000, 3000, 4000, 5000, 6000},
        help="checkpoints probed for the curve (comma-separated steps; the latest is always probed)",
    )
    ap.add_argument(
        "--attentive-slots",
        nargs="*",
        choices=SLOTS,
        default=list(SLOTS),
        help="word slots the attentive probe is trained on (minutes per slot on a CPU; none: skip it)",
    )
    ap.add_argument("--attentive-encoders", nargs="*", metavar="NAME",
                    help="encoders of the attentive probe (e.g. random tube@1000; default: all)")  # fmt: skip
    ap.add_argument("--protocols", nargs="+", metavar="NAME", choices=[*PRIORITY, *PIXELS],
                    help="probe stage: only these protocols (default: all)")  # fmt: skip
    ap.add_argument(
        "--part",
        type=lambda t: tuple(int(v) for v in t.split("/")),
        default=(0, 1),
        metavar="I/N",
        help="probe stage: do every N-th job from the I-th (N processes on disjoint jobs)",
    )
    ap.add_argument("--variant-steps", type=int, default=1000,
                    help="masking variants stop at this step of the --steps schedule (resumable)")  # fmt: skip
    ap.add_argument("--stop-at", type=int, default=None,
                    help="marlin and tube stop at this step of their schedule (resumable; default: all)")  # fmt: skip
    ap.add_argument("--parallel", type=int, default=2, help="pretraining runs at a time")
    ap.add_argument("--threads-per-run", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the feature and probe stages")
    ap.add_argument(
        "--runs",
        nargs="+",
        choices=sorted(RUNS),
        default=list(RUNS),
        help="pretraining runs to do (default: all; the masking variants first)",
    )
    ap.add_argument("--encoder", action="append", default=[], metavar="NAME=PATH",
                    help="also probe this trained encoder (an exported model or checkpoint; repeatable)")  # fmt: skip
    ap.add_argument("--copies", nargs="*", default=[], choices=("int8", "int8-7bit", "bf16"),
                    help="also probe each trained encoder in these precisions (NAME+int8, ...)")  # fmt: skip
    ap.add_argument(
        "--views",
        nargs="*",
        default=[],
        choices=("steps",),
        help="also probe every encoder with each time step's tokens encoded alone (NAME~steps)",
    )
    ap.add_argument("--from", dest="start", choices=STAGES, default=STAGES[0], help="skip the stages before this one")
    ap.add_argument("--until", choices=STAGES, default=STAGES[-1], help="stop after this stage")
    args = ap.parse_args(argv)
    args.encoder = dict(_named_path(ap, e) for e in args.encoder)
    args.work.mkdir(parents=True, exist_ok=True)
    order = STAGES.index
    stores = stage_stores(args) if order(args.start) <= order("stores") else store_paths(args)
    if order(args.start) <= order("pretrain") <= order(args.until):
        stage_pretrain(args, stores)
    if order(args.start) <= order("features") <= order(args.until):
        stage_features(args, stores)
    if order(args.start) <= order("probe") <= order(args.until):
        stage_probe(args)
    if order(args.until) >= order("report"):
        table = load_results(args)
        print(markdown(table))
        print()
        print(summary(table))
        print()
        print(heldout_table(args))
        print()
        print(recon_table(args))
        print()
        print(health_table(args))
        print()
        print(sees_table(args))
        for picture in (plot_curve(table, args.work / "transfer_curve.png"),
                        plot_centring(args, table, args.work / "transfer_centring.png")):  # fmt: skip
            if picture:
                print(f"\npicture: {picture}")


if __name__ == "__main__":
    main()
