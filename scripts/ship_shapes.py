"""Copy trained shapes checkpoints into checkpoints/ as the bundled models, and print their
registry lines (sha256 and size).

Weights are stored in fp16 to stay under the 30 MB budget; the loaders cast them back to fp32.
Each model's config sits beside its weights: a taming-format model.yaml for the VQGAN, an
open_clip model-config JSON for CLIP.

Usage: python scripts/ship_shapes.py [--vqgan VQGAN.safetensors] [--clip CLIP.safetensors]
                                     [--clip-tag v2] [--family vit|resnet]
"""

import argparse
from pathlib import Path

import yaml

from vqclip.checkpoints import read_state_dict, save_safetensors
from vqclip.pretrained import PROJECT_CHECKPOINTS, sha256sum
from vqclip.shapes.clip_trainer import SHAPES_CLIP_FAMILIES
from vqclip.shapes.vqgan_trainer import SHAPES_VQGAN_CONFIG

VQGAN_NAME = "shapes_f4_512"


def taming_yaml() -> str:
    cfg = SHAPES_VQGAN_CONFIG
    return yaml.safe_dump({"model": {"target": "taming.models.vqgan.VQModel", "params": {
        "embed_dim": cfg.embed_dim, "n_embed": cfg.n_embed, "ddconfig": cfg.ddconfig}}},
        sort_keys=False)


def ship(src: Path, folder: Path, weights: str, extra: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.half() if v.is_floating_point() else v for k, v in read_state_dict(src).items()}
    save_safetensors(sd, folder / weights)
    for name, text in extra.items():
        (folder / name).write_text(text)
    for path in sorted(folder.iterdir()):  # the registry's RemoteFile for each
        print(f'{folder.name}: RemoteFile("", "{path.name}", "{sha256sum(path)}", '
              f'{path.stat().st_size})')


def main():
    import json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vqgan", type=Path)
    ap.add_argument("--clip", type=Path)
    ap.add_argument("--clip-tag", default="v2", help="the CLIP's registry tag (ARCH/TAG)")
    ap.add_argument("--family", default="vit", choices=SHAPES_CLIP_FAMILIES,
                    help="the CLIP's image tower, as `vqclip train shapes-clip --family` made it")
    args = ap.parse_args()
    if args.vqgan:
        ship(args.vqgan, PROJECT_CHECKPOINTS / VQGAN_NAME, "vqgan.safetensors",
             {"model.yaml": taming_yaml()})
    if args.clip:
        arch, config = SHAPES_CLIP_FAMILIES[args.family]
        ship(args.clip, PROJECT_CHECKPOINTS / f"{arch}--{args.clip_tag}", "open_clip_model.safetensors",
             {f"{arch}.json": json.dumps(config, indent=2) + "\n"})


if __name__ == "__main__":
    main()
