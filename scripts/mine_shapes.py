"""Mine negatives for the shapes CLIP: images the generation loop makes that the judge rejects.

Runs the shapes preset's loop with the given checkpoints on random "a {colour} {shape}" prompts
and keeps the images whose colour or shape the pixel-only judge does not confirm. Feed the file
to the next round: `vqclip train shapes-clip --init CLIP --negatives OUT`.

Usage: python scripts/mine_shapes.py VQGAN.safetensors CLIP.safetensors CLIP_CONFIG.json
           --n 200 --out mined.safetensors [--seed 0] [key=value overrides]
"""

import argparse

from vqclip.checkpoints import save_safetensors
from vqclip.generator import Generator
from vqclip.train import SHAPES_CLIP_ARCH, mine_negatives


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("vqgan")
    ap.add_argument("clip")
    ap.add_argument("clip_config")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    gen = Generator.load(preset="shapes", device="cpu", vqgan=args.vqgan, clip=SHAPES_CLIP_ARCH,
                         clip_pretrained=args.clip, clip_config=args.clip_config,
                         overrides=args.overrides)
    images = mine_negatives(gen, args.n, seed=args.seed)
    save_safetensors({"images": images.half().contiguous()}, args.out)
    print(f"{len(images)} negatives -> {args.out}")


if __name__ == "__main__":
    main()
