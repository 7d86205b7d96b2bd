"""Benchmark: ``vqclip index`` into the embedding cache, then a warm ``search --min-score`` filter
over every cached embedding (issue 21).

A folder of N PNG files (single-object shapes renders, 64 px) is made once under --folder (reused
when it already holds N files), indexed with the bundled ``vqclip-shapes/v2`` into a fresh cache,
and filtered from a new Scorer, as a second process would: every file is stat'ed and looked up,
none is decoded or encoded. Printed: the index's and the filter's images per second, and the
process's resident memory before and after the filter (the filter reads the folder in chunks,
so it should not grow with N).

Usage: python scripts/bench_filter.py [--n 100000] [--folder /tmp/vqclip-filter] [--threads N]
                                      [--min-score 0.3] [--skip-index]
"""

import argparse
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from vqclip.images import iter_image_files, to_pil
from vqclip.index import index_folder
from vqclip.scoring import Scorer
from vqclip.shapes import batch


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20


def write_folder(folder: Path, n: int) -> None:
    """n PNG renders in folders of 1000."""
    for start in range(0, n, 500):
        x, _ = batch(start, min(500, n - start), "test", num_objects=1)
        sub = folder / f"{start // 1000:04d}"
        sub.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(x):
            to_pil(image).save(sub / f"{start + i:07d}.png")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--folder", type=Path, default=Path("/tmp/vqclip-filter"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--min-score", type=float, default=0.3)
    ap.add_argument("--skip-index", action="store_true", help="reuse the cache of a previous run")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    images, cache = args.folder / "images", args.folder / "cache"
    have = sum(1 for _ in iter_image_files(images)) if images.exists() else 0
    if have != args.n:
        start = time.perf_counter()
        write_folder(images, args.n)
        print(f"wrote {args.n} PNGs in {time.perf_counter() - start:.0f} s")
    load = dict(preset="shapes", clip_ensemble=[], download=False, cache_dir=cache, batch_size=256)
    print(f"# vqclip-shapes/v2, {torch.get_num_threads()} threads, "
          f"{cpu_name()}, torch {torch.__version__}")
    if not args.skip_index:
        report = index_folder(Scorer.load(**load), images, shard_size=1000, progress=True)
        print(f"index:  {report.embedded / report.seconds:8.1f} images/s  ({report.embedded} "
              f"embedded in {report.seconds:.0f} s; {report.shards} shards)")

    scorer = Scorer.load(**load)
    scorer.prompt_embedding("a red circle")  # the text tower's first call is not the filter's
    before, start = rss_mib(), time.perf_counter()
    matches = scorer.search(images, "a red circle", top_k=None, min_score=args.min_score)
    seconds = time.perf_counter() - start
    print(f"filter: {args.n / seconds:8.1f} images/s  ({args.n} cached embeddings in "
          f"{seconds:.1f} s; {len(matches)} score >= {args.min_score})")
    print(f"memory: {before:.0f} MiB before the filter, {rss_mib():.0f} MiB after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
