"""`marlin lipsync`: make the face in a video speak another sound track (dubbing), with a trained lip generator.

    marlin lipsync face.mp4 new_speech.wav -o dubbed.mp4 --model runs/lipsync/generator.pt
    marlin lipsync face.mp4 other_video.mp4 -o dubbed.mp4 --model runs/lipsync/generator.pt   # its sound track

The output lasts as long as the sound (the video loops when the sound is longer) and carries the new sound. Check the
result with `marlin sync dubbed.mp4 --model EXPERT`. See `marlin.lipsync.dub`.
"""

from __future__ import annotations

import argparse
import sys

from marlin.utils.errors import one_line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("video", help="video of the face to redraw")
    p.add_argument("audio", help="the new sound: an audio file, or a video whose sound track is used")
    p.add_argument("-o", "--out", required=True, help="output video (.mp4: H.264 + AAC; .mkv: H.264 + FLAC)")
    p.add_argument("--model", required=True, help="lip generator (generator.pt from marlin lipsync-train)")
    p.add_argument("--detector", help="face detector (default: the one the generator was trained with)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=0.0, help="sound guidance w >= 0: the mouth drawn for the sound "
                   "+ w x its difference to the mouth drawn for silence (stronger mouth motion; for generators trained "
                   "with --sound-dropout; default: %(default)s)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    import torch

    from marlin.lipsync.dub import dub_video
    from marlin.lipsync.model import load_generator

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    try:
        if args.guidance < 0:
            raise ValueError(f"--guidance must be >= 0, got {args.guidance}")
        gen = load_generator(args.model, map_location=device)
        if args.guidance and not (gen.meta.get("train_config") or {}).get("sound_dropout"):
            print(f"marlin lipsync: warning: {args.model} was trained without --sound-dropout, so it never learnt a "
                  "mouth for silence: --guidance extrapolates from a guess", file=sys.stderr)  # fmt: skip
        detector = args.detector or gen.meta.get("detector", "mediapipe")
        result = dub_video(gen, args.video, args.audio, args.out, detector=detector, batch_size=args.batch_size,
                           device=device, guidance=args.guidance)  # fmt: skip
    except (ValueError, OSError) as e:
        print(f"marlin lipsync: {one_line(e)}", file=sys.stderr)
        return 2
    notes = ["the video looped to cover the sound"] if result.looped else []
    if result.faceless:
        notes.append(f"{result.faceless} frames without a face left as they were")
    note = f" ({'; '.join(notes)})" if notes else ""
    print(f"{result.path}: {result.n_frames} frames at {result.fps:g} fps{note}")
    return 0
