"""The shapes world: a procedural renderer of flat shapes with exact captions.

It trains and tests vqclip's bundled offline models, and nothing else uses it: generation never
calls the renderer or reads words out of a prompt.

A scene is a background colour and one or two objects, each with a colour, a shape, a size and a
position. :func:`sample_scene` draws one from a seed, :func:`render` draws it (antialiased by
supersampling) and :func:`caption` describes it with one of several templates. Splits are
separate random streams, so validation and test scenes never come from training seeds.

Example:
    >>> scene = sample_scene(seed=3, split="val")
    >>> image = render(scene)            # PIL RGB, 64×64
    >>> caption(scene, template=0)       # e.g. "a red circle"  # doctest: +SKIP
"""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass

import torch
from PIL import Image, ImageDraw

from ..images import to_tensor

__all__ = ["BACKGROUNDS", "CLUTTER", "COLOURS", "LABELS", "LABEL_TEXTS", "POSITIONS", "SHAPES", "SIZES", "Scene",
           "ShapeObject", "batch", "caption", "captions", "clutter", "clutter_batch", "label_renders",
           "place_alone", "render", "sample_scene"]

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 225),
    "yellow": (245, 225, 30), "orange": (245, 135, 20), "purple": (140, 50, 180),
    "white": (245, 245, 245), "black": (15, 15, 15),
}
BACKGROUNDS = {**COLOURS, "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
LABELS = [(c, s) for c in COLOURS for s in SHAPES]  # the 24 single-object classes
LABEL_TEXTS = [f"a {c} {s}" for c, s in LABELS]  # their prompts, in the same order
SIZES = {"small": 0.28, "large": 0.55}  # the shape's extent, as a fraction of the image side
POSITIONS = {  # centre of the object, as fractions of width and height
    "centre": (0.5, 0.5), "left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27),
    "bottom": (0.5, 0.73), "top left": (0.27, 0.27), "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73), "bottom right": (0.73, 0.73),
}
_PHRASE = {"centre": "in the centre", "left": "on the left", "right": "on the right",
           "top": "at the top", "bottom": "at the bottom", "top left": "in the top left",
           "top right": "in the top right", "bottom left": "in the bottom left",
           "bottom right": "in the bottom right"}
# two objects sit apart: opposite sides or corners
_PAIRS = [("left", "right"), ("top", "bottom"), ("top left", "bottom right"),
          ("top right", "bottom left"), ("top left", "top right"), ("bottom left", "bottom right")]
_SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class ShapeObject:
    colour: str
    shape: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[ShapeObject, ...]
    jitter: tuple[float, ...] = ()  # small offsets and scale changes, so that no two look alike


def _rng(seed: int, split: str) -> random.Random:
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; available: {', '.join(_SPLITS)}")
    return random.Random(zlib.crc32(f"{split}:{seed}".encode()))


def sample_scene(seed: int, split: str = "train", num_objects: int | None = None) -> Scene:
    """The scene for ``seed`` in ``split``: deterministic, and independent across splits."""
    rng = _rng(seed, split)
    n = num_objects or rng.choice((1, 1, 2))
    if n == 1:
        placed = [place_alone(rng)]
    else:  # two small objects on opposite sides or corners
        placed = [(pos, "small") for pos in rng.choice(_PAIRS)]
        rng.shuffle(placed)
    objects = [ShapeObject(rng.choice(list(COLOURS)), rng.choice(SHAPES), size, pos)
               for pos, size in placed]
    used = {o.colour for o in objects}
    background = rng.choice([c for c in BACKGROUNDS if c not in used])
    jitter = tuple(rng.uniform(-1, 1) for _ in range(3 * n))
    return Scene(background, tuple(objects), jitter)


def place_alone(rng: random.Random) -> tuple[str, str]:
    """The position and size of an object alone in its scene: a third in the centre, the only
    place where a large object fits."""
    position = "centre" if rng.random() < 0.35 else rng.choice(list(POSITIONS)[1:])
    return position, rng.choice(list(SIZES)) if position == "centre" else "small"


def render(scene: Scene, size: int = 64, supersample: int = 4) -> Image.Image:
    """Draw a scene as a ``size``×``size`` RGB image."""
    big = size * supersample
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for i, obj in enumerate(scene.objects):
        jx, jy, js = (scene.jitter[3 * i:3 * i + 3] or (0, 0, 0))
        cx, cy = POSITIONS[obj.position]
        cx, cy = (cx + 0.03 * jx) * big, (cy + 0.03 * jy) * big
        extent = SIZES[obj.size] * (1 + 0.08 * js) * big
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            r = extent / 2
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif obj.shape == "square":
            h = extent * 0.86 / 2  # about a circle's area
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        else:  # an upright equilateral triangle, centred on its bounding box
            s = extent * 1.1
            h = s * 3 ** 0.5 / 2
            draw.polygon([(cx, cy - h / 2), (cx - s / 2, cy + h / 2), (cx + s / 2, cy + h / 2)],
                         fill=fill)
    return image.reduce(supersample)


def _describe(obj: ShapeObject, with_size: bool, with_position: bool) -> str:
    words = [obj.size] if with_size else []
    text = " ".join(["a", *words, obj.colour, obj.shape])
    return f"{text} {_PHRASE[obj.position]}" if with_position else text


def captions(scene: Scene) -> list[str]:
    """Every caption template's text for ``scene``, from the plainest to the fullest."""
    on_bg = f" on a {scene.background} background"
    if len(scene.objects) == 1:
        (obj,) = scene.objects
        return [_describe(obj, False, False), _describe(obj, True, False),
                _describe(obj, False, False) + on_bg, _describe(obj, True, True),
                _describe(obj, True, True) + on_bg, _describe(obj, False, True)]
    a, b = scene.objects
    return [f"{_describe(a, False, False)} and {_describe(b, False, False)}",
            f"{_describe(a, False, True)} and {_describe(b, False, True)}",
            f"{_describe(a, False, False)} and {_describe(b, False, False)}{on_bg}",
            f"{_describe(a, True, True)} and {_describe(b, True, True)}{on_bg}"]


def caption(scene: Scene, template: int | None = None, rng: random.Random | None = None) -> str:
    """One caption: template number ``template``, or a random one from ``rng``."""
    texts = captions(scene)
    if template is None:
        template = (rng or random).randrange(len(texts))
    return texts[template % len(texts)]


def batch(start: int, n: int, split: str = "train", size: int = 64,
          num_objects: int | None = None) -> tuple[torch.Tensor, list[Scene]]:
    """Scenes ``start .. start+n-1`` of a split, rendered: ``(n, 3, size, size)`` in [0, 1]."""
    scenes = [sample_scene(start + i, split, num_objects) for i in range(n)]
    return torch.cat([to_tensor(render(s, size)) for s in scenes]), scenes


def label_renders(per_label: int, seed: int) -> torch.Tensor:
    """``(24 * per_label, 3, 64, 64)``: each of the ``LABELS`` as an object alone, at random
    sizes, places and backgrounds (label-major), deterministic for ``seed``."""
    rng, images = random.Random(seed), []
    for colour, shape in LABELS:
        for _ in range(per_label):
            position, size = place_alone(rng)
            background = rng.choice([b for b in BACKGROUNDS if b != colour])
            images.append(to_tensor(render(Scene(background, (ShapeObject(colour, shape, size,
                                                                           position),)))))
    return torch.cat(images)


# ------------------------------------------------------------------------------------- clutter
# Images that match no caption. The generation loop steers the tiny CLIP, and what it finds first
# are its blind spots: a ragged patch of the right colour, a mottled texture, scattered pieces,
# an almost-shape. Trained on these as negatives, CLIP learns that "a red circle" is a red circle.
CLUTTER = ("blob", "mottle", "pieces", "almost")


def clutter(seed: int, size: int = 64, supersample: int = 4, kind: str | None = None) -> Image.Image:
    """A random image of one of the ``CLUTTER`` kinds, deterministic for ``seed``."""
    rng = random.Random(zlib.crc32(f"clutter:{seed}".encode()))
    kind = kind or rng.choice(CLUTTER)
    names = list(COLOURS)
    colour = COLOURS[rng.choice(names)]
    background = BACKGROUNDS[rng.choice([c for c in BACKGROUNDS if COLOURS.get(c) != colour])]
    if kind == "mottle":  # a coarse random field of a few colours, blocky or smooth
        palette = [colour, background] + [COLOURS[rng.choice(names)] for _ in range(rng.randrange(2))]
        cells = rng.choice((2, 4, 8, 16))
        grid = Image.new("RGB", (cells, cells))
        grid.putdata([rng.choice(palette) for _ in range(cells * cells)])
        return grid.resize((size, size), rng.choice((Image.NEAREST, Image.BILINEAR)))
    big = size * supersample
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    cx, cy = rng.uniform(0.25, 0.75) * big, rng.uniform(0.25, 0.75) * big
    if kind == "almost":  # one solid shape that is none of the three: an oval, a bar, a polygon
        w, h = rng.uniform(0.15, 0.5) * big, rng.uniform(0.15, 0.5) * big
        if abs(w - h) < 0.15 * big:
            h = w * rng.choice((0.5, 1.8))
        form = rng.choice(("ellipse", "rectangle", "polygon"))
        if form == "polygon":
            n = rng.randrange(4, 9)
            angles = sorted(rng.uniform(0, 6.283) for _ in range(n))
            draw.polygon([(cx + w / 2 * math.cos(a) * rng.uniform(0.6, 1),
                           cy + h / 2 * math.sin(a) * rng.uniform(0.6, 1)) for a in angles],
                         fill=colour)
        else:
            getattr(draw, form)((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), fill=colour)
        return image.reduce(supersample)
    spread = 0.12 if kind == "blob" else 0.35  # a ragged clump, or pieces all over
    for _ in range(rng.randrange(3, 8)):
        x = min(max(cx + rng.gauss(0, spread) * big, 0), big)
        y = min(max(cy + rng.gauss(0, spread) * big, 0), big)
        r = rng.uniform(0.04, 0.16 if kind == "blob" else 0.09) * big
        if rng.random() < 0.5:
            draw.ellipse((x - r, y - r * rng.uniform(0.5, 1.5), x + r, y + r), fill=colour)
        else:
            draw.polygon([(x + rng.uniform(-r, r), y + rng.uniform(-r, r)) for _ in range(3)],
                         fill=colour)
    return image.reduce(supersample)


def clutter_batch(start: int, n: int, size: int = 64) -> torch.Tensor:
    """Clutter images ``start .. start+n-1``: ``(n, 3, size, size)`` in [0, 1]."""
    return torch.cat([to_tensor(clutter(start + i, size)) for i in range(n)])
