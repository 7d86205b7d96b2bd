"""Animations: each frame the previous one moved (zoom, rotation, translation) and optimized again.

Frame 0 is an ordinary generation (``animation.first_steps``, default ``optim.steps``). Frame
k + 1 warps frame k's image by its transform, with the uncovered edges reflected or repeated,
encodes it into latents and runs the loop from there for ``animation.steps_per_frame`` steps with
a fresh optimizer; ``prompts.init_weight`` pulls the latents back toward the warped frame, which
keeps frames coherent (default 0: the start alone does). Transform values and prompts follow the
schedules of :mod:`vqclip.schedules`; frame f's values are the move from frame f - 1 (frame 0 is
not moved). Frame f draws its cutouts from its own stream (:func:`frame_seed`): frame 0 is
exactly ``generate`` with the same seed and settings.

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
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm.auto import tqdm

from . import __version__
from .errors import memory_errors
from .images import atomic_path, save_png, to_pil, to_tensor
from .outputs import video_frame
from .prompts import parse_text_prompts
from .resume import ANIMATION_STATE as STATE
from .resume import load_resumed, save_state
from .schedules import prompts_by_frame, schedule_values
from .video import VideoWriter

__all__ = ["AnimationInterrupted", "AnimationResult", "animate", "check_animation_outputs",
           "frame_seed", "plan", "warp"]

log = logging.getLogger(__name__)

TRANSFORMS = ("zoom", "angle", "translate_x", "translate_y")
FRAME_NAME = re.compile(r"frame-\d{5}\.png")  # what this module writes, and all it removes


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
    """The seed of frame ``frame``'s random stream: ``seed`` itself for frame 0 (which is then
    exactly ``generate`` with that seed), and far apart for the frames after it."""
    return (seed + frame * 1_000_003) % 2**63


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


def plan(cfg: DictConfig) -> tuple[list[str], dict[str, list[float]]]:
    """Each frame's prompt, and each transform's value at each frame, checked: what the command
    line refuses before the models load.

    Raises:
        ValueError: more than one candidate, or a story or switch that does not fit the frames.
    """
    if cfg.candidates != 1:
        raise ValueError("an animation has one candidate; drop --candidates")
    a = cfg.animation
    prompts = prompts_by_frame(cfg.prompts.text, list(a.prompt_at), a.frames)
    for text in set(prompts):
        parse_text_prompts(text)  # each part's syntax
    return prompts, {name: schedule_values(a[name], a.frames, name) for name in TRANSFORMS}


def check_animation_outputs(cfg: DictConfig, clear: bool = False) -> tuple[Path, Path]:
    """The output folder and the video path of an animation, checked before any work: a
    folder that holds frames already is refused without ``output.overwrite``. With it and
    ``clear`` (just before the first frame), the old frames, records and video are removed, so
    that none outlives the new run; other files stay.

    Raises:
        ValueError: no output folder. FileExistsError, NotADirectoryError: see messages.
    """
    if not cfg.animation.output:
        raise ValueError("an animation needs an output folder (--output DIR, animation.output)")
    folder, video = Path(cfg.animation.output), _video_path(cfg)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file; the animation's output is a folder")
    old = sorted(p for p in folder.iterdir() if FRAME_NAME.fullmatch(p.name)) \
        if folder.is_dir() else []
    taken = [p for p in (*old[:1], folder / "frames.jsonl", video) if p.exists()]
    if taken and not cfg.output.overwrite:
        raise FileExistsError(f"{taken[0]} exists; choose another output folder or allow "
                              "overwriting (--overwrite, output.overwrite=true)")
    folder.mkdir(parents=True, exist_ok=True)
    video.parent.mkdir(parents=True, exist_ok=True)
    if clear:
        for path in [*old, *taken, folder / STATE]:
            path.unlink(missing_ok=True)
    return folder, video


def animate(gen, prompt: str | None = None, *, config: DictConfig | dict | None = None,
            callback: Callable[[int, dict[str, Any]], None] | None = None, progress: bool = False,
            overrides: list[str] = (), resume: str | Path | None = None,
            **kwargs: Any) -> AnimationResult:
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
        resume: an animation's folder to go on from, to ``frames`` in all, bit for bit
            (:mod:`vqclip.resume`); its settings stand, and those given must match them.
    Returns:
        An :class:`AnimationResult`.
    Raises:
        ValueError, FileNotFoundError, FileExistsError: bad settings or outputs, before any work.
        GenerationError: a NaN loss or out of memory. AnimationInterrupted: Ctrl-C; the frames
        finished are kept, and ``.result`` lists them.
    """
    folder = kwargs.pop("output", None)  # the folder, not generate's PNG
    kwargs.setdefault("candidates", 1)  # a preset's candidates are for generations
    if folder is not None:
        overrides = [*overrides, f"animation.output={folder}"]
    done = None
    if resume is None:
        cfg = gen.settings(prompt, config, overrides, **kwargs)
    else:
        _, cfg, header, tensors = load_resumed(resume, "animation", lambda saved: gen.settings(
            prompt, config if config is not None else saved, overrides, **kwargs))
        done = header["records"], tensors["last"]
    prompts, moves = plan(cfg)
    cfg.output.path = None  # the frames are written here, not as a generation's PNG
    gen._settle(cfg)  # seed, precision and size as they run; checks before any work
    if done is None:
        folder, video_path = check_animation_outputs(cfg, clear=True)
    else:
        folder, video_path = Path(cfg.animation.output), _video_path(cfg)
        if [r["prompt"] for r in done[0]] != prompts[:len(done[0])]:
            log.warning("with %d frames the story's parts switch at other frames than in the %d "
                        "made so far", cfg.animation.frames, len(done[0]))
    out = _Output(cfg, folder, video_path, gen.vqgan.downsample_factor, *(done or ([], None)))
    return memory_errors(cfg, lambda: _frames(gen, cfg, prompts, moves, out, callback, progress))


def _video_path(cfg: DictConfig) -> Path:
    return Path(cfg.output.video) if cfg.output.video else Path(cfg.animation.output) / "animation.mp4"


def _frames(gen, cfg, prompts, moves, out, callback, progress):
    a, t0 = cfg.animation, time.perf_counter()
    result = AnimationResult(out.records, out.files(), out.last, cfg)
    try:
        with tqdm(total=a.frames, initial=len(out.records), disable=not progress, desc="animate",
                  unit="frame") as bar:
            for f in range(len(out.records), a.frames):
                image = _frame(gen, cfg, f, prompts[f], moves, result.last)
                move = {name: moves[name][f] if f else None for name in TRANSFORMS}  # 0: no move
                loss = image.loss
                record = {"frame": f, "prompt": prompts[f], **move, "steps": image.steps,
                          "loss": loss, "seed": cfg.seed,
                          "path": str(out.folder / f"frame-{f:05d}.png")}
                result.files += out.write(image.tensor, record)
                result.last = image.tensor
                bar.set_postfix(prompt=prompts[f][:30], loss="-" if loss is None else f"{loss:.4f}")
                bar.update()
                if callback is not None:
                    callback(f, {**record, "image": image.tensor})
    except KeyboardInterrupt:  # the frames written so far are complete; the one under way is not
        result.interrupted = True
    result.files = sorted(set(result.files))
    elapsed = time.perf_counter() - t0
    result.timings = {"total": elapsed, "per_frame": elapsed / max(1, len(result.records))}
    if result.interrupted:
        raise AnimationInterrupted(result)
    return result


@dataclass
class _Made:
    tensor: torch.Tensor  # (1, 3, H, W) in [0, 1]
    loss: float | None
    steps: int


def _frame(gen, cfg, f, prompt, moves, last) -> _Made:
    """Frame f: the loop from frame f-1 moved (from the config's start for frame 0)."""
    a = cfg.animation
    fcfg = copy.deepcopy(cfg)
    fcfg.prompts.text = prompt
    fcfg.optim.steps = (a.first_steps if a.first_steps is not None else cfg.optim.steps) \
        if f == 0 else a.steps_per_frame
    if f:  # the start comes from the frame before: skip encoding the init image again
        fcfg.prompts.init_image, fcfg.prompts.init = None, "random"
    streams, guides, z = gen._prepare(fcfg, [frame_seed(cfg.seed, f)])
    if f:
        move = {name: moves[name][f] for name in TRANSFORMS}
        with torch.no_grad():
            z = gen.vqgan.encode(warp(last.to(gen.device), border=a.border, **move))
        z.requires_grad_()
    image, losses, interrupted, _ = gen._loop(fcfg, z, guides, streams, None, None, False)
    if interrupted:
        raise KeyboardInterrupt
    return _Made(image.detach().cpu(), losses[-1].item() if losses else None, fcfg.optim.steps)


class _Output:
    """An animation's files: each frame's PNG, the records so far, the state to go on from
    (:mod:`vqclip.resume`) and the whole video again, written in that order as each frame is done.
    A resumed run starts with the ``records`` and the ``last`` frame of the run it continues."""

    def __init__(self, cfg, folder, video_path, factor, records, last):
        self.cfg, self.folder, self.video_path, self.factor = cfg, folder, video_path, factor
        self.records, self.last = [], last
        self.shown = []  # the video's frames
        for record in records:  # the frames made, as the video shows them
            record = {**record, "path": str(folder / Path(record["path"]).name)}
            self.records.append(record)
            with Image.open(record["path"]) as im:
                self.shown.append(video_frame(to_tensor(im.convert("RGB"))))

    def files(self) -> list[Path]:
        """The files of the frames made so far."""
        frames = [Path(r["path"]) for r in self.records]
        return [*frames, self.folder / "frames.jsonl", self.video_path, self.folder / STATE] \
            if frames else []

    def write(self, image: torch.Tensor, record: dict) -> list[Path]:
        text = {key: str(value) for key, value in record.items() if key != "path"}
        text.update(vqclip_version=__version__, config=OmegaConf.to_yaml(self.cfg))
        png = save_png(to_pil(image[0]), record["path"], text)
        self.records.append(record)
        jsonl = self.folder / "frames.jsonl"
        with atomic_path(jsonl) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        written = [png, jsonl, self.video_path]
        if self.cfg.output.save_state:  # before the video, the slowest: a frame kept is resumable
            written.append(save_state(self.folder / STATE, "animation", {"last": image}, self.cfg,
                                      records=self.records, factor=self.factor))
        self.shown.append(video_frame(image))
        video = VideoWriter(self.video_path, fps=self.cfg.animation.fps)  # renamed when whole
        try:
            for frame in self.shown:
                video.append(frame)
        except BaseException:  # Ctrl-C included: the last whole video stays in place
            video.close(keep=False)
            raise
        video.close()
        return written
