"""bf16 against fp32 on one step with the latents and cutouts fixed: the README's agreement table.

For the default pair's architectures (imagenet_f16_16384 + ViT-B/32, random weights) and for the
bundled pair, prints each setting's largest relative loss difference and smallest gradient
cosine (``vqclip.bench.precision_agreement``). The bars: loss within 1%, cosine >= 0.99.
On a CPU without bf16 arithmetic, bf16 is emulated: expect minutes for the larger settings.

Usage: python scripts/check_precision.py [--size 128] [--cutn 8] [--seeds 0 1 2] [--threads N]
"""

import argparse

import torch

from vqclip.bench import machine, precision_agreement, random_generator
from vqclip.generator import Generator


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--cutn", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine())
    print("| models | setting | seed | loss fp32 | loss bf16 | relative difference | gradient cosine |")
    print("|---|---|---|---|---|---|---|")
    pairs = [("imagenet_f16_16384 + ViT-B/32 (random)", random_generator("cpu"),
              dict(size=[args.size, args.size], cutn=args.cutn)),
             ("bundled shapes pair", Generator.load(preset="shapes", device="cpu", download=False), {})]
    for name, gen, settings in pairs:
        for seed in args.seeds:
            r = precision_agreement(gen, "bf16", prompt="a red circle", seed=seed, **settings)
            cfg = f"{settings['size'][0]}², cutn {settings['cutn']}" if settings else "preset (64², cutn 16)"
            print(f"| {name} | {cfg} | {seed} | {r['loss_fp32'][0]:.5f} | {r['loss'][0]:.5f} | "
                  f"{r['loss_rel_diff']:.2e} | {r['grad_cosine']:.5f} |", flush=True)


if __name__ == "__main__":
    main()
