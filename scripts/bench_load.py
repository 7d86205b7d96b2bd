"""Benchmark: loading a full-size VQGAN from a taming .ckpt, first time and from the converted copy.

Builds imagenet_f16_16384 with random weights, saves it as the official release does (Lightning
checkpoint with the discriminator under "loss."), then times `load_vqgan`:
  1. first load: restricted unpickling of the .ckpt + the one-time safetensors conversion;
  2. later loads: the safetensors copy.
Also times reading the state dict alone with vqclip's unpickler and with
`torch.load(weights_only=True)` on a plain state-dict file (which it can read) for comparison.

Usage: python scripts/bench_load.py [--repeats 3]
"""

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import lightning_checkpoint, save_lightning  # noqa: E402  (test helpers: official format)
from test_vqgan import OFFICIAL_16384_YAML  # noqa: E402

from vqclip.checkpoints import read_state_dict  # noqa: E402
from vqclip.models.vqgan import VQGAN, converted_path, load_vqgan, read_vqgan_config  # noqa: E402


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        yaml = tmp / "model.yaml"
        yaml.write_text(OFFICIAL_16384_YAML)
        from taming.modules.discriminator.model import NLayerDiscriminator

        sd = dict(VQGAN(read_vqgan_config(yaml)).state_dict())
        disc = NLayerDiscriminator(input_nc=3, n_layers=2)
        sd.update({f"loss.discriminator.{k}": v for k, v in disc.state_dict().items()})
        ckpt = save_lightning(lightning_checkpoint(sd, extra_loss_keys=False), tmp / "last.ckpt")
        plain = tmp / "plain.pt"
        torch.save(sd, plain)
        cache = tmp / "cache"
        print(f"machine: {platform.machine()}, {platform.processor() or '?'}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}")
        print(f"checkpoint: {ckpt.stat().st_size / 2**20:.0f} MiB, {len(sd)} tensors")

        def first():
            converted_path(ckpt, cache, read_vqgan_config(yaml)).unlink(missing_ok=True)
            load_vqgan(ckpt, yaml, cache_dir=cache)

        rows = [
            ("read state dict, vqclip restricted unpickler (.ckpt)", lambda: read_state_dict(ckpt)),
            ("read state dict, torch.load(weights_only=True) (plain .pt)",
             lambda: torch.load(plain, map_location="cpu", weights_only=True)),
            ("load_vqgan, first load (.ckpt + conversion)", first),
            ("load_vqgan, later loads (converted safetensors)",
             lambda: load_vqgan(ckpt, yaml, cache_dir=cache)),
        ]
        for label, fn in rows:
            print(f"{label:<62} {timed(fn, args.repeats):6.2f} s (median of {args.repeats})")


if __name__ == "__main__":
    main()
