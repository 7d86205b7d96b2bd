"""``vqclip classify|rank|search``: zero-shot scoring of images with a loaded CLIP."""

from __future__ import annotations

import argparse
import functools
import sys

from .common import add_clip_flags, add_verbosity, print_json

__all__ = ["register"]


def register(sub) -> None:
    p = sub.add_parser("classify", help="zero-shot classification of images over labels",
                       description="Each image's probabilities over the labels: CLIP's softmax of "
                                   "the image against each label (averaged over --templates).")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--labels", required=True, metavar="A,B,...", help="comma-separated labels")
    p.add_argument("--templates", nargs="+", metavar="T",
                   help='prompt templates with {} for the label, e.g. "a photo of a {}."')
    p.add_argument("--show", type=int, default=3, metavar="N", help="labels per image in the table")
    _common(p)
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("rank", help="rank images by how well they match a prompt",
                       description="Cosine similarity of each image to the prompt, best first. "
                                   "Weighted prompts (\"a:1|b:-0.5\") as for generate.")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--prompt", required=True, metavar="TEXT")
    _common(p)
    p.set_defaults(func=cmd_rank)

    p = sub.add_parser("search", help="find the images in a folder that match a description",
                       description="Text-to-image search over a folder, recursively. Embeddings are "
                                   "cached per model by file content, so searching again is fast.")
    p.add_argument("folder", metavar="DIR")
    p.add_argument("query", metavar="QUERY")
    p.add_argument("--top", type=int, default=10, metavar="K", help="how many results (default 10)")
    _common(p)
    p.set_defaults(func=cmd_search, kept=_kept_by_search)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    g = p.add_argument_group("models")
    g.add_argument("--preset", help="the CLIP of this preset (default: imagenet, ViT-B-32)")
    add_clip_flags(g)
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    g.add_argument("--batch-size", dest="batch_size", type=int, default=64, metavar="N")
    g.add_argument("--no-cache", dest="no_cache", action="store_true",
                   help="do not read or write the on-disk cache of image embeddings")
    add_verbosity(p, argparse.SUPPRESS)


def _kept_by_search(args: argparse.Namespace) -> str:
    return "" if args.no_cache else "; the embeddings computed so far are cached"


def _out_of_memory(command):
    """Out of memory in a scoring command (the images are encoded in batches): one line naming
    --batch-size, exit 1."""
    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        from ..pretrained import DownloadError

        try:
            return command(args)
        except RuntimeError as e:
            if "out of memory" not in str(e).lower() or isinstance(e, DownloadError):
                raise
            print(f"vqclip: error: out of memory while encoding images: lower --batch-size "
                  f"(now {args.batch_size})", file=sys.stderr)
            return 1
    return run


def _scorer(args: argparse.Namespace):
    from ..scoring import Scorer

    models = {k: getattr(args, k) for k in ("clip", "clip_pretrained", "clip_config",
                                            "clip_ensemble", "clip_weight")
              if getattr(args, k) is not None}
    return Scorer.load(preset=args.preset, device=args.device or "auto", cache=not args.no_cache,
                       batch_size=args.batch_size, **models)


def _none_readable(results) -> int:
    """The exit code of a scoring command: 1, with a message, when no image could be read."""
    if results:
        return 0
    print("vqclip: none of the images could be read (see the warnings above)", file=sys.stderr)
    return 1


def _report_matches(matches, as_json: bool) -> int:
    """Print ranked matches (JSON, or a table) for rank and search; returns the exit code."""
    if as_json:
        print_json([{"path": m.path, "score": m.score} for m in matches])
    elif matches:
        print(f"{'RANK':>4}  {'SCORE':>7}  PATH")
        for r, m in enumerate(matches, 1):
            print(f"{r:>4}  {m.score:>7.4f}  {m.path}")
    return _none_readable(matches)


@_out_of_memory
def cmd_classify(args: argparse.Namespace) -> int:
    from ..scoring import check_labels, check_templates

    labels = check_labels(args.labels.split(","))  # before the model loads, not after
    check_templates(args.templates)
    if args.show < 1:
        raise ValueError(f"--show must be >= 1, got {args.show}")
    results = _scorer(args).classify(args.images, labels, args.templates, progress=not args.quiet)
    if args.json:
        print_json([{"path": r.path, "top": r.top, "probs": r.probs} for r in results])
        return _none_readable(results)
    width = max((len(r.path) for r in results), default=0)
    for r in results:
        best = sorted(r.probs.items(), key=lambda kv: -kv[1])[:args.show]
        print(f"{r.path:<{width}}  " + "  ".join(f"{label} {p:.1%}" for label, p in best))
    return _none_readable(results)


@_out_of_memory
def cmd_rank(args: argparse.Namespace) -> int:
    from ..scoring import check_prompt

    check_prompt(args.prompt)
    matches = _scorer(args).rank(args.images, args.prompt, progress=not args.quiet)
    return _report_matches(matches, args.json)


@_out_of_memory
def cmd_search(args: argparse.Namespace) -> int:
    from ..scoring import check_prompt, image_files

    if args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    check_prompt(args.query)
    files = image_files(args.folder)
    matches = _scorer(args).rank(files, args.query, progress=not args.quiet)[:args.top]
    return _report_matches(matches, args.json)
