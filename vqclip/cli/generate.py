"""``vqclip generate``: a text prompt (plus flags and key=value overrides) to images on disk."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import re
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from .common import add_clip_flags, add_verbosity, names

__all__ = ["add_loop_flags", "generate_config", "in_run_folder", "load_generator", "loop_config",
           "new_run_folder", "register"]

log = logging.getLogger("vqclip")

_OVERRIDE = re.compile(r"^([A-Za-z_][\w.]*)=")


def register(sub) -> None:
    p = sub.add_parser(
        "generate", help="make an image from a text prompt",
        description="Optimize VQGAN latents so that CLIP matches the prompts. Settings: the preset, "
                    "then --config, then flags, then key=value overrides (e.g. optim.lr=0.2).",
        epilog="Prompt syntax: \"text:weight:stop|other:-0.5\"; only trailing numbers count, "
               "\\: keeps a colon as text. Outputs go to a new folder under outputs/ unless "
               "--output is given.")
    add_loop_flags(p)
    g = p.add_argument_group("output")
    g.add_argument("--output", metavar="FILE.png", help="candidate k of several: FILE-k.png")
    g.add_argument("--video", metavar="FILE.mp4|.gif")
    g.add_argument("--save-every", dest="save_every", type=int, metavar="N",
                   help="steps between video frames")
    g.add_argument("--overwrite", action="store_const", const=True, help="replace existing files")
    g.add_argument("--best-only", dest="best_only", action="store_const", const=True,
                   help="with several candidates, save only the best-ranked, as --output")
    g.add_argument("--all-candidates", dest="best_only", action="store_const", const=False,
                   help="save every candidate (FILE-k.png) and their ranking, where the preset "
                        "saves the best only")
    g.add_argument("--no-state", dest="save_state", action="store_const", const=False,
                   help="write no RUN.state.safetensors (what --resume goes on from)")
    g.add_argument("--resume", metavar="RUN.png",
                   help="go on from a finished or stopped run (its .state.safetensors) to --steps "
                        "in all, replacing its files; its settings stand")
    add_verbosity(p, argparse.SUPPRESS)
    p.set_defaults(func=cmd_generate)


def add_loop_flags(p, words=("PROMPT [key=value ...]", "the text prompt, then config overrides")
                   ) -> None:
    """The prompt, settings, run, optimization, prompt and model flags of the loop's commands;
    ``words``: the metavar and help of the words after the options."""
    from ..config import AUGMENTS, INITS, OPTIMIZERS

    p.add_argument("rest", nargs="*", metavar=words[0], help=words[1])
    p.add_argument("--preset", help="settings + model pair from configs/ (default: imagenet)")
    p.add_argument("--config", metavar="YAML", help="a YAML file of settings")
    g = p.add_argument_group("run")
    g.add_argument("--steps", type=int)
    g.add_argument("--seed", type=int, help="candidate k uses seed + k (default: random, recorded)")
    g.add_argument("--size", type=int, nargs=2, metavar=("W", "H"),
                   help="rounded to the VQGAN's factor (16 for the f16 models)")
    g.add_argument("--candidates", type=int, metavar="K", help="independent images in one batch")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    g.add_argument("--precision", help="auto (default: bf16 on CPUs with native bf16, else fp32), "
                                       "fp32, bf16 or fp16 (GPU): mixed precision for the decoder "
                                       "and CLIP")
    g.add_argument("--checkpoint", action="store_const", const=True,
                   help="recompute the decoder's activations in the backward: less memory at "
                        "large sizes, one more decoder forward per step")
    g.add_argument("--compile", action="store_const", const=True,
                   help="torch.compile the decoder and CLIP (once, on the first step)")
    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=float)
    g.add_argument("--optimizer", help=f"one of: {', '.join(OPTIMIZERS)}")
    g.add_argument("--cutn", type=int, help="cutouts per image per step")
    g.add_argument("--cut-pow", dest="cut_pow", type=float, help=">1 favours small cutouts")
    g.add_argument("--augments", type=names,
                   metavar="A,B", help=f"comma-separated, or none; from: {', '.join(AUGMENTS)}")
    g = p.add_argument_group("prompts")
    g.add_argument("--image-prompt", dest="image_prompts", action="append", metavar="PATH[:W]")
    g.add_argument("--noise-prompt", dest="noise_prompts", action="append", metavar="SEED:W")
    g.add_argument("--init-image", dest="init_image", metavar="PATH")
    g.add_argument("--init", choices=INITS,
                   help="start without --init-image: random codes per cell, one flat random code, "
                        "or a plain gray image")
    g.add_argument("--init-weight", dest="init_weight", type=float)
    g = p.add_argument_group("models")
    g.add_argument("--vqgan", metavar="NAME|CKPT")
    g.add_argument("--vqgan-config", dest="vqgan_config", metavar="YAML")
    add_clip_flags(g)
    g.add_argument("--rank-clip", dest="rank_clip", metavar="ARCH/TAG",
                   help="rank the candidates with this CLIP (registry name, or ARCH/path to "
                        "weights) rather than the guiding ones")


def _is_override(arg: str) -> bool:
    """``key=value`` for a config key; anything else (``"E=mc2 poster"``) is a prompt."""
    from ..config import FLAT_KEYS, GenerateConfig

    m = _OVERRIDE.match(arg)
    if m is None:
        return False
    groups = {f.name for f in dataclasses.fields(GenerateConfig)}
    return m[1] in FLAT_KEYS or m[1].split(".")[0] in groups


@contextlib.contextmanager
def new_run_folder(prompt: str | None) -> Iterator[Path | None]:
    """A new run folder under outputs/ named after ``prompt`` (None: the user chose the output,
    and there is none); a check that fails inside the block removes it again."""
    from ..outputs import claim_run_folder

    folder = claim_run_folder(prompt) if prompt is not None else None
    try:
        yield folder
    except OSError:
        if folder is not None:
            folder.rmdir()
        raise


def loop_config(args: argparse.Namespace, overrides: list[str] = (), resume: str | None = None):
    """The config of a loop command's line: prompt, flags, ``key=value`` words and
    ``overrides``, checked as far as can be before the models load. With ``--resume``, the
    stopped run's own (``resume`` is its kind), which what the line gives must match."""
    from ..config import FLAT_KEYS, load_config, require_target
    from ..device import resolve_device
    from ..generator import check_precision

    prompts = [a for a in args.rest if not _is_override(a)]
    words = [*overrides, *(a for a in args.rest if _is_override(a))]
    if len(prompts) > 1:
        raise ValueError(f"one prompt only, got {len(prompts)} words: quote it, e.g. "
                         f"vqclip {args.command} \"{' '.join(prompts)}\"")
    flags = {k: getattr(args, k) for k in FLAT_KEYS if getattr(args, k, None) is not None}
    if prompts:
        flags["prompt"] = prompts[0]
    files = [args.config] if args.config else ()
    if resume:
        cfg = _resumed_config(args, resume, files, words, flags)
    else:
        cfg = load_config(preset=args.preset, files=files, overrides=words, **flags)
    require_target(cfg)
    check_precision(cfg.precision, resolve_device(cfg.device))
    return cfg


def _resumed_config(args: argparse.Namespace, kind: str, files, words, flags):
    from ..config import load_config
    from ..resume import load_resumed

    models = load_config(preset=args.preset).models if args.preset else None

    def change(saved):
        if models is not None:  # a preset given again must name the run's pair of models
            for key in ("vqgan", "vqgan_config", "clip", "clip_pretrained", "clip_config"):
                saved.models[key] = models[key]
        return load_config(saved, files=files, overrides=words, **flags)

    return load_resumed(args.resume, kind, change, tensors=False)[1]


def generate_config(args: argparse.Namespace):
    """The config a ``vqclip generate`` command line describes (checked, output path filled in)."""
    from ..outputs import check_outputs

    cfg = loop_config(args, resume="generation" if args.resume else None)
    with new_run_folder(cfg.prompts.text if cfg.output.path is None else None) as folder:
        if folder is not None:  # a fresh run folder; never overwrites anything
            cfg.output.path = str(folder / "final.png")
        check_outputs(cfg)  # before the models load, not after
    return cfg


def in_run_folder(folder: Path, run: Callable[[], int]) -> int:
    """``run()``; a run folder under outputs/ that it leaves empty (a failed run) is removed."""
    try:
        return run()
    finally:
        if folder.parent == Path("outputs") and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def load_generator(cfg):
    """The models ``cfg`` names, loaded, with how long that took in the log."""
    from ..generator import Generator

    start = time.perf_counter()
    gen = Generator.load(cfg)
    log.info("models loaded in %.1f s on %s", time.perf_counter() - start, gen.device)
    return gen


def cmd_generate(args: argparse.Namespace) -> int:
    cfg = generate_config(args)
    return in_run_folder(Path(cfg.output.path).parent, lambda: _generate(cfg, args))


def _generate(cfg, args: argparse.Namespace) -> int:
    from ..generator import GenerationInterrupted

    gen = load_generator(cfg)
    try:
        result = gen.generate(config=cfg, progress=not args.quiet, resume=args.resume)
    except GenerationInterrupted as e:
        for path in e.result.files:
            print(path)
        print(f"vqclip: interrupted after {e.result.steps_done} steps; kept the image and video "
              "made so far", file=sys.stderr)
        return 130
    for path in result.files:
        print(path)
    if result.scores is not None and len(result.images) > 1:
        k = result.order[0]
        log.info("best of %d by %s: candidate %d (seed %d), score %.4f", len(result.images),
                 result.ranked_by, k, result.seeds[k], result.scores[k])
    t = result.timings
    log.info("%d steps in %.1f s (%.3f s/step), seed %d", result.steps_done, t["steps"],
             t["per_step"], result.seeds[0])
    return 0
