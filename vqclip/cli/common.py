"""What the commands share: the parser whose errors are one line, the verbosity flags, the flags
that choose a CLIP, a small argument type and JSON output."""

from __future__ import annotations

import argparse
import json

__all__ = ["Parser", "add_clip_flags", "add_verbosity", "names", "print_json"]


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as for every other user error
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_verbosity(parser: argparse.ArgumentParser, default) -> None:
    # on the main parser and on each command, so `vqclip generate -q` works as `vqclip -q generate`
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="log debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="only warnings and errors; no progress bars")


def add_clip_flags(group) -> None:
    """The flags that choose the CLIP, shared by generate and the scoring commands."""
    group.add_argument("--clip", metavar="ARCH")
    group.add_argument("--clip-pretrained", dest="clip_pretrained", metavar="TAG|PATH")
    group.add_argument("--clip-config", dest="clip_config", metavar="JSON",
                       help="open_clip model config for a custom architecture")
    group.add_argument("--clip-ensemble", dest="clip_ensemble", action="append",
                       metavar="ARCH/TAG[:W]", help="one more CLIP that guides (and scores) with "
                       "the main one, weighing W (default 1); repeatable. none: the main CLIP "
                       "alone, without the preset's")
    group.add_argument("--clip-weight", dest="clip_weight", type=float, metavar="W",
                       help="the main CLIP's weight in an ensemble (default 1)")


def names(text: str) -> list[str]:
    """A comma-separated list of names for --augments; "none" is the empty list."""
    return [] if text == "none" else text.split(",")


def print_json(data) -> None:
    print(json.dumps(data, indent=2))
