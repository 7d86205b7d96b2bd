"""Losses of the generation loop: pure functions, one value per candidate.

Shape:
    image embeddings ``(K, n, D)`` for K candidates and n cutouts; targets ``(T, D)``;
    every loss returns ``(K,)``, so that summing over candidates leaves each one's gradient
    exactly what a run of its own would get.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["spherical_distance", "prompt_loss", "tv_loss", "init_loss"]


def spherical_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared great-circle distance between directions (times 2), as in crowsonkb's notebooks.

    Broadcasts like ``x - y`` over all but the last dimension; 0 for equal directions, about 4.93
    (π²/2) for opposite ones.
    """
    x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    return (x - y).norm(dim=-1).div(2).arcsin().pow(2).mul(2)


def prompt_loss(image_embeds: torch.Tensor, target: torch.Tensor, weight: float = 1.0,
                stop: float = -math.inf) -> torch.Tensor:
    """Weighted mean spherical distance from every cutout to every target embedding.

    ``stop`` is compared with the signed distance ``sign(weight) * d``, as in crowsonkb's and
    nerdyrodent's code: where that is below ``stop`` the distance still counts in the value but
    gives no gradient. So ``stop=0.5`` ends a pull at distance 0.5, and ``stop=-0.9`` on a
    negative weight ends a push at distance 0.9.
    """
    d = spherical_distance(image_embeds[:, :, None], target[None, None])  # (K, n, T)
    if math.isfinite(stop):
        done = math.copysign(1.0, weight) * d < stop
        d = torch.where(done, d.detach(), d)
    return weight * d.mean(dim=(1, 2))


def tv_loss(images: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of neighbouring pixels, ``(K, C, H, W) -> (K,)``: favours flat areas."""
    dx = images[..., :, 1:] - images[..., :, :-1]
    dy = images[..., 1:, :] - images[..., :-1, :]
    return dx.pow(2).mean(dim=(1, 2, 3)) + dy.pow(2).mean(dim=(1, 2, 3))


def init_loss(z: torch.Tensor, z_init: torch.Tensor) -> torch.Tensor:
    """Half the mean squared distance of latents to where they started, ``(K, D, h, w) -> (K,)``."""
    return (z - z_init).pow(2).mean(dim=(1, 2, 3)) / 2
