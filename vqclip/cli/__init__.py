"""The ``vqclip`` command: parses arguments and calls the library; no ML logic lives here.

One module per command group, each with ``register(sub)`` that adds its commands to the parser
and sets ``func`` (the command) and, if Ctrl-C keeps something worth saying, ``kept(args)`` (the
end of the "interrupted" line). ``COMMANDS`` lists them, in the order ``vqclip --help`` shows: a
new command group is a new module and one entry there. Only ``vqclip/__main__.py`` (and
``python -m vqclip.cli``) import this package; the library never does.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .. import __version__
from . import animate, batch, bench, generate, models, score, serve, train
from .common import Parser, add_verbosity

__all__ = ["build_parser", "main", "parse_args"]

COMMANDS = (generate, animate, batch, score, serve, train, models, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="vqclip", description="Text-to-image generation guided by CLIP (VQGAN+CLIP).")
    parser.add_argument("--version", action="version", version=f"vqclip {__version__}")
    add_verbosity(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line; exits with code 2 and one line on bad flags."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    # a command whose positionals end in `rest` (generate) takes words after its options too
    if extras and (not hasattr(args, "rest") or any(e.startswith("-") for e in extras)):
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if extras:
        args.rest += extras
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code: 2 for user errors, 1 for a failed run (NaN loss, out of
    memory; the scoring commands report their own out-of-memory), 130 for Ctrl-C."""
    from ..checkpoints import CheckpointError
    from ..pretrained import DownloadError

    args = parse_args(argv)
    # vqclip's own messages at the chosen level; other libraries' only when they are warnings
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    logging.getLogger("vqclip").setLevel(level)
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader went away (| head): stop quietly, as Python's docs do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ValueError, OSError, CheckpointError, DownloadError) as e:
        # user errors: bad names or values, missing or unwritable paths, no network
        print(f"vqclip: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from ..generator import GenerationError

        if isinstance(e, GenerationError):  # NaN loss, out of memory: the run failed
            print(f"vqclip: error: {e}", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        kept = args.kept(args) if hasattr(args, "kept") else ""  # what a command keeps on Ctrl-C
        print(f"vqclip: interrupted{kept}", file=sys.stderr)
        return 130
