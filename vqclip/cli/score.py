"""``vqclip classify|rank|search``: zero-shot scoring of images with a loaded CLIP."""

from __future__ import annotations

import argparse
import functools
import sys

from .common import add_clip_flags, add_ray_flags, add_verbosity, check_ray_flags, print_json

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
    p.add_argument("--top", type=int, metavar="K",
                   help="how many results (default 10; with --min-score, all that pass)")
    p.add_argument("--min-score", dest="min_score", type=float, metavar="S",
                   help="every image scoring at least S (a cosine similarity), best first; the "
                        "folder is read as a stream, so memory does not grow with it")
    _common(p)
    p.set_defaults(func=cmd_search, kept=_kept_by_search)

    p = sub.add_parser("index", help="embed a folder's images into the cache that search reads",
                       description="Embed every image under DIR (recursively) into the cache of "
                                   "embeddings that search reads, shard by shard: a rerun, or an "
                                   "interrupted run started again, does only the shards not "
                                   "finished. --ray spreads the shards over Ray Data actors.")
    p.add_argument("folder", metavar="DIR")
    p.add_argument("--shard-size", dest="shard_size", type=int, default=1000, metavar="N",
                   help="files per shard, the unit of work and of resuming (default 1000)")
    add_ray_flags(p, "embedding", "; every node reads DIR at the same path")
    _common(p, cache=False)
    p.set_defaults(func=cmd_index, kept=lambda args: "; the finished shards are kept, a rerun "
                   "does the rest")


def _common(p: argparse.ArgumentParser, cache: bool = True) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    g = p.add_argument_group("models")
    g.add_argument("--preset", help="the CLIP of this preset (default: imagenet, ViT-B-32)")
    add_clip_flags(g)
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    g.add_argument("--batch-size", dest="batch_size", type=int, default=64, metavar="N")
    if cache:
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


def _load_args(args: argparse.Namespace) -> dict:
    """The :meth:`Scorer.load` arguments of a scoring command line."""
    models = {k: getattr(args, k) for k in ("clip", "clip_pretrained", "clip_config",
                                            "clip_ensemble", "clip_weight")
              if getattr(args, k) is not None}
    return dict(preset=args.preset, device=args.device or "auto", batch_size=args.batch_size,
                **models)


def _scorer(args: argparse.Namespace):
    from ..scoring import Scorer

    return Scorer.load(cache=not getattr(args, "no_cache", False), **_load_args(args))


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
    from ..images import image_files, iter_image_files
    from ..scoring import check_prompt

    if args.top is not None and args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    if args.min_score is not None and not -1 <= args.min_score <= 1:
        raise ValueError(f"--min-score is a cosine similarity, in [-1, 1]; got {args.min_score}")
    check_prompt(args.query)
    if args.min_score is None:
        files = image_files(args.folder)  # before the model loads
        matches = _scorer(args).rank(files, args.query, progress=not args.quiet)[:args.top or 10]
        return _report_matches(matches, args.json)
    iter_image_files(args.folder)  # a missing folder, before the model loads
    matches = _scorer(args).search(args.folder, args.query, top_k=args.top,
                                   min_score=args.min_score, progress=not args.quiet)
    if args.json:
        print_json([{"path": m.path, "score": m.score} for m in matches])
    elif matches:
        _report_matches(matches, False)
    else:
        print(f"no image scores {args.min_score} or more", file=sys.stderr)
    return 0


@_out_of_memory
def cmd_index(args: argparse.Namespace) -> int:
    from ..images import image_files

    if args.shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {args.shard_size}")
    check_ray_flags(args, "the images are embedded here")
    image_files(args.folder)  # a missing or empty folder, before the model loads
    from ..index import index_folder
    from ..scoring import Scorer

    load = _load_args(args)
    # on Ray the actors embed; this process only writes the caches, with the models on the CPU
    scorer = Scorer.load(**{**load, "device": "cpu" if args.ray else load["device"]})
    report = index_folder(scorer, args.folder, shard_size=args.shard_size, ray=args.ray,
                          workers=args.workers, load=load, progress=not args.quiet)
    if args.json:
        print_json(vars(report))
    else:
        shards = f"{report.shards} shard{'s' * (report.shards != 1)}"
        print(f"indexed {args.folder}: {report.files} images in {shards} ({report.finished_before} "
              f"finished before); embedded {report.embedded}, unreadable {report.unreadable}")
    return 0
