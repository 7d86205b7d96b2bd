"""``vqclip animate``: frames that zoom, turn and move, each optimized from the one before."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .common import add_verbosity
from .generate import add_loop_flags, in_run_folder, load_generator, loop_config, new_run_folder

__all__ = ["animate_config", "register"]

log = logging.getLogger("vqclip")


def register(sub) -> None:
    p = sub.add_parser(
        "animate", help="make an animation: zoom, rotate and pan while the prompt changes",
        description="Frame 0 is a generation; each next frame is the previous one transformed "
                    "(zoom, angle, translation) and optimized again. Every loop flag of generate "
                    "works here too.",
        epilog="Schedules: a number, or keyframes \"0:1.0, 30:1.05\" (interpolated, held after the "
               "last). A story: \"a red circle^a blue square\" gives each part an equal share of "
               "the frames. Frames go to a new folder under outputs/ unless --output is given.")
    add_loop_flags(p)
    g = p.add_argument_group("animation")
    g.add_argument("--frames", type=int, help="frames in all (default 30)")
    g.add_argument("--steps-per-frame", dest="steps_per_frame", type=int, metavar="S",
                   help="loop steps for each frame after the first (default 20)")
    g.add_argument("--first-steps", dest="first_steps", type=int, metavar="S0",
                   help="frame 0's steps (default: the preset's steps)")
    g.add_argument("--zoom", metavar="SCHED", help="> 1 moves closer: 1.05 is 5%% per frame")
    g.add_argument("--angle", metavar="SCHED", help="degrees per frame, counter-clockwise (a "
                   "value that starts with a minus goes after an =: --angle=-2)")
    g.add_argument("--translate-x", dest="translate_x", metavar="SCHED",
                   help="pixels per frame, to the right")
    g.add_argument("--translate-y", dest="translate_y", metavar="SCHED",
                   help="pixels per frame, downward")
    g.add_argument("--border", choices=("reflect", "edge"),
                   help="what fills the uncovered edges (default reflect)")
    g.add_argument("--prompt-at", dest="prompt_at_pairs", nargs=2, action="append",
                   metavar=("FRAME", "TEXT"), help="switch to TEXT at FRAME (repeatable)")
    g = p.add_argument_group("output")
    g.add_argument("--output", dest="folder", metavar="DIR",
                   help="the folder for the frames, frames.jsonl and the video")
    g.add_argument("--video", metavar="FILE.mp4|.gif", help="default DIR/animation.mp4")
    g.add_argument("--fps", type=int, help="the video's frame rate (default 12)")
    g.add_argument("--overwrite", action="store_const", const=True,
                   help="replace the frames of an earlier animation in DIR")
    g.add_argument("--resume", metavar="DIR", help="go on from a finished or stopped animation "
                   "in DIR to --frames in all; its settings stand")
    add_verbosity(p, argparse.SUPPRESS)
    p.set_defaults(func=cmd_animate)


def animate_config(args: argparse.Namespace):
    """The config an ``animate`` command line describes, with every check that needs no model:
    schedules, the story and switches, one candidate, and the output folder."""
    from ..animation import check_animation_outputs, plan

    pairs = args.prompt_at_pairs or []
    for frame, _ in pairs:
        if not frame.isdigit():
            raise ValueError(f"--prompt-at {frame!r}: FRAME must be a whole number >= 0")
    args.prompt_at = [f"{frame}:{text}" for frame, text in pairs] or None
    if args.candidates is None:  # a preset's candidates are for generations
        args.candidates = 1
    if args.resume:
        if args.folder and Path(args.folder).resolve() != Path(args.resume).resolve():
            raise ValueError("--resume DIR goes on in DIR; drop --output")
        cfg = loop_config(args, resume="animation")
        plan(cfg)
        return cfg
    cfg = loop_config(args, overrides=[f"animation.output={args.folder}"] if args.folder else [])
    plan(cfg)
    with new_run_folder(None if cfg.animation.output else cfg.prompts.text.split("^")[0]) as folder:
        if folder is not None:
            cfg.animation.output = str(folder)
        check_animation_outputs(cfg)  # before the models load, not after
    return cfg


def cmd_animate(args: argparse.Namespace) -> int:
    cfg = animate_config(args)
    return in_run_folder(Path(cfg.animation.output), lambda: _animate(cfg, args))


def _animate(cfg, args: argparse.Namespace) -> int:
    from ..animation import AnimationInterrupted

    gen = load_generator(cfg)
    try:
        result = gen.animate(config=cfg, progress=not args.quiet, resume=args.resume)
    except AnimationInterrupted as e:
        for path in sorted(set(e.result.files)):
            print(path)
        done = len(e.result.records)
        print(f"vqclip: interrupted after {done} frames; " +
              ("kept them and the video" if done else "none was finished"), file=sys.stderr)
        return 130
    for path in result.files:
        print(path)
    log.info("%d frames in %.1f s (%.2f s/frame), seed %d", len(result.records),
             result.timings["total"], result.timings["per_frame"], result.config.seed)
    return 0
