"""Cutouts and losses: shapes, ranges, cut_pow, per-candidate random streams, gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from vqclip.config import AUGMENTS
from vqclip.cutouts import MakeCutouts, SeedStreams, build_augments
from vqclip.losses import init_loss, prompt_loss, spherical_distance, tv_loss


@pytest.mark.parametrize("size", [(64, 64), (48, 80), (20, 24), (300, 260)])
def test_cutout_shapes_and_range(size):
    images = torch.rand(3, 3, *size)
    cuts = MakeCutouts(cut_size=32, cutn=5)(images, SeedStreams([0, 1, 2]))
    assert cuts.shape == (15, 3, 32, 32)
    assert cuts.min() >= 0 and cuts.max() <= 1  # no augmentations: resampling stays in range


def test_cutouts_are_image_major():
    images = torch.stack([torch.zeros(3, 40, 40), torch.ones(3, 40, 40)])
    cuts = MakeCutouts(cut_size=16, cutn=4)(images, SeedStreams([0, 1]))
    assert cuts[:4].max() == 0 and torch.allclose(cuts[4:], torch.ones(1), atol=1e-6)


def test_a_crop_of_the_cutout_size_is_the_image_itself():
    """A 32-pixel image cut at 32: every crop is the whole image, read at its own pixel centres."""
    image = torch.rand(2, 3, 32, 32)
    cuts = MakeCutouts(cut_size=32, cutn=3)(image, SeedStreams([0, 1]))
    assert torch.allclose(cuts, image.repeat_interleave(3, 0), atol=1e-5)


def test_cut_pow_favours_small_cutouts():
    """With a big cut_pow, most crops are near the minimum size."""
    def mean_side(cut_pow):
        cut = MakeCutouts(cut_size=16, cutn=400, cut_pow=cut_pow)
        sides = cut.sample(128, 128, torch.Generator().manual_seed(0))[:, 24]
        assert sides.min() >= 16 and sides.max() <= 128
        return sides.mean()

    assert mean_side(4.0) < 50 < mean_side(1.0) < 80 < mean_side(0.25)


def test_crops_match_crop_then_resize():
    """Without augmentations, a cutout is its crop box resized: compared with torchvision's
    roi_align of the same box (bilinear samples averaged over each output pixel's area)."""
    from torchvision.ops import roi_align

    torch.manual_seed(0)
    image = F.interpolate(torch.rand(1, 3, 12, 12), size=(96, 96), mode="bicubic",
                          align_corners=False).clamp(0, 1)
    cut = MakeCutouts(cut_size=24, cutn=8)
    params = cut.sample(96, 96, torch.Generator().manual_seed(3))
    cuts = cut(image, SeedStreams([3]))
    m, side = params[:, :9].view(-1, 3, 3), params[:, 24]
    left, top = (m[:, 0, 2] + 1) * 48 - side / 2, (m[:, 1, 2] + 1) * 48 - side / 2
    boxes = torch.stack([torch.zeros_like(side), left, top, left + side, top + side], 1)
    err = (cuts - roi_align(image, boxes, output_size=24, aligned=True)).abs().mean((1, 2, 3))
    assert side.min() < 25 and side.max() > 80  # kept its size, and shrunk up to 3.5x
    assert err[side < 25].max() < 1e-3  # the same pixels
    assert err.max() < 0.025  # blurrier than an exact box average as it shrinks (mipmap levels)
    boxes[:, 1::2] += 4  # a box 4 pixels off is another picture: 0.13 here
    wrong = (cuts - roi_align(image, boxes, output_size=24, aligned=True)).abs().mean((1, 2, 3))
    assert wrong.min() > 0.1


def test_gradients_reach_every_pixel_of_a_crop():
    """The pooled levels make a shrinking crop pass gradient to every pixel under it, which a
    plain bilinear sample would not (it reads 4 pixels per output pixel, at any scale)."""
    image = torch.rand(1, 3, 256, 256, requires_grad=True)
    cut = MakeCutouts(cut_size=32, cutn=1, overview=1)  # the whole image, 8x smaller
    cut(image, SeedStreams([0])).sum().backward()
    assert (image.grad.abs().sum(1) > 0).all()
    # crops of every size: each pixel inside each crop box gets gradient from that cutout alone
    cut = MakeCutouts(cut_size=32, cutn=6)
    params = cut.sample(256, 256, torch.Generator().manual_seed(1))
    for k, p in enumerate(params):
        image.grad = None
        cut(image, SeedStreams([1]))[k].sum().backward()
        m, side = p[:9].view(3, 3), p[24].item()
        x0 = math.ceil((m[0, 2].item() + 1) * 128 - side / 2)
        y0 = math.ceil((m[1, 2].item() + 1) * 128 - side / 2)
        inside = image.grad[0, :, y0 + 1:y0 + int(side) - 1, x0 + 1:x0 + int(side) - 1]
        assert (inside.abs().sum(0) > 0).all(), f"crop {k} of side {side:.0f} skips pixels"


@pytest.mark.parametrize("name", AUGMENTS)
def test_each_augmentation_keeps_shape_and_changes_something(name):
    image = torch.rand(1, 3, 48, 48)
    plain = MakeCutouts(cut_size=32, cutn=16)(image, SeedStreams([0]))
    cuts = MakeCutouts(cut_size=32, cutn=16, augments=[name])(image, SeedStreams([0]))
    assert cuts.shape == (16, 3, 32, 32) and torch.isfinite(cuts).all()
    assert not torch.allclose(cuts, plain)
    assert build_augments([name])(torch.rand(6, 3, 32, 32)).shape == (6, 3, 32, 32)  # trainers'


def test_augmentations_draw_as_often_and_as_strongly_as_asked():
    gray = torch.full((1, 3, 40, 40), 0.5)
    n = 2000
    jitter = MakeCutouts(cut_size=8, cutn=n, augments=["jitter"])(gray, SeedStreams([0]))
    assert torch.allclose(jitter, gray[:1, :, :8, :8], atol=1e-5)  # hue/saturation keep gray
    noisy = MakeCutouts(cut_size=8, cutn=n, augments=["noise"])(gray, SeedStreams([0]))
    std = (noisy - 0.5).flatten(1).std(1)
    assert 0.45 < (std > 0.05).float().mean() < 0.55  # p = 0.5
    assert std[std > 0.05].mean() == pytest.approx(0.1, rel=0.05)
    ones = torch.ones(1, 3, 40, 40)
    erased = MakeCutouts(cut_size=20, cutn=n, augments=["erasing"])(ones, SeedStreams([0]))
    area = (erased[:, 0] == 0).float().mean((1, 2))
    assert 0.65 < (area > 0).float().mean() < 0.75  # p = 0.7
    assert area[area > 0].min() > 0.05 and area.max() < 0.45  # scale 0.1-0.4 (rounded to pixels)
    red = torch.zeros(1, 3, 40, 40)
    red[:, 0] = 0.8
    hues = MakeCutouts(cut_size=8, cutn=n, augments=["jitter"])(red, SeedStreams([0]))
    changed = (hues - red[:, :, :8, :8]).abs().amax((1, 2, 3)) > 1e-3
    assert 0.65 < changed.float().mean() < 0.75  # p = 0.7


def test_unknown_augmentation_lists_valid_ones():
    with pytest.raises(ValueError, match="available: affine, perspective"):
        build_augments(["affine", "swirl"])
    with pytest.raises(ValueError, match="unknown augmentation 'swirl'"):
        MakeCutouts(cut_size=32, cutn=2, augments=["swirl"])


def test_gradients_reach_the_image_through_augmented_cutouts():
    image = torch.rand(1, 3, 48, 48, requires_grad=True)
    cuts = MakeCutouts(cut_size=32, cutn=8, augments=AUGMENTS)(image, SeedStreams([0]))
    cuts.square().sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0


def test_cutouts_are_seed_exact_per_candidate_and_leave_the_global_state_alone():
    images = torch.rand(3, 3, 48, 48)
    cut = MakeCutouts(cut_size=32, cutn=4, augments=AUGMENTS)
    before = torch.get_rng_state()
    first = cut(images, SeedStreams([3, 4, 5]))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(first, cut(images, SeedStreams([3, 4, 5])))  # bitwise, same seeds
    alone = cut(images[1:2], SeedStreams([4]))  # candidate 1 of the batch = a run with seed 4
    assert torch.allclose(first[4:8], alone, atol=1e-6)
    assert not torch.allclose(first[:4], cut(images[:1], SeedStreams([6])), atol=1e-3)
    streams = SeedStreams([3])
    assert not torch.equal(cut(images[:1], streams), cut(images[:1], streams))  # the stream moves


def test_seed_streams_match_manual_seed():
    streams = SeedStreams([5, 6])
    torch.manual_seed(6)
    assert torch.equal(torch.rand(4, generator=streams.cpu[1]), torch.rand(4))
    assert streams.device is streams.cpu  # on the CPU, one generator per candidate


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
    image = F.interpolate(torch.rand(1, 3, 6, 8), size=(48, 64), mode="bicubic").clamp(0, 1)
    cuts = MakeCutouts(cut_size=32, cutn=5, overview=2)(image, SeedStreams([0]))
    assert cuts.shape == (5, 3, 32, 32)
    whole = F.interpolate(image, size=(32, 32), mode="bilinear", antialias=True)
    assert (cuts[0] - whole[0]).abs().max() < 0.03 and torch.equal(cuts[0], cuts[1])
    assert (cuts[2] - whole[0]).abs().max() > 0.05
    with pytest.raises(ValueError, match="overview cutouts must be in 0..cutn"):
        MakeCutouts(cut_size=32, cutn=2, overview=3)
