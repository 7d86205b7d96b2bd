"""The ``vqclip`` command: parses arguments and calls the library; no ML logic lives here."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from . import __version__

__all__ = ["main"]

log = logging.getLogger("vqclip")


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def cmd_models(args: argparse.Namespace) -> int:
    from .pretrained import list_models

    rows = list_models(args.cache_dir)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    print(f"{'NAME':<{width}}  {'FAMILY':<6}  {'SIZE':>9}  {'CHECK':<6}  LOCAL")
    for r in rows:
        local = r["path"] or "not downloaded"
        print(f"{r['name']:<{width}}  {r['family']:<6}  {_size(r['size']):>9}  {r['check']:<6}  {local}")
    print("\nGet one with `vqclip download NAME`; details: `vqclip models --json`.")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from .pretrained import download

    for name in args.names:
        paths = download(name, cache_dir=args.cache_dir, progress=not args.quiet, force=args.force)
        for path in paths.values():
            print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vqclip", description="Text-to-image generation guided by CLIP (VQGAN+CLIP).")
    parser.add_argument("--version", action="version", version=f"vqclip {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="only warnings and errors; no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list the weight registry and what is present locally")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--cache-dir", help="download cache (default: $VQCLIP_CACHE or ~/.cache/vqclip)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("download", help="fetch weights into the cache (resumes, verifies)",
                       description="Fetch registry weights into the cache. An interrupted download "
                                   "resumes where it stopped; files are checked and renamed into "
                                   "place only when complete. Names: see `vqclip models`.")
    p.add_argument("names", nargs="+", metavar="NAME", help="registry name, e.g. imagenet_f16_16384")
    p.add_argument("--cache-dir", help="download cache (default: $VQCLIP_CACHE or ~/.cache/vqclip)")
    p.add_argument("--force", action="store_true", help="download again even if present")
    p.set_defaults(func=cmd_download)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 for user errors, 130 for Ctrl-C)."""
    from .checkpoints import CheckpointError
    from .pretrained import DownloadError

    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, OSError, CheckpointError, DownloadError) as e:
        # user errors: bad names or values, missing or unwritable paths, no network
        print(f"vqclip: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vqclip: interrupted; partial downloads are kept and resume next time", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
