"""`marlin probe`: a linear probe of video features against labels; k-fold or fixed split, results JSON + pictures.

    marlin probe --features feats/ --labels manifest.csv --label emotion --group-col speaker --out probe/
    marlin probe --features feats/ --labels CelebV-HQ/ --label appearance --split fixed --train-fractions 0.01,0.1,1
    marlin probe --model marlin_vit_base_ytf --labels grid_s1/ --label color --reduce concat --out probe/
    marlin probe --model run/export/marlin_vit_tiny --labels grid_s1/ --label digit --split fixed --head attentive \
        --out probe/                           # GRID's fixed split is its protocol split (80 / 20, seeded)
    marlin probe --model marlin_vit_base_ytf --layer 6 --labels manifest.csv --label emotion --out probe6/

Features come from `marlin extract` (a folder with index.csv, a combined .npz / .safetensors, or an aligned .npy), or
are extracted on the fly with --model into OUT/features (resumable). Labels: a CSV manifest (path + label columns),
a CelebV-HQ root (celebvhq_info.json; label appearance | action) or a GRID speaker folder (label = word slot).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _fractions(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or any(not 0 < v <= 1 for v in vals):
        raise argparse.ArgumentTypeError(f"train fractions must be in (0, 1], got {text!r}")
    return vals


def add_arguments(p: argparse.ArgumentParser) -> None:
    from marlin.commands.options import add_model_arguments

    p.add_argument("--labels", required=True, help="CSV manifest, CelebV-HQ root or GRID speaker folder")
    p.add_argument("--label", action="append", default=[], metavar="NAME",
                   help="label column (repeat for multilabel / multi-output regression); CelebV-HQ: appearance | "
                        "action; GRID: command | color | preposition | letter | digit | adverb")  # fmt: skip
    p.add_argument("--task", choices=("multiclass", "binary", "multilabel", "regression"),
                   help="default: inferred from the label values")  # fmt: skip
    p.add_argument("--path-col", default="path", help="CSV column with the video path (default: %(default)s)")
    p.add_argument("--group-col", help="CSV column whose groups (e.g. identity) never straddle folds / splits")
    p.add_argument("--split-col", help="CSV column holding train / val / test (a fixed split)")
    src = p.add_argument_group("features")
    src.add_argument("--features", type=Path, help="`marlin extract` folder, combined .npz/.safetensors, or .npy "
                     "(without it, features are extracted with --model)")  # fmt: skip
    add_model_arguments(src)
    src.add_argument("--crop-face", action="store_true", help="with --model: detect and crop faces first")
    src.add_argument("--device", default="cpu", help="where the encoder runs (with --model) and the attentive head "
                     "trains: cpu (default), cuda[:i], or auto (the GPU when there is one)")  # fmt: skip
    src.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16", "int8"), default="auto",
                     help="with --model: encoder precision, as in `marlin extract` (default: auto)")  # fmt: skip
    src.add_argument("--layer", type=int, metavar="K",
                     help="with --model: features from encoder block K (1 = first; default: the last)")  # fmt: skip
    src.add_argument("--reduce", choices=("mean", "max", "concat"), default="mean",
                     help="over a video's windows: mean, max, or concat (time-kept; equal window counts)")  # fmt: skip
    ev = p.add_argument_group("protocol")
    ev.add_argument("--head", choices=("linear", "attentive"), default="linear",
                    help="linear probe on pooled features, or attentive probe (a learnt query over the tokens; "
                         "needs --keep-seq features, extracted so with --model)")  # fmt: skip
    ev.add_argument("--time-steps", type=int, default=1, metavar="T",
                    help="attentive head: pool each of T consecutive token groups on its own, in order, for tasks "
                         "about when things happen (T = the encoder's time steps: 8 for 16 frames with tubelet 2, "
                         "x the windows with --reduce concat); default 1: one pool over all tokens")  # fmt: skip
    ev.add_argument(
        "--split",
        choices=("kfold", "fixed"),
        default="kfold",
        help="k-fold CV (default) or one train/val/test split (the dataset's, or --split-fractions)",
    )
    ev.add_argument("--folds", type=int, default=5)
    ev.add_argument("--split-fractions", type=_fractions, default=(0.7, 0.1, 0.2), metavar="TR,VA,TE")
    ev.add_argument("--train-fractions", type=_fractions, default=(1.0,), metavar="F,F,...",
                    help="low-data regime: fit on these fractions of each training part (default 1)")  # fmt: skip
    ev.add_argument("--centre", choices=("off", "on", "auto"), default="off",
                    help="linear head with --reduce concat: subtract each video's mean over its windows (what a "
                         "video holds constant: who, light, session), or let the inner CV choose (auto); attentive "
                         "head with --time-steps T > 1: each token place's mean over the T steps (auto: chosen on "
                         "the validation part); for tasks about what changes within a video")  # fmt: skip
    ev.add_argument("--pca", type=int, help="PCA dimensions learnt on each training part")
    ev.add_argument("--no-standardize", action="store_true", help="skip per-feature standardisation")
    ev.add_argument("--l2", type=float, help="fixed L2 strength (default: chosen by inner CV on training data)")
    ev.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--out", required=True, type=Path, help="output folder (results.json, pictures)")
    p.add_argument("--no-plot", action="store_true")


def run(args: argparse.Namespace) -> int:
    import json

    from marlin.evaluate.attentive import AttentiveConfig
    from marlin.evaluate.features import FeatureError, load_features
    from marlin.evaluate.manifest import ManifestError, read_labels
    from marlin.evaluate.probe import ProbeConfig, run_probe, write_probe
    from marlin.evaluate.splits import SplitError

    try:
        if args.layer is not None and args.features is not None:
            raise ValueError("--layer picks the encoder block to extract from: it needs --model, not --features")
        if args.device.startswith("cuda") and not _cuda_available():
            raise ValueError(f"--device {args.device}: torch sees no CUDA GPU here (use cpu or auto)")
        if args.time_steps != 1 and args.head != "attentive":
            raise ValueError("--time-steps is an option of the attentive head (--head attentive)")
        if args.time_steps < 1:
            raise ValueError(f"--time-steps must be >= 1, found {args.time_steps}")
        if args.centre != "off" and args.head == "linear" and args.reduce != "concat":
            raise ValueError("--centre with the linear head needs time-kept features: --reduce concat")
        if args.centre != "off" and args.head == "attentive" and args.time_steps < 2:
            raise ValueError("--centre with the attentive head needs its time steps: --time-steps T (> 1)")
        labels = read_labels(args.labels, args.label, task=args.task, path_col=args.path_col,
                             group_col=args.group_col, split_col=args.split_col)  # fmt: skip
        feats_src = args.features if args.features is not None else _extract(args, labels)
        x = load_features(feats_src, labels, args.reduce, tokens=args.head == "attentive",
                          keep_steps=args.centre != "off" and args.head == "linear")  # fmt: skip
        cfg = ProbeConfig(
            head=args.head, folds=args.folds if args.split == "kfold" else None, split=args.split_fractions,
            train_fractions=args.train_fractions, pca=args.pca, standardize=not args.no_standardize, l2=args.l2,
            centre=args.centre,
            attentive=AttentiveConfig(time_steps=args.time_steps, device=args.device), seed=args.seed,
            extra={"features": str(feats_src), "labels": str(args.labels), "reduce": args.reduce, "layer": args.layer},
        )  # fmt: skip
        results = run_probe(x, labels, cfg)
    except (ManifestError, FeatureError, SplitError, ValueError, ImportError) as e:
        print(f"marlin probe: {e}", file=sys.stderr)
        return 2
    paths = write_probe(results, args.out, plot=not args.no_plot)
    shape = "x".join(str(d) for d in x.shape[1:])
    print(f"{labels.label}: {len(labels)} videos, {shape} features, {args.head} head, {results['protocol']}")
    for frac, entry in results["by_fraction"].items():
        shown = {k: v for k, v in entry["metrics"].items() if not k.startswith("n_")}
        ci = entry["ci95"]
        print(
            f"  train fraction {frac}: "
            + ", ".join(f"{k} {v['mean']:.4f} ± {v['std']:.4f}" for k, v in shown.items())
            + f" (pooled {ci['metric']} 95% bootstrap interval {ci['low']:.3f}-{ci['high']:.3f}, {ci['n_test']} tests)"
        )
    print("wrote " + ", ".join(str(p) for p in paths))
    if args.verbose:
        print(json.dumps(results["by_fraction"], indent=1, default=str)[:4000])
    return 0


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _extract(args: argparse.Namespace, labels) -> Path:  # noqa: ANN001
    """Extract features for the labelled videos into OUT/features[_layerK][_tokens] (resumable); return that folder."""
    import torch

    from marlin.commands.extract import print_summary
    from marlin.models.model import from_spec
    from marlin.video.extract import ExtractOptions, extract_many

    missing = [p for p in labels.paths if not Path(p).is_file()]
    if missing:
        raise ValueError(f"{len(missing)} labelled videos do not exist, e.g. {missing[0]}")
    tokens = args.head == "attentive"
    out = args.out / ("features" + (f"_layer{args.layer}" if args.layer else "") + ("_tokens" if tokens else ""))
    model = from_spec(args.model, random_init=args.random_init).eval()
    if args.layer is not None:
        model = model.at_layer(args.layer)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = model.to(device).for_inference(args.dtype)
    opts = ExtractOptions(crop_face=args.crop_face, keep_seq=tokens)
    summary = extract_many(model, [Path(p) for p in labels.paths], out, opts)
    print_summary(summary)
    if summary.failed:
        first = summary.failed[0]
        reason = first.error if first.input in first.error else f"{first.input}: {first.error}"
        raise ValueError(f"feature extraction failed for {len(summary.failed)} of {len(summary.results)} videos, "
                         f"e.g. {reason} (see {summary.index_path})")  # fmt: skip
    return out
