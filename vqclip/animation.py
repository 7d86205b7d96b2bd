"""Animations: each frame the previous one moved (zoom, rotation, translation) and optimized again.

Frame 0 is an ordinary generation (``animation.first_steps``, default ``optim.steps``). Frame
k + 1 warps frame k's image by its transform, with the uncovered edges reflected or repeated,
encodes it into latents and runs the loop from there for ``animation.steps_per_frame`` steps with
a fresh optimizer; ``prompts.init_weight`` pulls the latents back toward the warped frame, which
keeps frames coherent (default 0: the start alone does). Transform values and prompts follow the
schedules of :mod:`vqclip.schedules`. Frame f draws its cutouts from a stream seeded by (seed, f).

Files in the output folder, each written atomically as soon as its frame is done, so that a
run stopped at any moment leaves every finished frame and a playable video:
    ``frame-00000.png`` ...: each frame, with its record (frame, prompt, transform, loss, seed,
    the full config) in PNG text chunks; ``frames.jsonl``: the same records, one line a frame;
    the video (``output.video``, default ``animation.mp4`` in the folder), rewritten whole after
    each frame.

Example:
    >>> gen = Generator.load(preset="shapes")  # doctest: +SKIP
    >>> gen.animate("a red circle^a blue square", frames=24, zoom="0:1.0, 12:1.1", output="zoom")
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from . import __version__
from .config import frame_prompts
from .errors import memory_errors
from .images import atomic_path, save_png, to_pil
from .outputs import video_frame
from .schedules import schedule_values
from .video import VideoWriter

__all__ = ["AnimationInterrupted", "AnimationResult", "animate", "check_animation_outputs",
           "frame_seed", "warp"]

TRANSFORMS = ("zoom", "angle", "translate_x", "translate_y")
FRAME_GLOB = "frame-*.png"


@dataclass
class AnimationResult:
    """What an animation made: one record per finished frame (as in ``frames.jsonl``), the
    files written (frames, their records, the video) and the last frame as a tensor."""

    records: list[dict[str, Any]]
    files: list[Path]
    last: torch.Tensor | None
    config: DictConfig
    interrupted: bool = False
    timings: dict[str, float] = field(default_factory=dict)


class AnimationInterrupted(KeyboardInterrupt):
    """Ctrl-C during an animation; ``.result`` lists the frames finished (all kept on disk)."""

    def __init__(self, result: AnimationResult):
        super().__init__(f"interrupted after {len(result.records)} frames")
        self.result = result


def frame_seed(seed: int, frame: int) -> int:
    """The seed of frame ``frame``'s random stream: distinct for every (seed, frame) pair."""
    return (seed * 1_000_003 + frame) % 2**63


def warp(images: torch.Tensor, zoom: float = 1.0, angle: float = 0.0, translate_x: float = 0.0,
         translate_y: float = 0.0, border: str = "reflect") -> torch.Tensor:
    """Move the picture: ``zoom`` about the centre (> 1 closer), ``angle`` degrees
    counter-clockwise, then ``translate_x``/``_y`` pixels right/down. Uncovered edges are the
    picture mirrored (``reflect``) or its edge pixels repeated (``edge``).

    Shape: ``(B, 3, H, W) -> (B, 3, H, W)``.
    """
    B, _, H, W = images.shape
    a = math.radians(angle)
    # each output pixel p reads the input at the inverse of the move, R(-angle) (p - t) / zoom
    # about the centre, in normalized coordinates (x right, y down, both in [-1, 1]), where a
    # rotation of a non-square picture needs its aspect ratio
    A = torch.tensor([[math.cos(a), -math.sin(a) * H / W],
                      [math.sin(a) * W / H, math.cos(a)]], dtype=torch.float64) / zoom
    t = torch.tensor([2 * translate_x / W, 2 * translate_y / H], dtype=torch.float64)
    theta = torch.cat([A, -(A @ t)[:, None]], 1).to(images.device, images.dtype)
    grid = F.affine_grid(theta.expand(B, 2, 3), list(images.shape), align_corners=False)
    padding = {"reflect": "reflection", "edge": "border"}[border]
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def check_animation_outputs(cfg: DictConfig) -> tuple[Path, Path]:
    """The output folder and the video path of an animation, checked before any work: a
    folder that holds frames already is refused without ``output.overwrite``; with it, its old
    frames and records are removed, so that none outlives the new run.

    Raises:
        ValueError: no output folder. FileExistsError, NotADirectoryError: see messages.
    """
    if not cfg.animation.output:
        raise ValueError("an animation needs an output folder (--output DIR, animation.output)")
    folder = Path(cfg.animation.output)
    video = Path(cfg.output.video) if cfg.output.video else folder / "animation.mp4"
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file; the animation's output is a folder")
    old = sorted(folder.glob(FRAME_GLOB)) if folder.is_dir() else []
    taken = [p for p in (*old[:1], folder / "frames.jsonl", video) if p.exists()]
    if taken and not cfg.output.overwrite:
        raise FileExistsError(f"{taken[0]} exists; choose another output folder or allow "
                              "overwriting (--overwrite, output.overwrite=true)")
    folder.mkdir(parents=True, exist_ok=True)
    video.parent.mkdir(parents=True, exist_ok=True)
    for path in [*old, *taken]:
        path.unlink(missing_ok=True)
    return folder, video


def animate(gen, prompt: str | None = None, *, config: DictConfig | dict | None = None,
            callback: Callable[[int, dict[str, Any]], None] | None = None, progress: bool = False,
            overrides: list[str] = (), **kwargs: Any) -> AnimationResult:
    """Make an animation with a loaded :class:`vqclip.Generator`.

    Args:
        gen: the generator (its models, device and default settings).
        prompt: the text prompt; ``"a^b^c"`` is a story (see :mod:`vqclip.schedules`).
        config, overrides, **kwargs: as for :meth:`vqclip.Generator.generate`, plus the
            ``animation.*`` settings by their flat names (``frames``, ``steps_per_frame``,
            ``first_steps``, ``zoom``, ``angle``, ``translate_x``, ``translate_y``, ``border``,
            ``prompt_at``, ``fps``); ``output`` is the folder.
        callback: called as ``callback(frame, record)`` once each frame is written; ``record``
            is its ``frames.jsonl`` line plus ``"image"``, the frame ``(1, 3, H, W)``.
        progress: one bar over the frames, with the prompt and the loss.
    Returns:
        An :class:`AnimationResult`.
    Raises:
        ValueError, FileNotFoundError, FileExistsError: bad settings or outputs, before any work.
        GenerationError: a NaN loss or out of memory. AnimationInterrupted: Ctrl-C; the frames
        finished are kept, and ``.result`` lists them.
    """
    if "output" in kwargs:  # the folder, not generate's PNG
        overrides = [*overrides, f"animation.output={kwargs.pop('output')}"]
    cfg = gen.settings(prompt, config, overrides, **kwargs)
    if cfg.candidates != 1:
        raise ValueError("an animation has one candidate; drop --candidates")
    prompts = frame_prompts(cfg)
    a = cfg.animation
    moves = {name: schedule_values(a[name], a.frames, name) for name in TRANSFORMS}
    folder, video_path = check_animation_outputs(cfg)
    base = copy.deepcopy(cfg)
    base.output.path = base.output.video = None  # the frames are written here, not by the loop
    gen._settle(base)
    cfg.seed, cfg.precision, cfg.size = base.seed, base.precision, base.size  # as they ran
    return memory_errors(base, lambda: _frames(gen, cfg, base, prompts, moves, folder, video_path,
                                               callback, progress))


def _frames(gen, cfg, base, prompts, moves, folder, video_path, callback, progress):
    a, t0 = cfg.animation, time.perf_counter()
    result = AnimationResult([], [], None, cfg)
    shown: list = []  # the video's frames
    image = None
    with tqdm(total=a.frames, disable=not progress, desc="animate", unit="frame") as bar:
        for f in range(a.frames):
            fcfg = copy.deepcopy(base)
            fcfg.prompts.text = prompts[f]
            fcfg.optim.steps = (a.first_steps if a.first_steps is not None else cfg.optim.steps) \
                if f == 0 else a.steps_per_frame
            streams, cutouts, targets, z = gen._prepare(fcfg, [frame_seed(cfg.seed, f)])
            move = {name: moves[name][f] for name in TRANSFORMS}
            if image is not None:  # every frame after the first starts from the one before
                with torch.no_grad():
                    z = gen.vqgan.encode(warp(image, border=a.border, **move)).requires_grad_()
            image, losses, interrupted = gen._loop(fcfg, z, cutouts, streams, targets, None,
                                                   None, False)
            if interrupted:  # the unfinished frame is not written
                result.interrupted = True
                raise AnimationInterrupted(result)
            loss = losses[-1].item() if losses else None
            record = {"frame": f, "prompt": prompts[f], **move, "steps": fcfg.optim.steps,
                      "loss": loss, "seed": cfg.seed, "path": str(folder / f"frame-{f:05d}.png")}
            result.files += _write_frame(image, record, cfg, folder, result.records, shown,
                                         video_path)
            result.last = image.detach().cpu()
            bar.set_postfix(prompt=prompts[f][:30], loss="-" if loss is None else f"{loss:.4f}")
            bar.update()
            if callback is not None:
                callback(f, {**record, "image": image})
    result.files = sorted(set(result.files))
    elapsed = time.perf_counter() - t0
    result.timings = {"total": elapsed, "per_frame": elapsed / a.frames}
    return result


def _write_frame(image, record, cfg, folder, records, shown, video_path) -> list[Path]:
    """Write one finished frame: its PNG, the records so far, and the whole video again."""
    text = {key: str(value) for key, value in record.items() if key != "path"}
    text.update(vqclip_version=__version__, config=OmegaConf.to_yaml(cfg))
    png = save_png(to_pil(image[0]), record["path"], text)
    records.append(record)
    jsonl = folder / "frames.jsonl"
    with atomic_path(jsonl) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    shown.append(video_frame(image))
    with VideoWriter(video_path, fps=cfg.animation.fps) as video:  # atomic: a temp file, renamed
        for frame in shown:
            video.append(frame)
    return [png, jsonl, video_path]
