"""`marlin finetune`: fine-tune a MARLIN encoder + linear head on labelled videos (torchrun-ready).

    marlin finetune --model marlin_vit_base_ytf --labels data.csv --label emotion --out runs/emo
    marlin finetune --labels /data/CelebV-HQ --label action --layer-decay 0.75 --out runs/cvhq_action
    marlin finetune --labels /data/grid_s1 --label digit --train-fraction 0.1 --out runs/grid_digit_10pc
    torchrun --nproc_per_node 4 -m marlin.cli finetune --labels data.csv --label emotion --out runs/emo

Writes OUT/best.pt (the best epoch by the validation primary metric), OUT/results.json (metrics per split, per-epoch
history) and OUT/splits.json (video ids per split). See `marlin.train.finetune`.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from marlin.utils.errors import one_line

if TYPE_CHECKING:
    from marlin.train.finetune import FinetuneConfig


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise argparse.ArgumentTypeError(f"expected three non-negative fractions like 0.7,0.1,0.2, got {text!r}")
    return parts  # type: ignore[return-value]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from marlin.commands.options import add_model_arguments, add_sample_rate
    from marlin.train.finetune import FinetuneConfig

    d = FinetuneConfig()
    add_model_arguments(p)
    p.add_argument("--labels", required=True, help="CSV manifest, CelebV-HQ root (celebvhq_info.json) or GRID folder "
                   "(labels.csv + videos/)")  # fmt: skip
    p.add_argument("--label", action="append", default=[], help="label column(s) (repeat or comma-separate), "
                   "CelebV-HQ task (appearance / action) or GRID slot (e.g. digit)")  # fmt: skip
    p.add_argument("--task", choices=("multiclass", "binary", "multilabel", "regression"),
                   help="default: inferred from the labels")  # fmt: skip
    p.add_argument("--path-col", default=d.path_col, help="CSV column of video paths (default: %(default)s)")
    p.add_argument("--group-col", help="CSV column of groups (e.g. identity) kept within one split")
    p.add_argument("--split-col", help="CSV column of fixed splits (train / val / test)")
    p.add_argument("--split", type=_fractions, default=d.split, metavar="TRAIN,VAL,TEST",
                   help="split fractions when the data defines no split (default: 0.7,0.1,0.2)")  # fmt: skip
    p.add_argument("--train-fraction", type=float, default=d.train_fraction,
                   help="keep this fraction of the training videos (low-data regime; default: all)")  # fmt: skip
    p.add_argument("--out", required=True, help="run folder: best.pt, results.json, splits.json")
    p.add_argument("--epochs", type=int, default=d.epochs, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="videos per process and step "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate of the head (default: %(default)s)")
    p.add_argument("--min-lr", type=float, default=d.min_lr, help="end of the cosine decay (default: %(default)s)")
    p.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="(default: %(default)s)")
    p.add_argument("--layer-decay", type=float, default=d.layer_decay, help="layer-wise lr decay, e.g. 0.75 "
                   "(default: %(default)s = off)")  # fmt: skip
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW (default: %(default)s)")
    p.add_argument("--clip-grad", type=float, help="max gradient norm")
    p.add_argument("--patience", type=int, default=d.patience, help="early stopping after N epochs without a better "
                   "validation score; 0 = off (default: %(default)s)")  # fmt: skip
    p.add_argument("--freeze-encoder", action="store_true", help="train the linear head only")
    add_sample_rate(p, d.sample_rate)
    p.add_argument("--test-clips", type=int, default=d.test_clips, help="clips averaged per video in validation "
                   "and testing (default: %(default)s)")  # fmt: skip
    p.add_argument("--pool", choices=("mean", "time"), default=d.pool, help="head input: the clip feature (mean) or "
                   "one feature per time step in order (time: when things happen, e.g. lip reading) "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--train-clip", choices=("random", "centre"), default=d.train_clip, help="training clip: a random "
                   "start each epoch, or the centred clip every time (labels that are a position in time; pair it "
                   "with --test-clips 1) (default: %(default)s)")  # fmt: skip
    p.add_argument("--head-norm", action="store_true", help="standardise the head input per batch (BatchNorm without "
                   "affine, as MAE's linear probe): face clips differ by a few %% of the feature norm")  # fmt: skip
    p.add_argument("--centre", action="store_true", help="with --pool time: subtract the clip's mean over its time "
                   "steps from the head input (what the clip holds constant: who, light, session)")  # fmt: skip
    p.add_argument("--hflip", action="store_true", help="random horizontal flips in training")
    p.add_argument("--workers", type=int, default=d.workers, help="DataLoader processes per rank "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=d.precision)
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute encoder activations in backward")
    p.add_argument("--compile", action="store_true", help="torch.compile each encoder block (GPUs)")
    p.add_argument("--no-train-eval", action="store_true", help="skip the final metrics on the training split")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between progress lines "
                   "(default: %(default)s)")  # fmt: skip


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    """The `FinetuneConfig` the parsed arguments describe."""
    from marlin.train.finetune import FinetuneConfig

    labels = tuple(s.strip() for part in args.label for s in part.split(",") if s.strip())
    return FinetuneConfig(
        model=args.model, random_init=args.random_init, labels=args.labels, label=labels, task=args.task,
        path_col=args.path_col, group_col=args.group_col, split_col=args.split_col, split=args.split,
        train_fraction=args.train_fraction, freeze_encoder=args.freeze_encoder, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr, warmup_epochs=args.warmup_epochs,
        layer_decay=args.layer_decay, weight_decay=args.weight_decay, clip_grad=args.clip_grad,
        patience=args.patience, sample_rate=args.sample_rate, test_clips=args.test_clips, pool=args.pool,
        train_clip=args.train_clip, head_norm=args.head_norm, centre=args.centre, hflip=args.hflip,
        workers=args.workers, seed=args.seed,
        out=args.out, device=args.device, precision=args.precision, grad_checkpointing=args.grad_checkpointing,
        compile=args.compile, eval_train=not args.no_train_eval, log_every=args.log_every,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from marlin.train.finetune import finetune

    try:
        result = finetune(config_from_args(args))
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as e:
        print(f"marlin finetune: {one_line(e)}", file=sys.stderr)
        return 2
    if result.results is not None:
        test = result.metrics.get("test")
        if test:
            print("test: " + ", ".join(f"{k} {v:.4f}" for k, v in test.items() if k != "neg_loss"))
        print(f"results: {result.results}")
        print(f"checkpoint: {result.checkpoint}")
    return 0
