"""The ``vqclip`` command: parses arguments and calls the library; no ML logic lives here."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import time
from pathlib import Path

from . import __version__

__all__ = ["build_parser", "generate_config", "main", "parse_args"]

log = logging.getLogger("vqclip")


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def cmd_models(args: argparse.Namespace) -> int:
    from .pretrained import list_models

    rows = list_models(args.cache_dir)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(r["name"]) for r in rows)
    print(f"{'NAME':<{width}}  {'FAMILY':<6}  {'SIZE':>9}  {'CHECK':<6}  LOCAL")
    for r in rows:
        local = r["path"] or "not downloaded"
        print(f"{r['name']:<{width}}  {r['family']:<6}  {_size(r['size']):>9}  {r['check']:<6}  {local}")
    print("\nGet one with `vqclip download NAME`; details: `vqclip models --json`.")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from .pretrained import download

    for name in args.names:
        paths = download(name, cache_dir=args.cache_dir, progress=not args.quiet, force=args.force)
        for path in paths.values():
            print(path)
    return 0


_OVERRIDE = re.compile(r"^([A-Za-z_][\w.]*)=")


def _is_override(arg: str) -> bool:
    """``key=value`` for a config key; anything else (``"E=mc2 poster"``) is a prompt."""
    from .config import FLAT_KEYS, GenerateConfig

    m = _OVERRIDE.match(arg)
    if m is None:
        return False
    groups = {f.name for f in dataclasses.fields(GenerateConfig)}
    return m[1] in FLAT_KEYS or m[1].split(".")[0] in groups


def _claim_run_folder(prompt: str) -> Path:
    """Create a new folder under outputs/ named by date and a slug of the prompt.

    Created here, with ``exist_ok=False``, so that two runs started in the same second (one per
    GPU, say) never share one.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower().split("|")[0]).strip("-")[:40].strip("-")
    base = Path("outputs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug or 'image'}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        folder = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(f"could not make a new run folder beside {base}")


def generate_config(args: argparse.Namespace):
    """The config a ``vqclip generate`` command line describes (checked, output path filled in)."""
    from .config import FLAT_KEYS, load_config, require_target

    prompts = [a for a in args.rest if not _is_override(a)]
    overrides = [a for a in args.rest if _is_override(a)]
    if len(prompts) > 1:
        raise ValueError(f"one prompt only, got {len(prompts)} words: quote it, e.g. "
                         f"vqclip generate \"{' '.join(prompts)}\"")
    flags = {k: getattr(args, k) for k in FLAT_KEYS if getattr(args, k, None) is not None}
    if prompts:
        flags["prompt"] = prompts[0]
    cfg = load_config(preset=args.preset, files=[args.config] if args.config else (),
                      overrides=overrides, **flags)
    require_target(cfg)
    from .device import resolve_device
    from .generator import check_outputs, check_precision

    check_precision(cfg.precision, resolve_device(cfg.device))
    folder = None
    if cfg.output.path is None:  # a fresh run folder; never overwrites anything
        folder = _claim_run_folder(cfg.prompts.text)
        cfg.output.path = str(folder / "final.png")
    try:
        check_outputs(cfg)  # before the models load, not after
    except OSError:
        if folder is not None:
            folder.rmdir()
        raise
    return cfg


def cmd_generate(args: argparse.Namespace) -> int:
    cfg = generate_config(args)
    try:
        return _generate(cfg, args)
    finally:  # a failed run leaves no empty run folder behind
        folder = Path(cfg.output.path).parent
        if folder.parent == Path("outputs") and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _generate(cfg, args: argparse.Namespace) -> int:
    from .generator import GenerationInterrupted, Generator

    start = time.perf_counter()
    gen = Generator.load(cfg)
    log.info("models loaded in %.1f s on %s", time.perf_counter() - start, gen.device)
    try:
        result = gen.generate(progress=not args.quiet)
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


# the train options that apply to some models only, and those models
_TRAIN_ONLY = {"init": ("shapes-clip", "shapes-clip-loop"), "augments": ("shapes-clip",),
               "clutter": ("shapes-clip",), "negatives": ("shapes-clip",),
               "adversarial": ("shapes-clip",), "clean_weight": ("shapes-clip",),
               "chains": ("shapes-clip-loop",), "minutes": ("shapes-clip-loop",),
               "device": ("shapes-clip-loop",), "workers": ("shapes-clip-loop",),
               "start": ("shapes-clip-loop",)}


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from . import train

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
        train.train_vqgan(out, progress=not args.quiet, log_file=args.log, **kw)
    elif args.model == "shapes-clip-loop":
        kw.update({k: v for k, v in dict(chains=args.chains, device=args.device,
                                         workers=args.workers, start=args.start).items()
                   if v is not None})
        if args.minutes is not None:
            kw["time_limit"] = 60 * args.minutes
        train.train_clip_on_loop(out, init=args.init, progress=not args.quiet, log_file=args.log, **kw)
    else:
        if args.augments is not None:
            kw["augments"] = tuple(args.augments)
        if args.clutter is not None:
            kw["clutter"] = args.clutter
        if args.adversarial is not None:
            kw["adversarial"] = args.adversarial
        if args.clean_weight is not None:
            kw["clean_weight"] = args.clean_weight
        if args.negatives:
            kw["negatives"] = train.negative_bank(args.negatives, seed=args.seed or 0)
        train.train_clip(out, progress=not args.quiet, log_file=args.log, init=args.init, **kw)
    log.info("trained in %.0f s", time.perf_counter() - start)
    print(out)
    return 0


def _scorer(args: argparse.Namespace):
    from .scoring import Scorer

    models = {k: getattr(args, k) for k in ("clip", "clip_pretrained", "clip_config")
              if getattr(args, k) is not None}
    return Scorer.load(preset=args.preset, device=args.device or "auto", cache=not args.no_cache,
                       batch_size=args.batch_size, **models)


def _print_json(data) -> None:
    print(json.dumps(data, indent=2))


def _none_readable(results) -> int:
    """The exit code of a scoring command: 1, with a message, when no image could be read."""
    if results:
        return 0
    print("vqclip: none of the images could be read (see the warnings above)", file=sys.stderr)
    return 1


def _report_matches(matches, as_json: bool) -> int:
    """Print ranked matches (JSON, or a table) for rank and search; returns the exit code."""
    if as_json:
        _print_json([{"path": m.path, "score": m.score} for m in matches])
    elif matches:
        print(f"{'RANK':>4}  {'SCORE':>7}  PATH")
        for r, m in enumerate(matches, 1):
            print(f"{r:>4}  {m.score:>7.4f}  {m.path}")
    return _none_readable(matches)


def cmd_classify(args: argparse.Namespace) -> int:
    from .scoring import check_labels, check_templates

    labels = check_labels(args.labels.split(","))  # before the model loads, not after
    check_templates(args.templates)
    if args.show < 1:
        raise ValueError(f"--show must be >= 1, got {args.show}")
    results = _scorer(args).classify(args.images, labels, args.templates, progress=not args.quiet)
    if args.json:
        _print_json([{"path": r.path, "top": r.top, "probs": r.probs} for r in results])
        return _none_readable(results)
    width = max((len(r.path) for r in results), default=0)
    for r in results:
        best = sorted(r.probs.items(), key=lambda kv: -kv[1])[:args.show]
        print(f"{r.path:<{width}}  " + "  ".join(f"{label} {p:.1%}" for label, p in best))
    return _none_readable(results)


def cmd_rank(args: argparse.Namespace) -> int:
    from .scoring import check_prompt

    check_prompt(args.prompt)
    matches = _scorer(args).rank(args.images, args.prompt, progress=not args.quiet)
    return _report_matches(matches, args.json)


def cmd_search(args: argparse.Namespace) -> int:
    from .scoring import check_prompt, image_files

    if args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    check_prompt(args.query)
    files = image_files(args.folder)
    matches = _scorer(args).rank(files, args.query, progress=not args.quiet)[:args.top]
    return _report_matches(matches, args.json)


def _add_clip_flags(group) -> None:
    """The flags that choose the CLIP, shared by generate and the scoring commands."""
    group.add_argument("--clip", metavar="ARCH")
    group.add_argument("--clip-pretrained", dest="clip_pretrained", metavar="TAG|PATH")
    group.add_argument("--clip-config", dest="clip_config", metavar="JSON",
                       help="open_clip model config for a custom architecture")


def _add_scoring(sub) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--json", action="store_true", help="machine-readable output")
        g = p.add_argument_group("models")
        g.add_argument("--preset", help="the CLIP of this preset (default: imagenet, ViT-B-32)")
        _add_clip_flags(g)
        g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
        g.add_argument("--batch-size", dest="batch_size", type=int, default=64, metavar="N")
        g.add_argument("--no-cache", dest="no_cache", action="store_true",
                       help="do not read or write the on-disk cache of image embeddings")
        _add_verbosity(p, argparse.SUPPRESS)

    p = sub.add_parser("classify", help="zero-shot classification of images over labels",
                       description="Each image's probabilities over the labels: CLIP's softmax of "
                                   "the image against each label (averaged over --templates).")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--labels", required=True, metavar="A,B,...", help="comma-separated labels")
    p.add_argument("--templates", nargs="+", metavar="T",
                   help='prompt templates with {} for the label, e.g. "a photo of a {}."')
    p.add_argument("--show", type=int, default=3, metavar="N", help="labels per image in the table")
    common(p)
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("rank", help="rank images by how well they match a prompt",
                       description="Cosine similarity of each image to the prompt, best first. "
                                   "Weighted prompts (\"a:1|b:-0.5\") as for generate.")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--prompt", required=True, metavar="TEXT")
    common(p)
    p.set_defaults(func=cmd_rank)

    p = sub.add_parser("search", help="find the images in a folder that match a description",
                       description="Text-to-image search over a folder, recursively. Embeddings are "
                                   "cached per model by file content, so searching again is fast.")
    p.add_argument("folder", metavar="DIR")
    p.add_argument("query", metavar="QUERY")
    p.add_argument("--top", type=int, default=10, metavar="K", help="how many results (default 10)")
    common(p)
    p.set_defaults(func=cmd_search)


def _add_verbosity(parser: argparse.ArgumentParser, default) -> None:
    # on the main parser and on each command, so `vqclip generate -q` works as `vqclip -q generate`
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="log debug messages")
    parser.add_argument("-q", "--quiet", action="store_true", default=default,
                        help="only warnings and errors; no progress bars")


def _names(text: str) -> list[str]:
    """A comma-separated list of names for --augments; "none" is the empty list."""
    return [] if text == "none" else text.split(",")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, as for every other user error
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_generate(sub) -> None:
    from .config import AUGMENTS, INITS, OPTIMIZERS

    p = sub.add_parser(
        "generate", help="make an image from a text prompt",
        description="Optimize VQGAN latents so that CLIP matches the prompts. Settings: the preset, "
                    "then --config, then flags, then key=value overrides (e.g. optim.lr=0.2).",
        epilog="Prompt syntax: \"text:weight:stop|other:-0.5\"; only trailing numbers count, "
               "\\: keeps a colon as text. Outputs go to a new folder under outputs/ unless "
               "--output is given.")
    p.add_argument("rest", nargs="*", metavar="PROMPT [key=value ...]",
                   help="the text prompt, then config overrides")
    p.add_argument("--preset", help="settings + model pair from configs/ (default: imagenet)")
    p.add_argument("--config", metavar="YAML", help="a YAML file of settings")
    g = p.add_argument_group("run")
    g.add_argument("--steps", type=int)
    g.add_argument("--seed", type=int, help="candidate k uses seed + k (default: random, recorded)")
    g.add_argument("--size", type=int, nargs=2, metavar=("W", "H"),
                   help="rounded to the VQGAN's factor (16 for the f16 models)")
    g.add_argument("--candidates", type=int, metavar="K", help="independent images in one batch")
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N or mps")
    g.add_argument("--precision", help="fp32 (default), bf16 or fp16 (GPU): mixed precision for "
                                       "the decoder and CLIP")
    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=float)
    g.add_argument("--optimizer", help=f"one of: {', '.join(OPTIMIZERS)}")
    g.add_argument("--cutn", type=int, help="cutouts per image per step")
    g.add_argument("--cut-pow", dest="cut_pow", type=float, help=">1 favours small cutouts")
    g.add_argument("--augments", type=_names,
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
    _add_clip_flags(g)
    g.add_argument("--rank-clip", dest="rank_clip", metavar="ARCH/TAG",
                   help="rank the candidates with this CLIP (registry name, or ARCH/path to "
                        "weights) rather than the guiding one")
    g = p.add_argument_group("output")
    g.add_argument("--output", metavar="FILE.png", help="candidate k of several: FILE-k.png")
    g.add_argument("--video", metavar="FILE.mp4|.gif")
    g.add_argument("--save-every", dest="save_every", type=int, metavar="N",
                   help="steps between video frames")
    g.add_argument("--overwrite", action="store_const", const=True, help="replace existing files")
    _add_verbosity(p, argparse.SUPPRESS)
    p.set_defaults(func=cmd_generate)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vqclip", description="Text-to-image generation guided by CLIP (VQGAN+CLIP).")
    parser.add_argument("--version", action="version", version=f"vqclip {__version__}")
    _add_verbosity(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub)
    _add_scoring(sub)

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
    p.add_argument("--augments", type=_names, metavar="A,B",
                   help="shapes-clip: augmentations of the training images (default: affine,noise)")
    p.add_argument("--clutter", type=int, metavar="N",
                   help="shapes-clip: clutter negatives per batch (default 48)")
    p.add_argument("--negatives", metavar="FILE.safetensors",
                   help="shapes-clip: mined negatives (scripts/mine_shapes.py), 16 per batch")
    p.add_argument("--adversarial", type=float, metavar="EPS",
                   help="shapes-clip: train on PGD perturbations up to EPS (L-inf, pixels in 0..1)")
    p.add_argument("--clean-weight", dest="clean_weight", type=float, metavar="W",
                   help="shapes-clip with --adversarial: share of the loss on the clean images")
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
    _add_verbosity(p, argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("models", help="list the weight registry and what is present locally")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--cache-dir", help="download cache (default: $VQCLIP_CACHE or ~/.cache/vqclip)")
    _add_verbosity(p, argparse.SUPPRESS)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("download", help="fetch weights into the cache (resumes, verifies)",
                       description="Fetch registry weights into the cache. An interrupted download "
                                   "resumes where it stopped; files are checked and renamed into "
                                   "place only when complete. Names: see `vqclip models`.")
    p.add_argument("names", nargs="+", metavar="NAME", help="registry name, e.g. imagenet_f16_16384")
    p.add_argument("--cache-dir", help="download cache (default: $VQCLIP_CACHE or ~/.cache/vqclip)")
    p.add_argument("--force", action="store_true", help="download again even if present")
    _add_verbosity(p, argparse.SUPPRESS)
    p.set_defaults(func=cmd_download)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line; exits with code 2 and one line on bad flags."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras and (args.command != "generate" or any(e.startswith("-") for e in extras)):
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if args.command == "generate":  # prompt words and key=value may come after options
        args.rest += extras
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 for user errors, 130 for Ctrl-C)."""
    from .checkpoints import CheckpointError
    from .pretrained import DownloadError

    args = parse_args(argv)
    # vqclip's own messages at the chosen level; other libraries' only when they are warnings
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    logging.getLogger("vqclip").setLevel(level)
    try:
        return args.func(args)
    except (ValueError, OSError, CheckpointError, DownloadError) as e:
        # user errors: bad names or values, missing or unwritable paths, no network
        print(f"vqclip: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from .generator import GenerationError

        if isinstance(e, GenerationError):
            print(f"vqclip: error: {e}", file=sys.stderr)  # NaN loss, out of memory
            return 1
        if "out of memory" in str(e).lower() and args.command in ("classify", "rank", "search"):
            print(f"vqclip: error: out of memory while encoding images: lower --batch-size "
                  f"(now {args.batch_size})", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        kept = {"download": "; partial downloads are kept and resume next time"}
        if args.command == "search" and not args.no_cache:
            kept["search"] = "; the embeddings computed so far are cached"
        print(f"vqclip: interrupted{kept.get(args.command, '')}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
