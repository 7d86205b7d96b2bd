"""Generation settings: dataclasses are the schema, YAML presets and command lines override them.

Merge order, later wins: the schema's defaults, the preset (``configs/<name>.yaml``), a config
object or YAML files, keyword arguments, then ``key=value`` overrides. OmegaConf checks every key
and type against the schema, so a typo fails instead of being ignored.

Example:
    >>> cfg = load_config(preset="imagenet", steps=50, overrides=["cutouts.cutn=16"])  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .schedules import check_animation

__all__ = ["AUGMENTS", "BORDERS", "FLAT_KEYS", "INITS", "OPTIMIZERS", "PRECISIONS", "PRESET_DIR", "GenerateConfig",
           "check_config", "list_presets", "load_config", "require_target"]

PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_PRESET = "imagenet"
OPTIMIZERS = ("adam", "adamw", "sgd", "radam", "rmsprop")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
INITS = ("random", "flat", "gray")
AUGMENTS = ("affine", "perspective", "jitter", "erasing", "noise", "flip", "sharpness")
BORDERS = ("reflect", "edge")
MAX_SIDE = 4096  # pixels; beyond this a VQGAN decoder needs tens of GB for activations
MAX_CANDIDATES = 64
MAX_LR = 100.0  # latents live in the codebook's range (about ±5 for the official models)


@dataclass
class EnsembleMember:
    """One more CLIP that guides with the main one (``models.ensemble``): its own cutouts at
    its own input size, its own prompt embeddings, its loss weighted by ``weight``."""

    arch: str = MISSING  # open_clip architecture, or "ARCH/TAG" from the registry
    pretrained: Optional[str] = None  # registry tag or weights file
    config: Optional[str] = None  # open_clip model-config JSON for a custom architecture
    weight: float = 1.0


@dataclass
class ModelsConfig:
    vqgan: str = "imagenet_f16_16384"  # registry name or .ckpt/.safetensors path
    vqgan_config: Optional[str] = None  # taming YAML, when not implied by the name or file
    clip: str = "ViT-B-32"  # open_clip architecture
    clip_pretrained: Optional[str] = "openai"  # registry tag or weights file
    clip_config: Optional[str] = None  # open_clip model-config JSON for a custom architecture
    # ranks the results: "ARCH/TAG" from the registry or "ARCH/path/to/weights"; default: the
    # guiding CLIP. Another model does not reward images that only fool the guiding one.
    rank_clip: Optional[str] = None
    # more CLIPs that guide (and rank, without rank_clip): the loss is the weighted mean of each
    # model's, the main one weighing clip_weight. Images that fool one model rarely fool others.
    ensemble: list[EnsembleMember] = field(default_factory=list)
    clip_weight: float = 1.0


@dataclass
class PromptsConfig:
    text: str = ""  # "text:weight:stop|other text:-0.5"
    images: list[str] = field(default_factory=list)  # "path[:weight]"
    noise: list[str] = field(default_factory=list)  # "seed:weight"
    init_image: Optional[str] = None
    # without init_image: "random" codes per latent cell, one "flat" random code everywhere, or
    # a plain mid-"gray" image encoded (the same start for every seed)
    init: str = "random"
    init_weight: float = 0.0  # pulls z toward its start (the init image's latents, or the random init)


@dataclass
class OptimConfig:
    name: str = "adam"
    lr: float = 0.1
    steps: int = 250


@dataclass
class CutoutsConfig:
    cutn: int = 32
    cut_pow: float = 1.0  # >1 favours small cutouts, <1 large ones
    augments: list[str] = field(
        default_factory=lambda: ["affine", "perspective", "jitter", "erasing", "noise"])
    overview: int = 0  # how many of the cutn are the whole image (then augmented like the rest)


@dataclass
class OutputConfig:
    path: Optional[str] = None  # final PNG (candidate k of K>1 goes to <stem>-<k>.png)
    video: Optional[str] = None  # .mp4 or .gif
    save_every: int = 10  # steps between video frames
    overwrite: bool = False
    save_state: bool = True  # <path stem>.state.safetensors, to go on from (--resume)
    best_only: bool = False  # K > 1: save only the best candidate (GenerationResult.best), as path


@dataclass
class AnimationConfig:
    """``vqclip animate``: frame 0 is a generation, each next frame the previous one transformed
    and optimized again. Transform values are schedules (:mod:`vqclip.schedules`)."""

    frames: int = 30
    steps_per_frame: int = 20
    first_steps: Optional[int] = None  # frame 0's steps; None: optim.steps
    zoom: str = "1.0"  # > 1 moves closer: 1.05 is 5% closer per frame, about the centre
    angle: str = "0"  # degrees per frame, counter-clockwise
    translate_x: str = "0"  # pixels per frame; the picture moves right
    translate_y: str = "0"  # pixels per frame; the picture moves down
    border: str = "reflect"  # what fills the uncovered edges: "reflect" or "edge" (repeat)
    prompt_at: list[str] = field(default_factory=list)  # "FRAME:TEXT" switch points
    fps: int = 12
    output: Optional[str] = None  # the folder for frames, frames.jsonl and (by default) the video


@dataclass
class GenerateConfig:
    seed: Optional[int] = None  # None: a random seed, recorded in the outputs
    size: list[int] = field(default_factory=lambda: [256, 256])  # width, height
    candidates: int = 1  # independent latents optimized in one batch; candidate k uses seed + k
    device: str = "auto"
    # bf16/fp16: decoder and CLIP under torch.autocast (z, the code choice and losses stay fp32);
    # auto: bf16 on CPUs with native bf16 (AVX512-BF16 or AMX), else fp32; outputs record which ran
    precision: str = "auto"
    # recompute the decoder's blocks in the backward instead of storing their activations:
    # less memory for large sizes, one more decoder forward per step
    checkpoint: bool = False
    # torch.compile the decoder and CLIP's image tower (compiled once per Generator, on the
    # first step: minutes on a small CPU); fuses their elementwise work
    compile: bool = False
    tv_weight: float = 0.0  # total-variation prior: favours flat regions
    # every N steps, median-filter the image and encode it back into the latents (0: never):
    # a prior for flat regions and smooth outlines that removes specks and ragged edges
    denoise_every: int = 0
    denoise_size: int = 5  # the median filter's side in pixels (odd)
    preset: Optional[str] = None  # informational: the preset these settings started from
    models: ModelsConfig = field(default_factory=ModelsConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    cutouts: CutoutsConfig = field(default_factory=CutoutsConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    animation: AnimationConfig = field(default_factory=AnimationConfig)


# Keyword arguments of the Python API and flags of the CLI, and the keys they set.
FLAT_KEYS = {
    "prompt": "prompts.text", "image_prompts": "prompts.images", "noise_prompts": "prompts.noise",
    "init_image": "prompts.init_image", "init_weight": "prompts.init_weight",
    "init": "prompts.init",
    "steps": "optim.steps", "lr": "optim.lr", "optimizer": "optim.name",
    "cutn": "cutouts.cutn", "cut_pow": "cutouts.cut_pow", "augments": "cutouts.augments",
    "overview": "cutouts.overview",
    "vqgan": "models.vqgan", "vqgan_config": "models.vqgan_config", "clip": "models.clip",
    "clip_pretrained": "models.clip_pretrained", "clip_config": "models.clip_config",
    "rank_clip": "models.rank_clip", "clip_ensemble": "models.ensemble",
    "clip_weight": "models.clip_weight",
    "output": "output.path", "video": "output.video", "save_every": "output.save_every",
    "overwrite": "output.overwrite", "save_state": "output.save_state", "best_only": "output.best_only",
    **{k: f"animation.{k}" for k in ("frames", "steps_per_frame", "first_steps", "zoom", "angle",
                                      "translate_x", "translate_y", "border", "prompt_at", "fps")},
    **{k: k for k in ("seed", "size", "candidates", "device", "precision", "checkpoint", "compile", "tv_weight",
                      "denoise_every", "denoise_size")},
}


def list_presets() -> list[str]:
    """Names of the presets in ``configs/``."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_config(config: GenerateConfig | DictConfig | dict | None = None, *,
                preset: str | None = None, files: tuple[str | Path, ...] = (),
                overrides: tuple[str, ...] | list[str] = (), **kwargs: Any) -> DictConfig:
    """Build a checked generation config.

    Args:
        config: a base config (dataclass, DictConfig or nested dict) applied over the preset.
        preset: a name from :func:`list_presets`; ``"imagenet"`` when neither it nor ``config``
            is given.
        files: YAML files with overrides.
        overrides: ``"key=value"`` strings, e.g. ``"optim.lr=0.2"``.
        **kwargs: flat settings (``prompt``, ``steps``, ``lr``, ``cutn``, ``seed``...; see
            ``FLAT_KEYS``).
    Returns:
        A DictConfig typed by :class:`GenerateConfig`.
    Raises:
        ValueError: unknown key, preset or name; wrong type; out-of-range value.
        FileNotFoundError: a missing YAML file.
    """
    unknown = sorted(set(kwargs) - set(FLAT_KEYS))
    if unknown:
        raise ValueError(f"unknown setting {unknown[0]!r}; known: {', '.join(sorted(FLAT_KEYS))}")
    if preset is None and config is None:
        preset = DEFAULT_PRESET
    layers: list[tuple[str, Any]] = []
    if preset is not None:
        layers.append((f"preset {preset!r}", _read_yaml(_preset_path(preset))))
        layers.append(("preset", {"preset": preset}))
    if config is not None:
        layers.append(("config", config))
    for path in files:
        layers.append((str(path), _read_yaml(Path(path))))
    if kwargs.get("clip_ensemble") is not None:  # ["none"]: the main CLIP alone
        kwargs["clip_ensemble"] = [parse_member(m) if isinstance(m, str) else m
                                   for m in kwargs["clip_ensemble"] if m != "none"]
    given = {FLAT_KEYS[k]: _plain(v) for k, v in kwargs.items() if v is not None}
    layers.append(("arguments", _nest(given)))
    dotlist, strings = [], {}
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"override {item!r} is not key=value")
        key = FLAT_KEYS.get(key.strip(), key.strip())  # steps=50 works too
        if key in _string_keys():  # taken as typed: YAML would read 16:9 as 969
            strings[key] = value
        else:
            dotlist.append(f"{key}={value}")
    layers.append(("overrides", dotlist))
    if strings:
        layers.append(("overrides", _nest(strings)))

    cfg = OmegaConf.structured(GenerateConfig)
    for source, layer in layers:
        try:
            if isinstance(layer, list):
                layer = OmegaConf.from_dotlist(layer)
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            raise ValueError(f"{source}: {_one_line(e)}") from None
        except TypeError:  # OmegaConf's word for a mapping where a list belongs, or the reverse
            raise ValueError(f"{source}: a setting is a mapping where a list belongs, or a list "
                             "where a mapping belongs (e.g. models.ensemble is a list)") from None
    check_config(cfg)
    return cfg


def check_config(cfg: DictConfig) -> None:
    """Raise ValueError naming the first setting that is out of range."""
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(msg)

    need(len(cfg.size) == 2, f"size must be [width, height], got {list(cfg.size)}")
    for side in cfg.size:
        need(0 < side <= MAX_SIDE, f"size {list(cfg.size)}: each side must be in 1..{MAX_SIDE} pixels")
    need(1 <= cfg.candidates <= MAX_CANDIDATES, f"candidates must be in 1..{MAX_CANDIDATES}, "
                                                f"got {cfg.candidates}")
    need(cfg.seed is None or 0 <= cfg.seed < 2**63, f"seed must be in 0..2**63-1, got {cfg.seed}")
    need(cfg.precision in PRECISIONS, f"unknown precision {cfg.precision!r}; available: "
                                      f"{', '.join(PRECISIONS)}")
    need(cfg.prompts.init in INITS, f"unknown init {cfg.prompts.init!r}; available: {', '.join(INITS)}")
    need(cfg.optim.name in OPTIMIZERS, f"unknown optimizer {cfg.optim.name!r}; "
                                       f"available: {', '.join(OPTIMIZERS)}")
    for key in ("optim.lr", "cutouts.cut_pow", "prompts.init_weight", "tv_weight"):
        value = OmegaConf.select(cfg, key)
        need(math.isfinite(value), f"{key} must be a finite number, got {value}")
    need(0 < cfg.optim.lr <= MAX_LR, f"lr must be in (0, {MAX_LR}], got {cfg.optim.lr}")
    need(cfg.optim.steps >= 0, f"steps must be >= 0, got {cfg.optim.steps}")
    need(cfg.cutouts.cutn >= 1, f"cutn must be >= 1, got {cfg.cutouts.cutn}")
    need(cfg.cutouts.cut_pow > 0, f"cut_pow must be > 0, got {cfg.cutouts.cut_pow}")
    need(0 <= cfg.cutouts.overview <= cfg.cutouts.cutn,
         f"cutouts.overview must be in 0..cutn ({cfg.cutouts.cutn}), got {cfg.cutouts.overview}")
    for name in cfg.cutouts.augments:
        need(name in AUGMENTS, f"unknown augmentation {name!r}; available: {', '.join(AUGMENTS)}")
    need(cfg.prompts.init_weight >= 0, f"init_weight must be >= 0, got {cfg.prompts.init_weight}")
    need(cfg.tv_weight >= 0, f"tv_weight must be >= 0, got {cfg.tv_weight}")
    need(cfg.denoise_every >= 0, f"denoise_every must be >= 0, got {cfg.denoise_every}")
    need(cfg.denoise_size >= 3 and cfg.denoise_size % 2,
         f"denoise_size must be an odd number >= 3, got {cfg.denoise_size}")
    rank = cfg.models.rank_clip
    need(rank is None or (rank.count("/") >= 1 and all(rank.split("/", 1))),
         f"rank_clip {rank!r} must be ARCH/TAG (e.g. ViT-B-16/laion2b_s34b_b88k) or "
         "ARCH/path/to/weights")
    for m in cfg.models.ensemble:
        need(not OmegaConf.is_missing(m, "arch") and m.arch and (m.pretrained or "/" in m.arch),
             "each models.ensemble member needs an arch and its weights: ARCH/TAG from the "
             "registry, or arch plus pretrained (a tag or a weights file)")
        need(m.weight > 0 and math.isfinite(m.weight),
             f"ensemble member {m.arch}: weight must be > 0, got {m.weight}")
    need(cfg.models.clip_weight > 0 and math.isfinite(cfg.models.clip_weight),
         f"clip_weight must be > 0, got {cfg.models.clip_weight}")
    need(cfg.output.save_every >= 1, f"save_every must be >= 1, got {cfg.output.save_every}")
    video = cfg.output.video
    need(video is None or Path(video).suffix.lower() in (".mp4", ".gif"),
         f"video {video!r}: the file name must end in .mp4 or .gif")
    need(cfg.output.path is None or Path(cfg.output.path).suffix.lower() == ".png",
         f"output {cfg.output.path!r}: the file name must end in .png")
    check_animation(cfg.animation)
    # prompt syntax and input files: fail here, before minutes of model loading
    from .prompts import parse_image_prompt, parse_noise_prompt, parse_text_prompts

    parse_text_prompts(cfg.prompts.text)
    for spec in cfg.prompts.noise:
        parse_noise_prompt(spec)
    paths = [parse_image_prompt(spec).value for spec in cfg.prompts.images]
    from .images import load_image

    for path in [*paths, *([cfg.prompts.init_image] if cfg.prompts.init_image else [])]:
        load_image(path)  # FileNotFoundError, or ValueError if Pillow cannot read it


def require_target(cfg: DictConfig) -> None:
    """Raise ValueError unless the config has something to aim for (a prompt of some kind)."""
    if not (cfg.prompts.text.strip() or cfg.prompts.images or cfg.prompts.noise):
        raise ValueError("nothing to aim for: give a text prompt, an image prompt or a noise prompt")


def _string_keys(schema: type = GenerateConfig, prefix: str = "") -> set[str]:
    """Dotted keys of the schema's ``str``/``Optional[str]`` fields."""
    keys = set()
    for f in dataclasses.fields(schema):
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        if kind in ("str", "Optional[str]"):
            keys.add(prefix + f.name)
        elif dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING
                                      else None):
            keys |= _string_keys(f.default_factory, f"{prefix}{f.name}.")
    return keys


def _preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(list_presets()) or 'none'}"
                         " (a YAML file of your own goes in --config)")
    return path


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # yaml's parser errors have no common public base here
        raise ValueError(f"{path}: not valid YAML ({_one_line(e)})") from None
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"{path}: a config file must be a mapping of settings")
    return cfg


def parse_member(spec: str) -> dict[str, Any]:
    """``--clip-ensemble ARCH/TAG[:WEIGHT]`` (a registry name, or ``ARCH/path/to/weights``) as a
    :class:`EnsembleMember`'s fields.

    Raises:
        ValueError: no ``/``, or a weight that is not a positive number.
    """
    name, weight = spec, 1.0
    head, colon, tail = spec.rpartition(":")
    if colon and head and "/" not in tail:  # a weight, unless the colon is a path's ("c:/x")
        try:
            name, weight = head, float(tail)
        except ValueError:
            raise ValueError(f"--clip-ensemble {spec!r}: the weight {tail!r} is not a "
                             "number") from None
    arch, slash, pretrained = name.partition("/")
    if not (arch and slash and pretrained):
        raise ValueError(f"--clip-ensemble {spec!r}: give ARCH/TAG[:WEIGHT] (e.g. "
                         "ViT-B-16/openai:0.5) or ARCH/path/to/weights[:WEIGHT]")
    if not (weight > 0 and math.isfinite(weight)):
        raise ValueError(f"--clip-ensemble {spec!r}: the weight must be a number > 0")
    return {"arch": arch, "pretrained": pretrained, "weight": weight}


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    torch = sys.modules.get("torch")  # a torch.device exists only once torch is imported
    if isinstance(value, Path) or (torch and isinstance(value, torch.device)):
        return str(value)
    return value


def _nest(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _one_line(e: Exception) -> str:
    msg = getattr(e, "msg", None) or str(e)
    line = msg.strip().splitlines()[0] if msg.strip() else type(e).__name__
    key = getattr(e, "full_key", None)
    return f"{line} (at {key})" if key else line
