"""Random cutouts of the image, resized to CLIP's input and augmented with Kornia.

Kornia draws its random parameters from torch's global CPU generator (it takes no generator
argument), and so does :class:`MakeCutouts`. :class:`SeedStreams` gives each candidate a stream
of its own by swapping its state in around the draws, so that candidate k of a batch sees exactly
the random numbers a single run with seed ``seed + k`` would.

Shape:
    ``MakeCutouts``: ``(B, C, H, W) -> (B * cutn, C, S, S)``, image-major, with S = CLIP's input.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import nn

from .config import AUGMENTS

__all__ = ["MakeCutouts", "SeedStreams", "build_augments"]


def build_augments(names: Sequence[str]) -> nn.Sequential:
    """The named Kornia augmentations, in the order given.

    Strengths follow nerdyrodent/VQGAN-CLIP's defaults, which its users tuned for this loop.
    """
    make = {
        "affine": lambda: K.RandomAffine(degrees=15, translate=0.1, shear=5, p=0.7,
                                         padding_mode="zeros"),
        "perspective": lambda: K.RandomPerspective(distortion_scale=0.7, p=0.7),
        "jitter": lambda: K.ColorJitter(hue=0.1, saturation=0.1, p=0.7),
        "erasing": lambda: K.RandomErasing(scale=(0.1, 0.4), ratio=(0.3, 1 / 0.3), p=0.7),
        "noise": lambda: K.RandomGaussianNoise(std=0.1, p=0.5),
        "flip": lambda: K.RandomHorizontalFlip(p=0.5),
        "sharpness": lambda: K.RandomSharpness(sharpness=0.3, p=0.4),
    }
    assert set(make) == set(AUGMENTS)
    unknown = [n for n in names if n not in make]
    if unknown:
        raise ValueError(f"unknown augmentation {unknown[0]!r}; available: {', '.join(AUGMENTS)}")
    return nn.Sequential(*(make[n]() for n in names))


class MakeCutouts(nn.Module):
    """``cutn`` random square crops per image, resized to ``cut_size``, then augmented.

    A crop's side is ``min_side + (max_side - min_side) * u ** cut_pow`` with u uniform in [0, 1),
    ``max_side`` the image's shorter side and ``min_side`` the smaller of that and ``cut_size``:
    ``cut_pow`` > 1 favours small crops (detail), < 1 large ones (composition). The first
    ``overview`` of the ``cutn`` cutouts of each image are the whole image.

    Shape: ``(B, C, H, W) -> (B * cutn, C, cut_size, cut_size)``.
    """

    def __init__(self, cut_size: int, cutn: int, cut_pow: float = 1.0,
                 augments: Sequence[str] = (), overview: int = 0):
        super().__init__()
        if not 0 <= overview <= cutn:
            raise ValueError(f"overview cutouts must be in 0..cutn ({cutn}), got {overview}")
        self.cut_size, self.cutn, self.cut_pow, self.overview = cut_size, cutn, cut_pow, overview
        self.augs = build_augments(augments)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _, _, h, w = images.shape
        max_side = min(h, w)
        min_side = min(h, w, self.cut_size)
        cuts = []
        for image in images.split(1):
            # overview cutouts: the whole image (squashed to a square), as pixray does, so that
            # CLIP also judges the composition and not only its parts
            cuts += [self._resize_to_square(image)] * self.overview
            for _ in range(self.cutn - self.overview):
                side = int(torch.rand([]) ** self.cut_pow * (max_side - min_side) + min_side)
                y = int(torch.randint(0, h - side + 1, ()))
                x = int(torch.randint(0, w - side + 1, ()))
                cuts.append(self._resize(image[:, :, y:y + side, x:x + side]))
        return self.augs(torch.cat(cuts))  # (B * cutn, C, S, S)

    def _resize_to_square(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[-2:] == (self.cut_size, self.cut_size):
            return image
        return F.interpolate(image, size=(self.cut_size, self.cut_size), mode="bilinear",
                             align_corners=False, antialias=max(image.shape[-2:]) > self.cut_size)

    def _resize(self, cut: torch.Tensor) -> torch.Tensor:
        if cut.shape[-1] == self.cut_size:
            return cut
        # antialiasing when shrinking: a plain bilinear resize aliases fine detail into CLIP
        return F.interpolate(cut, size=(self.cut_size, self.cut_size), mode="bilinear",
                             align_corners=False, antialias=cut.shape[-1] > self.cut_size)


class SeedStreams:
    """One random stream per candidate, swapped into torch's global CPU generator on demand.

    Example:
        >>> streams = SeedStreams([7, 8])
        >>> with streams.use(1):
        ...     x = torch.rand(2)  # the numbers torch.manual_seed(8) would give first
    """

    def __init__(self, seeds: Sequence[int]):
        self.seeds = list(seeds)
        g = torch.Generator()
        self.states = [g.manual_seed(s).get_state() for s in self.seeds]

    @contextlib.contextmanager
    def use(self, k: int) -> Iterator[None]:
        """Draw from candidate k's stream inside the block; the global state is restored after."""
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.states[k])
            yield
            self.states[k] = torch.get_rng_state()
