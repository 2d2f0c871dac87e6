"""`marlin lipsync-train`: train the lip generator (MARLIN face encoder + audio + decoder; Wav2Lip-style) on videos
with sound, with the sync loss of a `marlin sync-train` expert.

    marlin lipsync-train videos/ --out runs/lipsync --model marlin_vit_small_ytf --expert runs/sync/expert.pt
    marlin lipsync-train STORE#train --val STORE#val --out runs/lipsync --expert runs/sync/expert.pt --resume
    marlin lipsync-train crops/ --no-crop-face --out runs/lipsync --sync-weight 0      # pixel loss only
    marlin lipsync-train videos/ --out runs/lipsync_sync --init runs/lipsync/generator.pt --expert EXPERT \
        --sync-weight 0.05 --sync-jitter 4 --judge OTHER_EXPERT                         # sync loss once warm
    torchrun --nproc_per_node 4 -m marlin.cli lipsync-train videos/ --out runs/lipsync --expert EXPERT

Writes OUT/generator.pt (read by `marlin lipsync --model`), OUT/last.pt (resume point) and OUT/results.json. See
`marlin.lipsync.train`.
"""

from __future__ import annotations

import argparse
import sys

from marlin.commands.options import report_run
from marlin.utils.errors import one_line

# LipsyncTrainConfig fields set by this command's own options (same names)
OWN_FIELDS = ("expert", "sync_weight", "sync_jitter", "sync_trains", "judge", "init", "adv_weight", "critic_steps",
              "critic_frames", "still_upper", "expert_audio", "pixel_loss", "sound_dropout", "refine")  # fmt: skip


def add_arguments(p: argparse.ArgumentParser) -> None:
    from marlin.commands.options import add_video_run_arguments
    from marlin.lipsync.train import LipsyncTrainConfig

    d = LipsyncTrainConfig()
    add_video_run_arguments(p, d, "generator.pt")
    p.add_argument("--expert", help="lip-sync expert (expert.pt from marlin sync-train): its P(in sync) of the drawn "
                   "mouths is reported, and with --sync-weight > 0 it is a loss")  # fmt: skip
    p.add_argument("--sync-weight", type=float, default=d.sync_weight, help="loss = (1 - w) pixel loss + w sync loss "
                   "(default: %(default)s; see marlin.lipsync.train for why not Wav2Lip's 0.03)")  # fmt: skip
    p.add_argument("--sync-jitter", type=int, default=d.sync_jitter, help="move each drawn window by a random "
                   "offset of up to this many pixels before the expert scores it, so that patterns which fool the "
                   "expert at one position do not pay (default: %(default)s)")  # fmt: skip
    p.add_argument("--sync-trains", choices=("all", "sound"), default=d.sync_trains, help="what the sync loss trains: "
                   "everything (Wav2Lip), or only the sound trunk, so the drawing cannot learn to fool the expert "
                   "(default: %(default)s)")  # fmt: skip
    p.add_argument("--judge", help="a second expert.pt, never a loss: its P(in sync) of the drawn mouths in "
                   "validation shows whether the loss's expert is being fooled")  # fmt: skip
    p.add_argument("--adv-weight", type=float, default=d.adv_weight, help="weight of a lower-face critic's "
                   "term (WGAN-GP) against drawn-looking mouths (default: %(default)s)")  # fmt: skip
    p.add_argument("--critic-steps", type=int, default=d.critic_steps, help="critic updates per step (default: "
                   "%(default)s)")  # fmt: skip
    p.add_argument("--critic-frames", type=int, default=d.critic_frames, help="frames of each window the critic "
                   "scores (default: %(default)s)")  # fmt: skip
    p.add_argument("--still-upper", action="store_true", help="the encoder sees one still upper half per window, "
                   "so the mouth's motion can only come from the sound (see marlin.lipsync.model)")  # fmt: skip
    p.add_argument("--expert-audio", action="store_true", help="start the sound trunk from the expert's")
    p.add_argument("--init", help="start from this generator.pt (e.g. a pixel-loss run, before adding the sync loss)")
    p.add_argument("--pixel-loss", choices=("mse", "l1"), default=d.pixel_loss, help="(default: %(default)s)")
    p.add_argument("--sound-dropout", type=float, default=d.sound_dropout, help="share of windows drawn with "
                   "silence instead of their sound, so that marlin lipsync --guidance has a 'no sound' mouth to "
                   "extrapolate from (default: %(default)s)")  # fmt: skip
    p.add_argument("--refine", type=int, default=d.refine, metavar="C", help="a conv net of C channels redraws the "
                   "decoder's patches across their borders (added to an --init generator that has none; default: "
                   "%(default)s, none)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from marlin.commands.options import video_run_fields
    from marlin.lipsync.train import LipsyncTrainConfig, lipsync_train

    try:
        own = {name: getattr(args, name) for name in OWN_FIELDS}
        cfg = LipsyncTrainConfig(**video_run_fields(args, "lipsync-train"), **own)
        result = lipsync_train(cfg, resume=args.resume)
    except (ValueError, OSError, RuntimeError, ImportError) as e:
        print(f"marlin lipsync-train: {one_line(e)}", file=sys.stderr)
        return 2
    return report_run(result, "generator")
