"""Prompt syntax, and the CLIP embeddings the loop pulls toward.

Syntax:
    Text prompts: ``"text[:weight[:stop]]"``, several joined by ``|``. A negative weight repels.
    ``stop`` ends a prompt's pull once its spherical distance (0..4.93) falls below it. For a
    repelling prompt it is negative, as in the original notebooks: ``"text:-1:-0.9"`` stops
    pushing once the distance passes 0.9. Text may contain colons (URLs, "16:9"): only the trailing
    fields that are plain numbers count, at most two. Write ``\\:`` for a colon that must stay
    text even before a number ("a poster in 16\\:9"), and ``\\|`` for a literal bar.
    Image prompts: ``"path[:weight]"``. Noise prompts: ``"seed[:weight]"`` (a random embedding).

Shape:
    a prompt's target embeddings are ``(T, D)`` unit vectors; a text or noise prompt has T = 1.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .images import load_image, to_tensor

__all__ = ["Prompt", "Target", "parse_text_prompts", "parse_image_prompt", "parse_noise_prompt",
           "build_targets", "embed_texts", "init_latents", "noise_target"]

log = logging.getLogger(__name__)

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_COLON = re.compile(r"(?<!\\):")
_BAR = re.compile(r"(?<!\\)\|")
MAX_DISTANCE = math.pi ** 2 / 2  # the spherical distance between opposite directions


@dataclass(frozen=True)
class Prompt:
    """One parsed prompt: ``value`` is the text, the image path or the noise seed."""

    value: str
    weight: float = 1.0
    stop: float = -math.inf


@dataclass
class Target:
    """What one prompt pulls toward: unit embeddings ``(T, D)``, a weight and a stop distance."""

    embeds: torch.Tensor
    weight: float
    stop: float
    label: str


def _split(spec: str, max_numbers: int, what: str) -> tuple[str, list[float]]:
    """Split trailing numeric ``:``-fields off ``spec``; returns the head and the numbers."""
    fields = _COLON.split(spec)
    numbers: list[float] = []
    while len(fields) > 1 and len(numbers) < max_numbers and _NUMBER.fullmatch(fields[-1].strip()):
        numbers.insert(0, float(fields.pop().strip()))
    head = ":".join(fields).replace("\\:", ":").strip()
    if not all(math.isfinite(x) for x in numbers):
        raise ValueError(f"{what} {spec!r}: weights and stops must be finite numbers")
    if not head:
        raise ValueError(f"{what} {spec!r} has no {'text' if what == 'prompt' else what} before "
                         "its numbers")
    if numbers and numbers[0] == 0:
        raise ValueError(f"{what} {spec!r}: weight 0 has no effect; drop the {what} instead")
    if numbers and (head[-1].isdigit() or abs(numbers[0]) > 100):
        log.warning("%s %r: read %g as the weight; write '\\:' to keep that colon as text",
                    what, spec, numbers[0])
    return head, numbers


def parse_text_prompts(text: str) -> list[Prompt]:
    """Parse ``"a:1|b:-0.5:0.9"`` into prompts; an empty string gives none.

    Raises:
        ValueError: an empty prompt between bars, a missing text, a zero weight.

    Example:
        >>> [(p.value, p.weight) for p in parse_text_prompts("a sunset:2|text, watermark:-1")]
        [('a sunset', 2.0), ('text, watermark', -1.0)]
    """
    if not text.strip():
        return []
    prompts = []
    for part in _BAR.split(text):
        if not part.strip():
            raise ValueError(f"empty prompt in {text!r} (two bars in a row, or one at an end)")
        head, numbers = _split(part.strip(), 2, "prompt")
        if len(numbers) == 2:
            _check_stop(part.strip(), *numbers)
        prompts.append(Prompt(head.replace("\\|", "|"), *numbers))
    return prompts


def _check_stop(spec: str, weight: float, stop: float) -> None:
    # stop is compared with the signed distance, as in the original notebooks: a repelling
    # prompt's stop is negative ("text:-1:-0.9" stops pushing once the distance passes 0.9)
    if weight > 0 and not 0 <= stop <= MAX_DISTANCE:
        raise ValueError(f"prompt {spec!r}: stop must be a distance in 0..{MAX_DISTANCE:.2f}")
    if weight < 0 and not -MAX_DISTANCE <= stop <= 0:
        raise ValueError(f"prompt {spec!r}: a repelling prompt's stop is a negative distance in "
                         f"-{MAX_DISTANCE:.2f}..0 (-0.9 stops pushing once the distance passes 0.9)")


def parse_image_prompt(spec: str) -> Prompt:
    """Parse ``"path[:weight]"``; the path is not checked here."""
    head, numbers = _split(spec.strip(), 1, "image prompt")
    return Prompt(head, *numbers)


def parse_noise_prompt(spec: str) -> Prompt:
    """Parse ``"seed[:weight]"`` with a non-negative integer seed."""
    seed, colon, weight = spec.strip().partition(":")
    if not re.fullmatch(r"\d+", seed.strip()) or (colon and not _NUMBER.fullmatch(weight.strip())):
        raise ValueError(f"noise prompt {spec!r} must be SEED[:WEIGHT] with an integer seed >= 0")
    w = float(weight) if weight else 1.0
    if w == 0:
        raise ValueError(f"noise prompt {spec!r}: weight 0 has no effect; drop the prompt instead")
    return Prompt(seed.strip(), w)


@torch.no_grad()
def embed_texts(clip, prompts: list[Prompt]) -> list[Target]:
    """Embed text prompts with CLIP, all in one batch."""
    if not prompts:
        return []
    embeds = F.normalize(clip.encode_text([p.value for p in prompts]), dim=-1)  # (P, D)
    return [Target(e[None], p.weight, p.stop, p.value) for p, e in zip(prompts, embeds, strict=True)]


def noise_target(prompt: Prompt, dim: int, device: torch.device) -> Target:
    """A random unit embedding from the prompt's seed (a noise prompt)."""
    g = torch.Generator().manual_seed(int(prompt.value))
    embed = F.normalize(torch.randn(1, dim, generator=g), dim=-1).to(device)
    return Target(embed, prompt.weight, prompt.stop, f"noise {prompt.value}")


def build_targets(clip, cfg, cutouts) -> list[Target]:
    """Every prompt of a config (``prompts.text``, ``.images``, ``.noise``) as a target for
    ``clip``; an image prompt is embedded through ``cutouts`` (a :class:`vqclip.cutouts.MakeCutouts`)
    of itself, drawn from a fixed stream, so every seed gets the same targets."""
    from .cutouts import SeedStreams
    targets = embed_texts(clip, parse_text_prompts(cfg.prompts.text))
    for spec in cfg.prompts.images:
        prompt = parse_image_prompt(spec)
        image = to_tensor(load_image(prompt.value, tuple(cfg.size))).to(clip.device)
        with torch.no_grad():
            cuts = cutouts(image, SeedStreams([0], clip.device))
            embeds = F.normalize(clip.encode_image(cuts), dim=-1)  # (cutn, D)
        targets.append(Target(embeds, prompt.weight, prompt.stop, prompt.value))
    dim = clip.model.visual.output_dim
    targets += [noise_target(parse_noise_prompt(s), dim, clip.device)
                for s in cfg.prompts.noise]
    return targets


def init_latents(vqgan, cfg, streams, device) -> torch.Tensor:
    """The loop's start ``(K, D, h, w)``: the init image (or a gray one) encoded, the same for
    every candidate; else random codes, one per cell (``random``) or one for all (``flat``),
    each candidate's from its own stream ``streams.cpu[k]``."""
    (w, h), f, K = cfg.size, vqgan.downsample_factor, cfg.candidates
    image = None  # a start image to encode, the same for every candidate
    if cfg.prompts.init_image:
        image = to_tensor(load_image(cfg.prompts.init_image, (w, h)))
    elif cfg.prompts.init == "gray":
        image = torch.full((1, 3, h, w), 0.5)
    if image is not None:
        with torch.no_grad():
            z = vqgan.encode(image.to(device))  # (1, D, h/f, w/f)
        return z.expand(K, -1, -1, -1).clone()
    codes, n = [], vqgan.codebook.shape[0]
    for g in streams.cpu:
        if cfg.prompts.init == "flat":  # one code everywhere: a plain image
            codes.append(torch.randint(n, (1, 1), generator=g).expand(h // f, w // f))
        else:
            codes.append(torch.randint(n, (h // f, w // f), generator=g))
    return vqgan.codebook[torch.stack(codes).to(device)].permute(0, 3, 1, 2).clone()
