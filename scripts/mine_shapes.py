"""Mine negatives for the shapes CLIP: images the generation loop makes that the judge rejects.

Runs the shapes preset's loop with the given checkpoints on random "a {colour} {shape}" prompts
and keeps the images (the final one and earlier snapshots) whose colour or shape the pixel-only
judge does not confirm. The file grows every --chunk images, so an interrupted run keeps what
it found. Feed it to the next round: `vqclip train shapes-clip --init CLIP --negatives OUT`.

Usage: python scripts/mine_shapes.py VQGAN CLIP.safetensors CLIP_CONFIG.json
           --n 300 --out mined.safetensors [--seed 0] [--snapshots 3] [key=value overrides]

VQGAN is a registry name (the shipped one: shapes_f4_512) or a checkpoint that carries its
config, as `vqclip train shapes-vqgan` writes.
"""

import argparse

import torch

from vqclip.checkpoints import save_safetensors
from vqclip.generator import Generator
from vqclip.shapes.clip_trainer import SHAPES_CLIP_ARCH, mine_negatives


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("vqgan", help="registry name (shapes_f4_512) or a vqclip checkpoint")
    ap.add_argument("clip")
    ap.add_argument("clip_config")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--snapshots", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=30)
    ap.add_argument("--threads", type=int)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = Generator.load(preset="shapes", device="cpu", vqgan=args.vqgan, clip=SHAPES_CLIP_ARCH,
                         clip_pretrained=args.clip, clip_config=args.clip_config,
                         overrides=args.overrides)
    found = []
    for chunk in range(-(-args.n // args.chunk)):
        found.append(mine_negatives(gen, min(args.chunk, args.n - chunk * args.chunk),
                                    seed=args.seed * 100_000 + chunk, snapshots=args.snapshots))
        images = torch.cat(found)
        save_safetensors({"images": images.half().contiguous()}, args.out)
        print(f"{len(images)} negatives -> {args.out}", flush=True)


if __name__ == "__main__":
    main()
