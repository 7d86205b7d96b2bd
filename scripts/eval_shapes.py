"""Quality figures of the bundled shapes models (issue 4's bars), from held-out data.

1. Tiny CLIP: zero-shot colour+shape accuracy over the 24 classes on clean single-object renders.
2. Tiny VQGAN: reconstruction PSNR, and how often the judge reads the same colour and shape.
3. Generation: `--preset shapes` at its default settings for every "a {colour} {shape}" prompt
   and 3 seeds; the pixel-only judge decides, and CLIP's own verdict is compared with it.
   Generation goes through the same `Generator` the CLI uses, loaded once per worker process
   (one torch thread each).
4. Keep (`--only keep`): the same runs, each started on a clean render of its own prompt
   (`init_image`) instead of gray. A CLIP whose loss has the true shape as an optimum keeps it;
   a CLIP that the loop can fool trades it for a blob that it scores higher.

With ``candidates=K``, each candidate is judged too, and each guide's score of it is recorded
(``--dump FILE.jsonl``), so that other rankers can be compared without generating again; the
summary says how often any of the K passed, the most a ranker could reach.

``--sheet FILE.png`` draws the first seed's 24 images (the best-ranked of each), 8 to a row in
the order of the labels, each at 128 px: the README's seed-0 sheet.

Usage: python scripts/eval_shapes.py [--split test] [--n 960] [--seeds 0 1 2] [--only gen|models|keep]
                                     [--workers 2] [--save DIR] [--dump FILE.jsonl] [--sheet FILE.png]
                                     [key=value generation overrides]
"""

import argparse
import json
import math
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from vqclip.generator import Generator
from vqclip.images import to_tensor
from vqclip.scoring import Scorer
from vqclip.shapes import LABEL_TEXTS, LABELS, Scene, ShapeObject, render
from vqclip.shapes.clip_trainer import eval_clip
from vqclip.shapes.judge import judge
from vqclip.shapes.vqgan_trainer import eval_vqgan

TEXTS = LABEL_TEXTS
_gen: Generator | None = None
_label_embeds: torch.Tensor | None = None
_guides: list[Scorer] = []


def _start(overrides: list[str]) -> None:
    """Each worker: one thread, the models loaded once, the 24 label texts embedded once."""
    global _gen, _label_embeds, _guides
    torch.set_num_threads(1)
    _gen = Generator.load(preset="shapes", device="cpu", overrides=overrides)
    _guides = [_gen.scorer, *(Scorer(clip, cache=False) for clip in _gen.clips[1:])]
    with torch.no_grad():
        _label_embeds = F.normalize(_gen.clip.encode_text(TEXTS), dim=-1)


# keep: where each seed's start render puts the object
_STARTS = [("small", "top left"), ("large", "centre"), ("small", "bottom right")]


def _run(job: tuple[str, str, int, str | None, str | None]) -> dict:
    colour, shape, seed, save, starts = job
    prompt = f"a {colour} {shape}"
    overrides, start_score = [], None
    if starts:  # keep: start on a clean render of the prompt
        size, position = _STARTS[seed % len(_STARTS)]
        path = Path(starts) / f"{colour}-{shape}-{seed}.png"
        start_image = render(Scene("gray", (ShapeObject(colour, shape, size, position),)))
        start_image.save(path)
        overrides = [f"prompts.init_image={path}"]
        start_score = _gen.scorer.score(to_tensor(start_image), prompt)[0].item()
    start = time.perf_counter()
    result = _gen.generate(prompt, seed=seed, overrides=overrides)
    seconds = time.perf_counter() - start
    best = result.order[0]  # with candidates=K, the one the run ranked first
    image = result.tensor[best]
    side = _gen.clip.input_size  # CLIP's verdict on the whole image, at CLIP's input size
    with torch.no_grad():
        seen = image[None] if image.shape[-1] == side else F.interpolate(
            image[None], size=(side, side), mode="bilinear", antialias=True)
        e = F.normalize(_gen.clip.encode_image(seen), dim=-1)
    verdict = judge(image)
    with torch.no_grad():  # each candidate: the judge's verdict, and each guide's score
        candidates = [{"ok": judge(t).matches(colour, shape),
                       "scores": [g.score(t[None], prompt)[0].item() for g in _guides]}
                      for t in result.tensor]
    if save:
        result.images[best].save(Path(save) / f"{colour}-{shape}-{seed}.png")
    sheet_tile = result.images[best].resize((128, 128), Image.BICUBIC)
    return {"prompt": prompt, "shape": shape, "seed": seed, "ok": verdict.matches(colour, shape),
            "clip_ok": TEXTS[int((e @ _label_embeds.T).argmax())] == prompt, "seconds": seconds,
            "score": result.scores[best],  # the final CLIP score, as the run ranks it
            "verdict": f"{verdict.colour or '-'} {verdict.shape or '-'}",
            # CLIP's score of the whole image, the same measure at the start and the end
            "score_rose": start_score is not None and result.scores[best] > start_score,
            "candidates": candidates, "tile": sheet_tile}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=960)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", choices=["gen", "models", "keep"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--save", help="folder for the generated images")
    ap.add_argument("--dump", type=Path, help="write each run's record here, one JSON line each")
    ap.add_argument("--sheet", type=Path, help="the first seed's images in one PNG, 8 to a row")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.only not in ("gen", "keep"):
        gen = Generator.load(preset="shapes", device="cpu", overrides=args.overrides)
        c = eval_clip(gen.clip, n=args.n, split=args.split)
        print(f"CLIP zero-shot on {args.n} {args.split} renders: accuracy {c['accuracy']:.1%} "
              f"(colour {c['colour_accuracy']:.1%}, shape {c['shape_accuracy']:.1%})")
        v = eval_vqgan(gen.vqgan, n=args.n, split=args.split)
        print(f"VQGAN on {args.n} {args.split} renders: PSNR {v['psnr']:.2f} dB, judge keeps "
              f"colour and shape in {v['judge_kept']:.1%}", flush=True)
    if args.only == "models":
        return
    if args.save:
        Path(args.save).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        starts = tmp if args.only == "keep" else None
        jobs = [(c, s, seed, args.save, starts) for c, s in LABELS for seed in args.seeds]
        with ProcessPoolExecutor(args.workers, initializer=_start, initargs=(args.overrides,)) as pool:
            results = list(pool.map(_run, jobs))
    tiles = [r.pop("tile") for r in results if r["seed"] == args.seeds[0]]
    if args.sheet:
        sheet = Image.new("RGB", (128 * 8, 128 * math.ceil(len(tiles) / 8)))
        for i, tile in enumerate(tiles):
            sheet.paste(tile, (128 * (i % 8), 128 * (i // 8)))
        sheet.save(args.sheet)
    for r in results:
        r.pop("tile", None)
    if args.dump:
        args.dump.write_text("".join(json.dumps(r) + "\n" for r in results))
    by_prompt, per_shape = defaultdict(list), defaultdict(list)
    for r in results:
        by_prompt[r["prompt"]].append(r)
        per_shape[r["shape"]].append(r["ok"])
    print("| prompt | " + " | ".join(f"seed {s}" for s in args.seeds) + " |")
    print("|---|" + "---|" * len(args.seeds))
    for prompt, rs in by_prompt.items():
        print(f"| {prompt} | " + " | ".join(("✓ " if r["ok"] else "✗ ") + r["verdict"]
                                            for r in rs) + " |")
    ok = [r["ok"] for r in results]
    print(f"judge: {sum(ok)}/{len(ok)} = {sum(ok) / len(ok):.1%}; " + ", ".join(
        f"{s} {sum(v)}/{len(v)} = {sum(v) / len(v):.1%}" for s, v in per_shape.items()))
    per_seed = {seed: [r["score"] for r in results if r["seed"] == seed] for seed in args.seeds}
    means = {seed: sum(v) / len(v) for seed, v in per_seed.items()}
    print(f"mean final CLIP score: {sum(r['score'] for r in results) / len(results):.4f}; by seed: "
          + ", ".join(f"{seed} {m:.4f}" for seed, m in means.items()) + "; judge passes by seed: "
          + ", ".join(f"{seed} {sum(r['ok'] for r in results if r['seed'] == seed)}"
                      for seed in args.seeds))
    if len(results[0]["candidates"]) > 1:
        anyok = [any(c["ok"] for c in r["candidates"]) for r in results]
        print(f"some candidate passes in {sum(anyok)}/{len(anyok)} = {sum(anyok) / len(anyok):.1%} "
              f"(a perfect ranker's figure); candidates passing: "
              f"{sum(c['ok'] for r in results for c in r['candidates'])}")
    agree = [r["ok"] == r["clip_ok"] for r in results]
    print(f"CLIP's verdict agrees with the judge in {sum(agree)}/{len(agree)} = "
          f"{sum(agree) / len(agree):.1%} (CLIP rates {sum(r['clip_ok'] for r in results)} correct)")
    if args.only == "keep":
        lost = [r for r in results if not r["ok"]]
        print(f"started on a clean render, the loop kept it in {sum(ok)}/{len(ok)}; of the "
              f"{len(lost)} it lost, CLIP scores the end above the start in "
              f"{sum(r['score_rose'] for r in lost)}")
    secs = [r["seconds"] for r in results]
    print(f"seconds per generation (one thread, model already loaded): mean {sum(secs) / len(secs):.1f}, "
          f"max {max(secs):.1f}")


if __name__ == "__main__":
    sys.exit(main())
