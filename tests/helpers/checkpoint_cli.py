"""Runs the checkpoint subcommands (``prepare``, ``verify``) in-process, as the console script would."""

from __future__ import annotations

import argparse

from nvfp4_prep.cli import checkpoint_commands


def cli(*argv: object) -> int:
    """The exit code of ``nvfp4-prep <argv>`` for the checkpoint subcommands."""
    parser = argparse.ArgumentParser(prog="nvfp4-prep")
    checkpoint_commands.register(parser.add_subparsers(required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.run(args)
