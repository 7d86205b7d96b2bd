"""A judge of shapes-world images that reads pixels only: no CLIP, no scene description.

It takes the background to be the median colour of the image's border, segments what differs
from it, and reads the largest object's colour (the nearest palette colour to its median pixel)
and its shape from the geometry of its convex hull, whatever the rotation:

- circularity, 4π·area/perimeter²: 0.96+ for a circle, 0.79 for a square, 0.60–0.74 for a
  triangle;
- rectangularity, the hull's area over its smallest enclosing rectangle: 1 for a square, 0.79
  for a circle, 0.5 for a triangle;
- triangularity, the largest triangle on the hull's vertices over the hull's area: 1 for a
  triangle, 0.72 for a regular pentagon, 0.5 for a square, 0.41 for a circle.

A circle is round (circularity ≥ 0.93) and no rectangle; a square fills its rectangle (≥ 0.9)
and is no circle; a triangle fills two thirds of its hull with one inner triangle, and is less
round (circularity < 0.83) than a pentagon (0.865). Corners rounded as a VQGAN's decoder rounds
them are tolerated (a 20-pixel triangle from the shapes VQGAN: triangularity 0.68–0.74,
circularity 0.75–0.80); at 64 px a regular hexagon passes for a circle. A ragged blob (low
solidity: much less area than its hull), an elongated region (an oval, a bar: the three
shapes have equal principal moments), a region that touches the border or covers half the
image (texture, not an object), or anything between the classes has no shape; a patchy region
has no colour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .world import COLOURS

__all__ = ["Verdict", "judge"]

_PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.float32) / 255  # (8, 3)


@dataclass(frozen=True)
class Verdict:
    colour: str | None
    shape: str | None
    num_objects: int
    circularity: float = 0.0
    solidity: float = 0.0
    area: float = 0.0  # of the largest object, as a fraction of the image
    roundness: float = 0.0  # minor/major axis from the second moments: 1 for all three shapes
    rectangularity: float = 0.0  # hull area / its smallest enclosing rectangle: 1 for a square
    triangularity: float = 0.0  # the largest triangle on the hull / the hull: 1 for a triangle

    def matches(self, colour: str, shape: str) -> bool:
        return self.colour == colour and self.shape == shape


def _components(mask: torch.Tensor) -> torch.Tensor:
    """4-connected labels of a boolean ``(H, W)`` mask, 0 for background."""
    from kornia.contrib import connected_components

    h, w = mask.shape
    labels = connected_components(mask[None, None].float(), num_iterations=2 * (h + w))[0, 0]
    return labels.long()


def _hull(points: torch.Tensor) -> torch.Tensor:
    """Convex hull of ``(N, 2)`` points, counter-clockwise (Andrew's monotone chain)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return torch.tensor(pts, dtype=torch.float32)

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return torch.tensor(lower[:-1] + upper[:-1], dtype=torch.float32)


def judge(image: torch.Tensor, threshold: float = 0.25) -> Verdict:
    """Read the colour and shape of the largest object in ``image`` ``(3, H, W)`` in [0, 1]."""
    image = image.detach().float().cpu()
    _, h, w = image.shape
    border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)
    background = border.median(dim=1).values  # (3,)
    mask = (image - background[:, None, None]).norm(dim=0) > threshold  # (H, W)
    labels = _components(mask)
    ids, counts = labels[labels > 0].unique(return_counts=True)
    if len(ids) == 0:
        return Verdict(None, None, 0)
    min_area = 0.01 * h * w
    big = counts >= max(min_area, 0.25 * counts.max().item())
    num_objects = int(big.sum())
    best = ids[counts.argmax()]
    area = counts.max().item()
    if area < min_area:
        return Verdict(None, None, 0)
    region = labels == best
    # colour from the interior: antialiased edge pixels are blends with the background
    interior = -F.max_pool2d(-region[None].float(), 3, stride=1, padding=1)[0] > 0
    pixels = image[:, interior if interior.sum() >= 4 else region]  # (3, N)
    median = pixels.median(dim=1).values
    dists = (_PALETTE - median).norm(dim=1)
    uniform = ((pixels - median[:, None]).norm(dim=0) < threshold).float().mean().item()
    colour = list(COLOURS)[int(dists.argmin())] if dists.min() < threshold and uniform > 0.8 else None

    ys, xs = torch.nonzero(region, as_tuple=True)
    # the pixels' corners, so that the hull covers whole pixels
    corners = torch.stack([xs, ys], 1)[:, None] + torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1]])
    hull = _hull(corners.reshape(-1, 2))
    x, y = hull[:, 0], hull[:, 1]
    hull_area = 0.5 * (x * y.roll(-1) - x.roll(-1) * y).sum().abs().item()
    perimeter = (hull - hull.roll(-1, dims=0)).norm(dim=1).sum().item()
    circularity = 4 * math.pi * hull_area / perimeter ** 2 if perimeter else 0.0
    solidity = area / hull_area if hull_area else 0.0
    touches_border = bool(region[0].any() or region[-1].any() or region[:, 0].any()
                          or region[:, -1].any())
    centred = torch.stack([xs, ys]).float()
    centred -= centred.mean(1, keepdim=True)
    minor, major = torch.linalg.eigvalsh(centred @ centred.T / len(xs)).clamp(min=0).sqrt().tolist()
    roundness = minor / major if major else 0.0
    rectangularity = hull_area / _min_rectangle(hull) if hull_area else 0.0
    triangularity = _max_triangle(hull) / hull_area if hull_area else 0.0
    shape = None
    # an object, not texture, and not an oval or a bar
    if solidity > 0.85 and roundness > 0.8 and not touches_border and area <= 0.5 * h * w:
        if circularity >= 0.93 and rectangularity < 0.9:
            shape = "circle"
        elif rectangularity >= 0.9 and circularity < 0.95:
            shape = "square"
        elif triangularity >= 0.66 and circularity < 0.83 and rectangularity < 0.8:
            shape = "triangle"
    return Verdict(colour, shape, num_objects, circularity, solidity, area / (h * w), roundness,
                   rectangularity, triangularity)


def _max_triangle(hull: torch.Tensor) -> float:
    """The area of the largest triangle with its corners on a convex polygon's vertices."""
    a, b, c = hull[torch.combinations(torch.arange(len(hull)), 3)].unbind(1)  # (T, 2) each
    u, v = b - a, c - a
    return 0.5 * (u[:, 0] * v[:, 1] - u[:, 1] * v[:, 0]).abs().max().item()


def _min_rectangle(hull: torch.Tensor) -> float:
    """The area of the smallest rectangle around a convex polygon (one side lies on an edge)."""
    edges = hull.roll(-1, dims=0) - hull
    u = F.normalize(edges, dim=1)  # (E, 2)
    v = torch.stack([-u[:, 1], u[:, 0]], 1)
    pu, pv = u @ hull.T, v @ hull.T  # (E, N)
    areas = (pu.amax(1) - pu.amin(1)) * (pv.amax(1) - pv.amin(1))
    return areas.min().item()
