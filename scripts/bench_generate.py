"""Benchmark: seconds per generation step with the full-size default architectures.

Builds imagenet_f16_16384 (the official YAML's architecture) and ViT-B/32 (QuickGELU, as the
OpenAI weights use) with random weights, then times `Generator.generate` at the given size and
cutn. Random weights cost exactly what trained ones do. The first step (warm-up) is excluded.

Usage: python scripts/bench_generate.py [--size 256] [--cutn 32] [--steps 6] [--candidates 1]
                                        [--device cpu] [--precision fp32] [--threads N]
"""

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_vqgan import OFFICIAL_16384_YAML  # noqa: E402  (the published config, verbatim)

from vqclip.config import load_config  # noqa: E402
from vqclip.generator import Generator  # noqa: E402
from vqclip.models.clip import CLIP, fast_visual  # noqa: E402
from vqclip.models.vqgan import VQGAN, read_vqgan_config  # noqa: E402


def build(device: str) -> Generator:
    import open_clip

    with tempfile.TemporaryDirectory() as tmp:
        yaml = Path(tmp) / "model.yaml"
        yaml.write_text(OFFICIAL_16384_YAML)
        vqgan = VQGAN(read_vqgan_config(yaml)).eval().requires_grad_(False).to(device)
    model = open_clip.create_model("ViT-B-32", force_quick_gelu=True).eval().requires_grad_(False)
    pp = open_clip.get_model_preprocess_cfg(model)
    clip = CLIP(fast_visual(model).to(device), open_clip.get_tokenizer("ViT-B-32"), 224, tuple(pp["mean"]),
                tuple(pp["std"]), "ViT-B-32/random")
    return Generator(vqgan, clip, load_config(preset="imagenet", device=device))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--cutn", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--candidates", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gen = build(args.device)
    times = []
    last = [time.perf_counter()]

    def tick(step, info):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    gen.generate(prompt="a lighthouse at dusk", steps=args.steps, seed=0, cutn=args.cutn,
                 size=[args.size, args.size], candidates=args.candidates, precision=args.precision,
                 callback=tick)
    steady = times[1:]  # the first includes one-time allocations
    per = sum(steady) / len(steady)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}, {args.precision}")
    print(f"{args.size}x{args.size}, cutn {args.cutn}, {args.candidates} candidate(s): "
          f"{per:.2f} s/step (mean of {len(steady)} steps after warm-up; "
          f"min {min(steady):.2f}, max {max(steady):.2f}); {per / args.candidates:.2f} s/step "
          "per candidate")


if __name__ == "__main__":
    main()
