"""`marlin masks VIDEO --strategy fasking --out masks.png`: see what the model is asked to reconstruct."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from marlin.commands.options import add_sample_rate
    from marlin.mae.masking import STRATEGIES

    p.add_argument("video", type=Path, help="a video file (a face crop, or in-the-wild with --crop-face)")
    p.add_argument("--strategy", choices=STRATEGIES, default="fasking", help="masking strategy (default: %(default)s)")
    p.add_argument("-o", "--out", type=Path, default=Path("masks.png"), help="output image (default: %(default)s)")
    p.add_argument("--start", type=int, default=0, help="first frame of the clip (default: %(default)s)")
    add_sample_rate(p)
    p.add_argument("--seed", type=int, default=0, help="mask RNG seed (default: %(default)s)")
    p.add_argument("--mask-ratio", type=float, default=0.9, help="hidden fraction of tokens (default: %(default)s)")
    p.add_argument("--crop-face", choices=("auto", "yes", "no"), default="auto",
                   help="detect and crop the face; auto: unless the video already is img_size square")  # fmt: skip
    p.add_argument("--model", default="marlin_vit_base_ytf", help="registered model whose geometry (clip frames, "
                                                                   "tubelet, patch, img_size) is used")  # fmt: skip
    p.add_argument("--no-parse", action="store_true", help="skip face parsing (only for non-face strategies)")
    p.add_argument("--tile", type=int, default=None, help="panel side in pixels (default: img_size)")
    p.add_argument("--palette", action="store_true", help="256-colour PNG (about 3x smaller, for docs)")


def run(args: argparse.Namespace) -> int:
    import torch

    from marlin.face.track import NoFaceError
    from marlin.mae.masking import Masker
    from marlin.models.registry import get_config
    from marlin.video.io import VideoError
    from marlin.viz.masks import load_face_clip, save_mask_sheet

    cfg = get_config(args.model)
    masker = Masker.for_config(cfg, args.strategy, args.mask_ratio)  # checks the ratio before any work
    face_strategy = args.strategy in ("fasking", "fasking_opp")
    if args.no_parse and face_strategy:
        print(f"marlin masks: --strategy {args.strategy} needs the face parse; drop --no-parse", file=sys.stderr)
        return 2
    crop = {"auto": "auto", "yes": True, "no": False}[args.crop_face]
    try:
        frames, indices, cropped = load_face_clip(
            args.video, start=args.start, sample_rate=args.sample_rate, clip_frames=cfg.clip_frames, size=cfg.img_size,
            crop_face=crop,
        )  # fmt: skip
    except ImportError as e:  # face cropping needs the [face] extra
        print(f"marlin masks: {e}; or pass --crop-face no", file=sys.stderr)
        return 2
    except (VideoError, NoFaceError, ValueError) as e:  # the one input cannot be used: the command could not run
        print(f"marlin masks: {e}", file=sys.stderr)
        return 2
    parse = None
    found = None
    if not args.no_parse:
        try:
            from marlin.face.parse import FaceParser

            with FaceParser() as parser:
                parse = parser.parse_frames(frames)  # [T, S, S] uint8
                found = int(parser.last_found.sum())
        except ImportError as e:
            if face_strategy:
                print(f"marlin masks: {e}", file=sys.stderr)
                return 2
            print(f"marlin masks: no parse overlay ({e})", file=sys.stderr)
    parse_t = None if parse is None else torch.from_numpy(parse)[None]  # [1, T, S, S]
    visible = masker(1, parse=parse_t, generator=torch.Generator().manual_seed(args.seed))[0].numpy()  # [N]
    n_vis, n = int(visible.sum()), visible.size
    padded = " (padded)" if len(set(indices)) < len(indices) else ""
    span = f"frames {indices[0]}-{indices[-1]} step {args.sample_rate}{padded}"
    title = (f"{args.strategy}: {n_vis}/{n} tokens visible ({100 * n_vis / n:.1f}%), mask ratio {args.mask_ratio}, "
             f"seed {args.seed}  |  {args.video.name}, {span}, {'face cropped' if cropped else 'as is'}"
             + (f", face parsed in {found}/{len(frames)} frames" if found is not None else ""))  # fmt: skip
    out = save_mask_sheet(
        args.out, frames, visible, parse=parse, tubelet=cfg.tubelet_size, patch=cfg.patch_size, title=title,
        frame_labels=[str(i) for i in indices], tile=args.tile, palette=args.palette,
    )  # fmt: skip
    print(f"wrote {out}: {title}")
    return 0
