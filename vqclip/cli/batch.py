"""``vqclip batch``: many prompts, each job's files written exactly once (:mod:`vqclip.batch`)."""

from __future__ import annotations

import argparse
import logging
import sys

from .common import add_ray_flags, add_verbosity, check_ray_flags
from .generate import _is_override, add_loop_flags, load_generator

__all__ = ["register"]

log = logging.getLogger("vqclip")


def register(sub) -> None:
    p = sub.add_parser(
        "batch", help="make an image for each job of a file",
        description="Run every job of JOBS (a text file of prompts, one per line, or a YAML or "
                    "JSONL file of jobs, each a prompt and its own settings) with one model load. "
                    "Settings: as for generate, with each job's own over them. A rerun runs only "
                    "the jobs not finished.",
        epilog="Outputs: DIR/img/<id>.png, DIR/meta/<id>.json (written last: the job is done), "
               "DIR/manifest.jsonl, DIR/failed.jsonl. Exit 0: all done; 1: some failed (a rerun "
               "retries them); 2: bad input, nothing run.")
    p.add_argument("jobs", metavar="JOBS", help=".txt (one prompt per line), .yaml or .jsonl")
    add_loop_flags(p, ("key=value", "settings for every job, e.g. optim.lr=0.2"))
    g = p.add_argument_group("batch")
    g.add_argument("--out", required=True, metavar="DIR", help="the batch's folder")
    g.add_argument("--repeat", type=int, default=1, metavar="N", help="N seeds of each job")
    g.add_argument("--shard", metavar="I/N", help="run share I of N (0 <= I < N), chosen by job "
                                                  "id: for Slurm arrays and other launchers")
    g = add_ray_flags(p, "jobs")
    g.add_argument("--max-retries", dest="max_retries", type=int, default=3, metavar="N",
                   help="times a job is run again when its actor dies (default 3)")
    add_verbosity(p, argparse.SUPPRESS)
    p.set_defaults(func=cmd_batch, kept=lambda args: "; the finished jobs are kept, a rerun "
                   "runs the rest")


def batch_jobs(args: argparse.Namespace):
    """The jobs a ``vqclip batch`` line describes, checked before any model loads."""
    from ..batch import plan, read_jobs, shard
    from ..config import FLAT_KEYS, load_config
    from ..device import resolve_device
    from ..generator import check_precision

    words = [a for a in args.rest if _is_override(a)]
    if len(words) < len(args.rest):
        raise ValueError(f"the prompts come from {args.jobs}; the words after it are key=value "
                         f"settings, got {next(a for a in args.rest if a not in words)!r}")
    flags = {k: getattr(args, k) for k in FLAT_KEYS if getattr(args, k, None) is not None}
    common = load_config(preset=args.preset, files=[args.config] if args.config else (),
                         overrides=words, **flags)
    check_precision(common.precision, resolve_device(common.device))
    check_ray_flags(args, "the jobs run one after another here")
    if args.max_retries < 0 or args.repeat < 1:
        raise ValueError("--repeat must be >= 1, --max-retries >= 0")
    items = read_jobs(args.jobs)
    try:
        jobs = plan(items, common, args.out, repeat=args.repeat)
    except ValueError as e:
        raise ValueError(f"{args.jobs}, {e}") from None
    return common, (shard(jobs, args.shard) if args.shard else jobs)


def cmd_batch(args: argparse.Namespace) -> int:
    from ..batch import finished, rebuild_manifest, run_jobs

    common, jobs = batch_jobs(args)
    if all(finished(args.out, j.id) for j in jobs):  # nothing to load the models for
        rebuild_manifest(args.out)
        log.info("all %d jobs were finished already; manifest: %s/manifest.jsonl", len(jobs), args.out)
        return 0
    if args.ray is not None:
        from ..batch_ray import run_on_ray

        report = run_on_ray(common, jobs, args.out, args.ray, args.workers, args.max_retries,
                            progress=not args.quiet)
    else:
        report = run_jobs(load_generator(common), jobs, args.out, progress=not args.quiet)
    log.info("%d jobs done, %d finished before, %d failed; manifest: %s/manifest.jsonl",
             report.done, report.skipped, len(report.failed), args.out)
    for f in report.failed:
        print(f"vqclip: job {f['id']} (line {f['line']}) failed: {f['error']}", file=sys.stderr)
    return 1 if report.failed else 0
