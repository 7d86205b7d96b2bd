"""``vqclip bench``: seconds per step and peak memory of the loop, for a grid of settings."""

from __future__ import annotations

import argparse
import json

from .common import add_verbosity

__all__ = ["register"]


def register(sub) -> None:
    p = sub.add_parser(
        "bench", help="time the loop for sizes x cutn (default pair's architectures, offline)",
        description="Seconds per step, peak memory and the precision that ran, for each size and "
                    "cutn, with the default pair's architectures (imagenet_f16_16384 + ViT-B/32) "
                    "in random weights: the cost of trained ones, no download. Each setting runs "
                    "in a fresh process; the first step of each is not timed.")
    p.add_argument("--size", type=int, nargs="+", default=[128, 256, 384, 512], metavar="PX",
                   help="square sizes (default: 128 256 384 512)")
    p.add_argument("--cutn", type=int, nargs="+", default=[16, 32, 64], help="default: 16 32 64")
    p.add_argument("--steps", type=int, default=4, help="steps per setting (default 4: 3 timed)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", default="auto", help="auto (default), fp32, bf16 or fp16 (GPU)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--checkpoint", action="store_true", help="decoder activation checkpointing")
    p.add_argument("--compile", action="store_true", help="torch.compile (not timed: step 1)")
    p.add_argument("--json", action="store_true", help="one JSON object per setting")
    add_verbosity(p, argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench, kept=lambda args: "; the settings above were measured")


def cmd_bench(args: argparse.Namespace) -> int:
    from ..bench import bench_grid, machine
    from ..config import PRECISIONS
    from ..device import resolve_device
    from ..generator import check_precision

    bad = [v for v in [*args.size, *args.cutn] if v < 1]
    if bad or args.steps < 2 or (args.threads is not None and args.threads < 1):
        raise ValueError("--size and --cutn must be >= 1, --steps >= 2, --threads >= 1")
    if args.precision not in PRECISIONS:
        raise ValueError(f"unknown precision {args.precision!r}; available: {', '.join(PRECISIONS)}")
    device = resolve_device(args.device)
    check_precision(args.precision, device)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not args.json:
        print(machine())
        print(f"{'size':>9} {'cutn':>5} {'precision':>9} {'s/step':>7} {'peak memory':>17}")
    for row in bench_grid(args.size, args.cutn, steps=args.steps, device=str(device),
                          precision=args.precision, threads=args.threads,
                          checkpoint=args.checkpoint, compile=args.compile):
        if args.json:
            print(json.dumps(row), flush=True)
        else:
            peak = f"{row['peak_bytes'] / 2**30:.2f} GiB {row['peak_kind']}"
            print(f"{row['size']:>4}x{row['size']:<4} {row['cutn']:>5} {row['precision']:>9} "
                  f"{row['s_per_step']:>7.2f} {peak:>17}", flush=True)
    return 0
