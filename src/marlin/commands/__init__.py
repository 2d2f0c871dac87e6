"""Subcommands of the `marlin` CLI; each module defines `add_arguments(parser)` and `run(args) -> int`."""
