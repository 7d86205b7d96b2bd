"""Benchmark: images per second that the Scorer encodes, and search with a cold and a warm cache.

Models: the bundled ``vqclip-shapes/v2``, or ViT-B-32 built by open_clip with random weights
(QuickGELU, as the OpenAI weights use; random weights cost exactly what trained ones do, and the
real ones cannot be downloaded here). Three figures per model:

1. encoder: ``clip.model.encode_image`` on ready ``(B, 3, S, S)`` batches (the first is warm-up);
2. cold search: ``Scorer.search`` over a folder of JPEG files that the cache has never seen
   (hashing, decoding, resizing, encoding, writing the cache);
3. warm search: the same search again from a new Scorer (a second process would do this).

Usage: python scripts/bench_scoring.py [--model shapes|ViT-B-32] [--n 512] [--side 512]
                                       [--batch-size 64] [--threads N] [--device cpu]
"""

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from vqclip.images import to_pil
from vqclip.models.clip import CLIP, load_clip
from vqclip.scoring import Scorer
from vqclip.shapes import batch


def build(model: str, device: str) -> CLIP:
    if model == "shapes":
        return load_clip("vqclip-shapes/v2", device=device, download=False)
    import open_clip

    m = open_clip.create_model(model, force_quick_gelu=True).eval().requires_grad_(False).to(device)
    pp = open_clip.get_model_preprocess_cfg(m)
    size = pp["size"][0] if isinstance(pp["size"], (tuple, list)) else pp["size"]
    # a source makes the embedding cache apply, as it does for registry weights
    return CLIP(m, open_clip.get_tokenizer(model), size, tuple(pp["mean"]), tuple(pp["std"]),
                f"{model}/random", source=f"{model}/random-bench")


def write_folder(folder: Path, n: int, side: int) -> None:
    """n JPEG files of ``side`` pixels: shapes renders scaled up (photos decode like these do)."""
    for start in range(0, n, 256):
        x, _ = batch(start, min(256, n - start), "test")
        x = torch.nn.functional.interpolate(x, size=side, mode="bilinear")
        for i, image in enumerate(x):
            to_pil(image).save(folder / f"{start + i:06d}.jpg", quality=90)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="shapes", help="shapes (bundled) or an open_clip name")
    ap.add_argument("--n", type=int, default=512, help="image files in the search folder")
    ap.add_argument("--side", type=int, default=512, help="pixels per side of those files")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clip = build(args.model, args.device)
    print(f"# {clip.name}, input {clip.input_size}px, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.device}")

    with torch.no_grad():
        x = torch.rand(args.batch_size, 3, clip.input_size, clip.input_size, device=args.device)
        clip.model.encode_image(x)  # warm-up
        reps, start = max(4, 1024 // args.batch_size // (1 + clip.input_size // 100)), time.perf_counter()
        for _ in range(reps):
            clip.model.encode_image(x)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        rate = reps * args.batch_size / (time.perf_counter() - start)
    print(f"encoder only:  {rate:8.1f} images/s  (batch {args.batch_size})")

    with tempfile.TemporaryDirectory() as tmp:
        folder, cache = Path(tmp) / "images", Path(tmp) / "cache"
        folder.mkdir()
        write_folder(folder, args.n, args.side)
        for label in ("cold search", "warm search"):
            scorer = Scorer(clip, cache_dir=cache, batch_size=args.batch_size)
            start = time.perf_counter()
            scorer.search(folder, "a red circle", top_k=5)
            seconds = time.perf_counter() - start
            print(f"{label}:   {args.n / seconds:8.1f} images/s  ({args.n} JPEGs of {args.side}px "
                  f"in {seconds:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
