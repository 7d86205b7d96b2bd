"""Cutouts and losses: shapes, ranges, cut_pow, per-candidate random streams, gradients."""

import math

import pytest
import torch

from vqclip.config import AUGMENTS
from vqclip.cutouts import MakeCutouts, SeedStreams, build_augments
from vqclip.losses import init_loss, prompt_loss, spherical_distance, tv_loss


@pytest.mark.parametrize("size", [(64, 64), (48, 80), (20, 24)])
def test_cutout_shapes_and_range(size):
    torch.manual_seed(0)
    images = torch.rand(3, 3, *size)
    cuts = MakeCutouts(cut_size=32, cutn=5)(images)
    assert cuts.shape == (15, 3, 32, 32)
    assert cuts.min() >= 0 and cuts.max() <= 1  # no augmentations: resizing stays in range


def test_cutouts_are_image_major():
    images = torch.stack([torch.zeros(3, 40, 40), torch.ones(3, 40, 40)])
    cuts = MakeCutouts(cut_size=16, cutn=4)(images)
    assert cuts[:4].max() == 0 and cuts[4:].min() > 0.999  # antialiasing rounds 1 to 0.99999


def test_cut_pow_favours_small_cutouts():
    """With a big cut_pow, most crops are near the minimum size: much less of the image averaged."""
    torch.manual_seed(0)
    image = torch.rand(1, 1, 128, 128)

    def mean_side(cut_pow):
        sides = []
        cut = MakeCutouts(cut_size=16, cutn=200, cut_pow=cut_pow)
        cut._resize = lambda c: (sides.append(c.shape[-1]), torch.zeros(1, 1, 16, 16))[1]
        cut(image)
        return sum(sides) / len(sides)

    assert mean_side(4.0) < 50 < mean_side(1.0) < 80 < mean_side(0.25)


@pytest.mark.parametrize("name", AUGMENTS)
def test_each_augmentation_builds_and_keeps_shape(name):
    torch.manual_seed(0)
    x = torch.rand(6, 3, 32, 32)
    assert build_augments([name])(x).shape == x.shape


def test_unknown_augmentation_lists_valid_ones():
    with pytest.raises(ValueError, match="available: affine, perspective"):
        build_augments(["affine", "swirl"])


def test_gradients_reach_the_image_through_augmented_cutouts():
    image = torch.rand(1, 3, 48, 48, requires_grad=True)
    cuts = MakeCutouts(cut_size=32, cutn=8, augments=AUGMENTS)(image)
    cuts.square().sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0


def test_seed_streams_match_manual_seed_and_leave_the_global_state_alone():
    streams = SeedStreams([5, 6])
    before = torch.get_rng_state()
    with streams.use(1):
        a = torch.rand(4)
    with streams.use(0):
        b = torch.rand(4)
    with streams.use(1):
        a2 = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(6)
    assert torch.equal(a, torch.rand(4)) and torch.equal(a2, torch.rand(4))  # stream continues
    torch.manual_seed(5)
    assert torch.equal(b, torch.rand(4))


def test_augmented_cutouts_are_reproducible_per_stream():
    image = torch.rand(1, 3, 48, 48)
    cut = MakeCutouts(cut_size=32, cutn=4, augments=AUGMENTS)
    with SeedStreams([3]).use(0):
        first = cut(image)
    with SeedStreams([3]).use(0):
        again = cut(image)
    with SeedStreams([4]).use(0):
        other = cut(image)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_spherical_distance_values():
    x = torch.tensor([[1.0, 0.0]])
    assert spherical_distance(x, x).item() == pytest.approx(0, abs=1e-6)
    assert spherical_distance(x, torch.tensor([[0.0, 3.0]])).item() == pytest.approx(math.pi ** 2 / 8)
    assert spherical_distance(x, -x).item() == pytest.approx(math.pi ** 2 / 2)
    assert spherical_distance(5 * x, x).item() == pytest.approx(0, abs=1e-6)  # scale-free


def test_prompt_loss_weight_sign_and_stop():
    torch.manual_seed(0)
    embeds = torch.randn(2, 3, 8, requires_grad=True)  # (K, n, D)
    target = torch.randn(1, 8)
    pull = prompt_loss(embeds, target, weight=2.0)
    assert pull.shape == (2,) and (pull > 0).all()
    assert torch.allclose(prompt_loss(embeds, target, weight=-1.0), -pull / 2)
    # a stop above every distance: same value, no gradient
    stopped = prompt_loss(embeds, target, weight=1.0, stop=10.0)
    assert torch.allclose(stopped, pull / 2)
    assert torch.autograd.grad(stopped.sum(), embeds)[0].abs().sum() == 0
    # a stop between the distances: only the ones still above it pull
    d = spherical_distance(embeds, target)  # (K, n)
    mid = d.detach().median().item()
    grad = torch.autograd.grad(prompt_loss(embeds, target, stop=mid).sum(), embeds)[0]
    assert ((grad.abs().sum(-1) > 0) == (d >= mid)).all()
    # a repelling prompt's stop is negative: it pushes only while closer than -stop
    far = prompt_loss(embeds, target, weight=-1.0, stop=0.0)
    assert torch.autograd.grad(far.sum(), embeds)[0].abs().sum() == 0
    grad = torch.autograd.grad(prompt_loss(embeds, target, weight=-1.0, stop=-mid).sum(), embeds)[0]
    assert ((grad.abs().sum(-1) > 0) == (d <= mid)).all()


def test_candidate_losses_are_independent():
    embeds = torch.randn(3, 4, 8, requires_grad=True)
    prompt_loss(embeds, torch.randn(2, 8))[1].backward()
    assert embeds.grad[0].abs().sum() == 0 and embeds.grad[2].abs().sum() == 0
    assert embeds.grad[1].abs().sum() > 0


def test_tv_and_init_losses():
    flat, noisy = torch.ones(1, 3, 8, 8), torch.rand(1, 3, 8, 8)
    assert tv_loss(flat).item() == 0 and tv_loss(noisy).item() > 0
    z = torch.randn(2, 4, 3, 3)
    assert torch.equal(init_loss(z, z), torch.zeros(2))
    assert init_loss(z + 2, z).tolist() == pytest.approx([2.0, 2.0])


def test_overview_cutouts_are_the_whole_image():
    torch.manual_seed(0)
    image = torch.rand(1, 3, 48, 64)
    cuts = MakeCutouts(cut_size=32, cutn=5, overview=2)(image)
    assert cuts.shape == (5, 3, 32, 32)
    whole = torch.nn.functional.interpolate(image, size=(32, 32), mode="bilinear", antialias=True)
    assert torch.equal(cuts[0], whole[0]) and torch.equal(cuts[1], whole[0])
    assert not torch.equal(cuts[2], whole[0])
    with pytest.raises(ValueError, match="overview cutouts must be in 0..cutn"):
        MakeCutouts(cut_size=32, cutn=2, overview=3)
