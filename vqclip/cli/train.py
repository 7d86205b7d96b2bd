"""``vqclip train``: retrain the bundled offline models on the shapes world (:mod:`vqclip.shapes`)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from .common import add_verbosity, names

__all__ = ["register"]

log = logging.getLogger("vqclip")

# the train options that apply to some models only, and those models
_TRAIN_ONLY = {"init": ("shapes-clip", "shapes-clip-loop"), "augments": ("shapes-clip",),
               "clutter": ("shapes-clip",), "negatives": ("shapes-clip",),
               "adversarial": ("shapes-clip",), "clean_weight": ("shapes-clip",),
               "family": ("shapes-clip",),
               "chains": ("shapes-clip-loop",), "minutes": ("shapes-clip-loop",),
               "device": ("shapes-clip-loop",), "workers": ("shapes-clip-loop",),
               "start": ("shapes-clip-loop",)}


def register(sub) -> None:
    p = sub.add_parser("train", help="train the bundled offline models on the shapes world",
                       description="Train the tiny VQGAN or CLIP of the shapes preset. Reproducible "
                                   "from --seed; saves a safetensors checkpoint every --save-every "
                                   "steps, so an interrupted run keeps its progress.")
    p.add_argument("model", choices=["shapes-vqgan", "shapes-clip", "shapes-clip-loop"],
                   help="shapes-clip-loop fine-tunes a shapes CLIP (--init, default the shipped "
                        "one) against the generation loop's own images (docs/shapes.md)")
    p.add_argument("--out", metavar="FILE.safetensors", help="default: <model>.safetensors here")
    p.add_argument("--steps", type=int, help="default: 6000, 4000, 1000 (in the order of the models)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="default: 32, 128, 256")
    p.add_argument("--lr", type=float, help="default: 1e-3, 1e-3, 2e-4")
    p.add_argument("--seed", type=int)
    p.add_argument("--save-every", dest="save_every", type=int)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--log", metavar="FILE.jsonl", help="append loss records here")
    p.add_argument("--init", metavar="FILE.safetensors",
                   help="shapes-clip, shapes-clip-loop: start from these weights")
    p.add_argument("--augments", type=names, metavar="A,B",
                   help="shapes-clip: augmentations of the training images (default: affine,noise)")
    p.add_argument("--clutter", type=int, metavar="N",
                   help="shapes-clip: clutter negatives per batch (default 48)")
    p.add_argument("--negatives", metavar="FILE.safetensors",
                   help="shapes-clip: mined negatives (scripts/mine_shapes.py), 16 per batch")
    p.add_argument("--adversarial", type=float, metavar="EPS",
                   help="shapes-clip: train on PGD perturbations up to EPS (L-inf, pixels in 0..1)")
    p.add_argument("--clean-weight", dest="clean_weight", type=float, metavar="W",
                   help="shapes-clip with --adversarial: share of the loss on the clean images")
    p.add_argument("--family", choices=["vit", "resnet"],
                   help="shapes-clip: the image tower (default vit, the shipped one; resnet is "
                        "another family, for ensembles)")
    p.add_argument("--chains", type=int, metavar="N",
                   help="shapes-clip-loop: generation runs side by side (default 256)")
    p.add_argument("--minutes", type=float, help="shapes-clip-loop: stop and save after this long")
    p.add_argument("--device", help="shapes-clip-loop: auto (default), cpu, cuda, cuda:N or mps")
    p.add_argument("--start", choices=["gray", "render"],
                   help="shapes-clip-loop: start each run gray, as generation does (default), or on "
                        "a clean render of its prompt, so that the failures are the loop's departures "
                        "from a true shape")
    p.add_argument("--workers", type=int, metavar="N",
                   help="shapes-clip-loop: processes that render batches and run the judge "
                        "(default: the CPU count, at most 4)")
    add_verbosity(p, argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from ..shapes import clip_trainer, loop_trainer, vqgan_trainer

    for name, models in _TRAIN_ONLY.items():
        if getattr(args, name) is not None and args.model not in models:
            raise ValueError(f"--{name.replace('_', '-')} is for {' and '.join(models)}, "
                             f"not {args.model}")
    if args.threads:
        torch.set_num_threads(args.threads)
    kw = {k: v for k, v in dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                seed=args.seed, save_every=args.save_every).items() if v is not None}
    out = Path(args.out or f"{args.model}.safetensors")
    start = time.perf_counter()
    if args.model == "shapes-vqgan":
        vqgan_trainer.train_vqgan(out, progress=not args.quiet, log_file=args.log, **kw)
    elif args.model == "shapes-clip-loop":
        kw.update({k: v for k, v in dict(chains=args.chains, device=args.device,
                                         workers=args.workers, start=args.start).items()
                   if v is not None})
        if args.minutes is not None:
            kw["time_limit"] = 60 * args.minutes
        loop_trainer.train_clip_on_loop(out, init=args.init, progress=not args.quiet,
                                        log_file=args.log, **kw)
    else:
        kw.update({k: v for k, v in dict(clutter=args.clutter, adversarial=args.adversarial,
                                         clean_weight=args.clean_weight,
                                         family=args.family).items() if v is not None})
        if args.augments is not None:
            kw["augments"] = tuple(args.augments)
        if args.negatives:
            kw["negatives"] = clip_trainer.negative_bank(args.negatives, seed=args.seed or 0)
        clip_trainer.train_clip(out, progress=not args.quiet, log_file=args.log, init=args.init, **kw)
    log.info("trained in %.0f s", time.perf_counter() - start)
    print(out)
    return 0
