"""`marlin sync-train`: train the lip-sync expert (MARLIN visual stream + mel audio stream) on videos with sound.

    marlin sync-train /data/grid_s1/videos --out runs/sync --model marlin_vit_small_ytf --steps 3000
    marlin sync-train train.csv --val val.csv --out runs/sync --freeze-encoder
    marlin sync-train crops/ --no-crop-face --out runs/sync --resume
    marlin sync-train STORE#train --val STORE#val --out runs/sync       # marlin prepare stores: crops made once
    marlin sync-train videos/ --visual pixels --model marlin_vit_tiny --out runs/sync_pixels   # raw-pixel baseline
    torchrun --nproc_per_node 4 -m marlin.cli sync-train videos/ --out runs/sync

Writes OUT/expert.pt (read by `marlin sync --model`), OUT/last.pt (resume point) and OUT/results.json. See
`marlin.sync.train`.
"""

from __future__ import annotations

import argparse
import sys

from marlin.commands.options import report_run
from marlin.utils.errors import one_line


def add_arguments(p: argparse.ArgumentParser) -> None:
    from marlin.commands.options import add_video_run_arguments
    from marlin.sync.train import SyncTrainConfig

    d = SyncTrainConfig()
    add_video_run_arguments(p, d, "expert.pt")
    p.add_argument("--freeze-encoder", action="store_true", help="train the two heads and the audio net only")
    p.add_argument("--visual", choices=("encoder", "pixels"), default=d.visual, help="visual stream: the encoder, or "
                   "the raw-pixel baseline (--model then gives only the sizes; default: %(default)s)")  # fmt: skip
    p.add_argument("--embed-dim", type=int, default=d.embed_dim, help="(default: %(default)s)")
    p.add_argument("--negatives", type=int, default=d.negatives, help="shifted audio windows per clip "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--min-shift", type=int, default=d.min_shift, help="(frames; default: %(default)s)")
    p.add_argument("--max-shift", type=int, default=d.max_shift, help="(frames; default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from marlin.commands.options import video_run_fields
    from marlin.sync.train import SyncTrainConfig, sync_train

    try:
        cfg = SyncTrainConfig(**video_run_fields(args, "sync-train"), visual=args.visual,
                              freeze_encoder=args.freeze_encoder, embed_dim=args.embed_dim, negatives=args.negatives,
                              min_shift=args.min_shift, max_shift=args.max_shift)  # fmt: skip
        result = sync_train(cfg, resume=args.resume)
    except (ValueError, OSError, RuntimeError, ImportError) as e:
        print(f"marlin sync-train: {one_line(e)}", file=sys.stderr)
        return 2
    return report_run(result, "expert")
