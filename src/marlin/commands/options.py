"""Options shared by several commands, so that one option name means one thing everywhere.

``--sample-rate`` is always the distance between the frames of a clip (the official ``sample_rate``) and ``--stride``
always the step between extraction windows (``marlin extract``); ``--model`` / ``--random-init`` always pick the
encoder the same way.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_model_arguments(p: argparse.ArgumentParser | Any) -> None:
    p.add_argument("--model", default="marlin_vit_base_ytf",
                   help="registered name (released weights are downloaded once) or checkpoint path "
                        "(default: %(default)s)")  # fmt: skip
    p.add_argument(
        "--random-init",
        action="store_true",
        help="use the named architecture untrained (offline smoke tests; features are meaningless)",
    )


def add_sample_rate(p: argparse.ArgumentParser, default: int = 2) -> None:
    """``--sample-rate N`` (frames between clip frames), and the old spelling ``--stride`` as a clear error."""
    p.add_argument("--sample-rate", type=int, default=default,
                   help="frames between the frames of a clip (default: %(default)s)")  # fmt: skip
    p.add_argument("--stride", action=_Renamed, new="--sample-rate", help=argparse.SUPPRESS)


class _Renamed(argparse.Action):
    """An option that was renamed: using it stops with a one-line message naming the new spelling."""

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs="?", **kwargs)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: Any = None) -> None:
        parser.error(f"{option_string} is now {self.new} here (frames between clip frames); "
                     "--stride means the step between extraction windows, as in `marlin extract`")  # fmt: skip
