"""What the commands share: the parser whose errors are one line, the verbosity flags, the flags
that choose a CLIP, a small argument type and JSON output."""

from __future__ import annotations

import argparse
import importlib.util
import json

__all__ = ["Parser", "add_clip_flags", "add_ray_flags", "add_verbosity", "check_ray_flags", "names",
           "print_json"]


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


def add_ray_flags(parser: argparse.ArgumentParser, what: str, where: str = ""):
    """``--ray`` and ``--workers``, for the commands whose work Ray can spread (batch, index);
    returns their group, for a command's own Ray flags."""
    g = parser.add_argument_group('on Ray (pip install "vqclip[ray]")')
    g.add_argument("--ray", metavar="local|auto|ADDRESS",
                   help=f"run the {what} on Ray actors: local starts a cluster on this machine "
                        "(loopback only); auto joins the one RAY_ADDRESS names (as under ray job "
                        f"submit); ADDRESS joins that one{where}")
    g.add_argument("--workers", type=int, metavar="N",
                   help="actors (default: one per GPU of the cluster, else one)")
    return g


def check_ray_flags(args: argparse.Namespace, without: str) -> None:
    """``--ray`` and ``--workers`` as given, before any model loads; ``without``: what happens
    without --ray, for the message."""
    if args.ray is None and args.workers is not None:
        raise ValueError(f"--workers needs --ray; without it {without}")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.ray is not None and importlib.util.find_spec("ray") is None:
        raise ValueError('--ray needs Ray: pip install "vqclip[ray]"')


def names(text: str) -> list[str]:
    """A comma-separated list of names for --augments; "none" is the empty list."""
    return [] if text == "none" else text.split(",")


def print_json(data) -> None:
    print(json.dumps(data, indent=2))
