"""`marlin reconstruct VIDEO --model FULL_CHECKPOINT`: ground truth | masked input | reconstruction of one clip.

    marlin reconstruct face.mp4 --model marlin_vit_base_ytf.full.pt --strategy fasking --out recon.png
    marlin reconstruct face.mp4 --model runs/s1/checkpoints/last.pt --strategy tube --out recon.mp4

VIDEO is a face crop (e.g. from `marlin crop`), whose frames are centre-cropped square and resized to the model's
size, or any footage with `--crop-face` (the face is detected, tracked and cropped as `marlin extract` does). Prints
the hidden-patch MSE and that of predicting the clip's mean colour.

    marlin reconstruct interview.mp4 --crop-face --model run/export/marlin_vit_small --out recon.png
"""

from __future__ import annotations

import argparse
import sys

from marlin.mae.masking import STRATEGIES


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("video", help="a face-cropped video file, or any video with --crop-face")
    p.add_argument("--crop-face", nargs="?", const="mediapipe", choices=("mediapipe", "haar"),
                   help="detect and crop the face first (detector: mediapipe, the default, or haar)")  # fmt: skip
    p.add_argument("--model", required=True, help="a full checkpoint: official .full.pt, marlin run or directory")
    p.add_argument("--out", required=True, help="output .png (frame grid) or .mp4 / .mkv (all frames side by side)")
    p.add_argument("--strategy", default="fasking", choices=STRATEGIES, help="masking strategy (default fasking)")
    p.add_argument("--mask-ratio", type=float, default=0.9, help="fraction of tokens hidden (default 0.9)")
    p.add_argument("--start", type=int, default=0, help="first frame of the clip")
    p.add_argument("--sample-rate", type=int, default=2, help="frames between sampled frames (default 2)")
    p.add_argument("--seed", type=int, default=0, help="mask seed")
    p.add_argument("--norm-target", action="store_true", help="the model predicts per-patch normalised pixels "
                   "(read from a marlin training checkpoint when present)")  # fmt: skip


def _norm_target_of(path: str) -> bool:
    """Whether a marlin training checkpoint was trained with normalised targets (False for anything else)."""
    try:
        import torch

        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        return bool(ckpt.get("train_config", {}).get("loss", {}).get("norm_target", False))
    except Exception:  # noqa: BLE001 - not a training checkpoint: raw-pixel targets (the released models)
        return False


def run(args: argparse.Namespace) -> int:
    import marlin
    from marlin.models.checkpoint import CheckpointError
    from marlin.viz.reconstruct import reconstruct_video

    try:
        model = marlin.load(args.model, full=True)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"marlin reconstruct: {e}", file=sys.stderr)
        return 2
    norm_target = args.norm_target or _norm_target_of(args.model)
    try:
        result = reconstruct_video(
            model, args.video, strategy=args.strategy, mask_ratio=args.mask_ratio, start=args.start,
            sample_rate=args.sample_rate, seed=args.seed, norm_target=norm_target, crop_face=args.crop_face,
        )  # fmt: skip
        path = result.save(args.out)
    except (ValueError, FileNotFoundError) as e:
        print(f"marlin reconstruct: {e}", file=sys.stderr)
        return 2
    except ImportError as e:  # --crop-face without the face extra
        print(f"marlin reconstruct: {e} (pip install 'marlin[face]')", file=sys.stderr)
        return 2
    n_hidden = int((~result.visible).sum())
    print(f"{path}: {result.strategy} masking, {n_hidden}/{result.visible.numel()} tokens hidden")
    if result.metrics:
        m = result.metrics
        print(f"hidden-patch MSE {m['mse']:.5f} (clip-mean baseline {m['clip_mean_mse']:.5f}, "
              f"visible-mean baseline {m['visible_mean_mse']:.5f})")  # fmt: skip
    return 0
