"""`marlin` command line: one subcommand per module in `marlin.commands`, imported only when used."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

# What a user can cause and fix (a wrong value or file, no network, a full disk): reported in one line, exit code 2.
# Anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (ValueError, OSError, ImportError)

# name -> (module, one-line help). Each module defines `add_arguments(parser)` and `run(args) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("marlin.commands.demo", "run the feature pipeline end to end on an embedded real face clip"),
    "extract": ("marlin.commands.extract", "extract MARLIN features from videos, files, folders, globs or a CSV"),
    "crop": ("marlin.commands.crop", "write face-cropped 224x224 H.264 videos for dataset preparation"),
    "masks": ("marlin.commands.masks", "draw the face parse and the masked patches of a video to a PNG"),
    "prepare": ("marlin.commands.prepare", "build a training-ready store of face crops and parse maps"),
    "pretrain": ("marlin.commands.pretrain", "adversarial masked-autoencoder pretraining (torchrun-ready)"),
    "reconstruct": ("marlin.commands.reconstruct", "show what a full model reconstructs from a masked video"),
    "probe": ("marlin.commands.probe", "linear-probe features against labels (k-fold / fixed split, low-data)"),
    "finetune": ("marlin.commands.finetune", "fine-tune an encoder + linear head on labelled videos (torchrun-ready)"),
    "info": ("marlin.commands.info", "list registered models, or describe a checkpoint file"),
    "export": ("marlin.commands.export", "the encoder as ONNX (pooled or token features), checked with ONNX Runtime"),
    "sync-train": ("marlin.commands.sync_train", "train a lip-sync expert (MARLIN lips + mel audio) on videos"),
    "sync": ("marlin.commands.sync", "audio-visual offset, LSE-D and LSE-C of videos with a lip-sync expert"),
    "lipsync-train": ("marlin.commands.lipsync_train", "train a lip generator (MARLIN face encoder) for dubbing"),
    "lipsync": ("marlin.commands.lipsync", "redraw a video's mouth to speak another sound track (dubbing)"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="marlin", description="MARLIN facial video representation toolkit.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also MARLIN_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == only:  # only the chosen command's module is imported
            importlib.import_module(module).add_arguments(p)
    return parser


def _is_override(arg: str) -> bool:
    key = arg.split("=", 1)[0]
    return "=" in arg and not arg.startswith("-") and bool(key) and all(p.isidentifier() for p in key.split("."))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(command)
    args, extra = parser.parse_known_args(argv)
    # argparse takes one run of positionals: KEY=VALUE overrides given between options arrive here; keep them.
    if extra and isinstance(getattr(args, "overrides", None), list) and all(_is_override(a) for a in extra):
        args.overrides.extend(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if args.command is None:
        build_parser().print_help()
        return 2
    from marlin.utils.errors import one_line

    debug = args.debug or os.environ.get("MARLIN_DEBUG", "") not in ("", "0")
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        with warnings.catch_warnings():  # restores the caller's warning settings afterwards
            if not debug:
                warnings.formatwarning = _one_line_warning
            return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as e:  # bad input, missing file, offline, full disk: one line, not a traceback
        if debug:
            raise
        print(f"marlin {args.command}: {one_line(e)} (--debug shows the traceback)", file=sys.stderr)
        return 2


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    """Warnings as one line each ("VideoWarning: clip.mp4: decoded 27 of 40 frames"), without the source line that
    Python prints under them; --debug keeps Python's format."""
    return f"{category.__name__}: {message}\n"


if __name__ == "__main__":
    sys.exit(main())
