"""``vqclip models|download``: the weight registry, and verified downloads into the cache."""

from __future__ import annotations

import argparse

from .common import add_verbosity, print_json

__all__ = ["register"]


def register(sub) -> None:
    p = sub.add_parser("models", help="list the weight registry and what is present locally")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--cache-dir", help="download cache (default: $VQCLIP_CACHE or ~/.cache/vqclip)")
    add_verbosity(p, argparse.SUPPRESS)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("download", help="fetch weights into the cache (resumes, verifies)",
                       description="Fetch registry weights into the cache. An interrupted download "
                                   "resumes where it stopped; files are checked and renamed into "
                                   "place only when complete. Names: see `vqclip models`.")
    p.add_argument("names", nargs="+", metavar="NAME", help="registry name, e.g. imagenet_f16_16384")
    p.add_argument("--cache-dir", help="download cache (default: $VQCLIP_CACHE or ~/.cache/vqclip)")
    p.add_argument("--force", action="store_true", help="download again even if present")
    add_verbosity(p, argparse.SUPPRESS)
    p.set_defaults(func=cmd_download,
                   kept=lambda args: "; partial downloads are kept and resume next time")


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def cmd_models(args: argparse.Namespace) -> int:
    from ..pretrained import list_models

    rows = list_models(args.cache_dir)
    if args.json:
        print_json(rows)
        return 0
    width = max(len(r["name"]) for r in rows)
    print(f"{'NAME':<{width}}  {'FAMILY':<6}  {'SIZE':>9}  {'CHECK':<6}  LOCAL")
    for r in rows:
        local = r["path"] or "not downloaded"
        print(f"{r['name']:<{width}}  {r['family']:<6}  {_size(r['size']):>9}  {r['check']:<6}  {local}")
    print("\nGet one with `vqclip download NAME`; details: `vqclip models --json`.")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from ..pretrained import download

    for name in args.names:
        paths = download(name, cache_dir=args.cache_dir, progress=not args.quiet, force=args.force)
        for path in paths.values():
            print(path)
    return 0
