"""Quality figures of the bundled shapes models (issue 4's bars), from held-out data.

1. Tiny CLIP: zero-shot colour+shape accuracy over the 24 classes on clean single-object renders.
2. Tiny VQGAN: reconstruction PSNR, and how often the judge reads the same colour and shape.
3. Generation: `--preset shapes` at its default settings for every "a {colour} {shape}" prompt
   and 3 seeds; the pixel-only judge decides, and CLIP's own verdict is compared with it.
   Generation goes through the same `Generator` the CLI uses, loaded once.

Usage: python scripts/eval_shapes.py [--split test] [--n 960] [--seeds 0 1 2] [--only gen|models]
                                     [--save DIR] [key=value overrides for generation]
"""

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from vqclip.generator import Generator
from vqclip.judge import judge
from vqclip.train import LABELS, eval_clip, eval_vqgan


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=960)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", choices=["gen", "models"])
    ap.add_argument("--save", help="folder for the generated images")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    gen = Generator.load(preset="shapes", device="cpu")
    if args.only != "gen":
        c = eval_clip(gen.clip, n=args.n, split=args.split)
        print(f"CLIP zero-shot on {args.n} {args.split} renders: accuracy {c['accuracy']:.1%} "
              f"(colour {c['colour_accuracy']:.1%}, shape {c['shape_accuracy']:.1%})")
        v = eval_vqgan(gen.vqgan, n=args.n, split=args.split)
        print(f"VQGAN on {args.n} {args.split} renders: PSNR {v['psnr']:.2f} dB, judge keeps "
              f"colour and shape in {v['judge_kept']:.1%}")
    if args.only == "models":
        return
    texts = [f"a {c} {s}" for c, s in LABELS]
    with torch.no_grad():
        label_embeds = F.normalize(gen.clip.encode_text(texts), dim=-1)
    rows, per_shape, agree, times = [], defaultdict(list), [], []
    for colour, shape in LABELS:
        prompt = f"a {colour} {shape}"
        hits = []
        for seed in args.seeds:
            start = time.perf_counter()
            result = gen.generate(prompt=prompt, seed=seed, overrides=args.overrides)
            times.append(time.perf_counter() - start)
            image = result.tensor[0]
            ok = judge(image).matches(colour, shape)
            with torch.no_grad():
                e = F.normalize(gen.clip.encode_image(image[None]), dim=-1)
            clip_ok = texts[int((e @ label_embeds.T).argmax())] == prompt
            hits.append(ok)
            per_shape[shape].append(ok)
            agree.append(ok == clip_ok)
            if args.save:
                Path(args.save).mkdir(parents=True, exist_ok=True)
                result.images[0].save(Path(args.save) / f"{colour}-{shape}-{seed}.png")
        rows.append((prompt, hits))
        print(f"| {prompt} | {' '.join('✓' if h else '✗' for h in hits)} |", flush=True)
    total = [h for _, hs in rows for h in hs]
    print(f"judge: {sum(total)}/{len(total)} = {sum(total) / len(total):.1%}; " + ", ".join(
        f"{s} {sum(v) / len(v):.1%}" for s, v in per_shape.items()))
    print(f"CLIP's verdict agrees with the judge in {sum(agree) / len(agree):.1%}")
    print(f"seconds per generation: mean {sum(times) / len(times):.1f}, max {max(times):.1f}")


if __name__ == "__main__":
    sys.exit(main())
