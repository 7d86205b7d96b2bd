"""The shapes world and its pixel-only judge."""

import math

import pytest
import torch

from vqclip.shapes import (
    CLUTTER,
    COLOURS,
    SHAPES,
    batch,
    captions,
    clutter,
    clutter_batch,
    render,
    sample_scene,
)
from vqclip.shapes.judge import judge


def test_scenes_are_deterministic_and_splits_differ():
    assert sample_scene(5) == sample_scene(5)
    assert torch.equal(batch(5, 3)[0], batch(5, 3)[0])
    train = {sample_scene(i) for i in range(200)}
    val = {sample_scene(i, "val") for i in range(200)}
    assert not train & val  # jitter makes every scene unique; splits share none
    with pytest.raises(ValueError, match="unknown split"):
        sample_scene(0, "holdout")


def test_coverage_of_the_world():
    scenes = [sample_scene(i) for i in range(2000)]
    objects = [o for s in scenes for o in s.objects]
    assert {o.colour for o in objects} == set(COLOURS)
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.size for o in objects} == {"small", "large"}
    assert len({o.position for o in objects}) == 9
    assert {len(s.objects) for s in scenes} == {1, 2}
    assert all(s.background not in {o.colour for o in s.objects} for s in scenes)


def test_captions_agree_with_the_scene():
    for i in range(300):
        scene = sample_scene(i)
        for text in captions(scene):
            for obj in scene.objects:
                assert f"{obj.colour} {obj.shape}" in text
            if "background" in text:
                assert f"on a {scene.background} background" in text
            if len(scene.objects) == 1 and scene.objects[0].size in text.split():
                assert f"{scene.objects[0].size} {scene.objects[0].colour}" in text


def test_render_puts_the_colour_where_the_scene_says():
    scene = sample_scene(1, num_objects=1)
    image = torch.frombuffer(bytearray(render(scene).tobytes()), dtype=torch.uint8).view(64, 64, 3)
    image = image.float()
    (obj,) = scene.objects
    from vqclip.shapes import POSITIONS

    x, y = (int(v * 64) for v in POSITIONS[obj.position])
    assert (image[y, x] - torch.tensor(COLOURS[obj.colour])).abs().max() < 30


@pytest.mark.parametrize("split", ["val", "test"])
def test_judge_reads_every_clean_render(split):
    images, scenes = batch(0, 150, split=split)
    for image, scene in zip(images, scenes, strict=True):
        verdict = judge(image)
        assert verdict.num_objects == len(scene.objects)
        assert any(verdict.matches(o.colour, o.shape) for o in scene.objects), (scene, verdict)


def test_judge_rejects_noise_blobs_and_empty_images():
    torch.manual_seed(0)
    assert judge(torch.rand(3, 64, 64)).shape is None
    flat = torch.full((3, 64, 64), 0.5)
    assert judge(flat).num_objects == 0 and judge(flat).colour is None
    blob = flat.clone()
    mask = torch.rand(64, 64) > 0.5  # a ragged red texture in the middle
    mask[:16], mask[48:], mask[:, :16], mask[:, 48:] = False, False, False, False
    blob[:, mask] = torch.tensor([220, 30, 30], dtype=torch.float32)[:, None] / 255
    verdict = judge(blob)
    assert verdict.shape is None


def _draw(form: str, box: tuple, points=None) -> torch.Tensor:
    from PIL import Image, ImageDraw

    from vqclip.images import to_tensor

    image = Image.new("RGB", (256, 256), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    if form == "polygon":
        draw.polygon(points, fill=COLOURS["red"])
    else:
        getattr(draw, form)(box, fill=COLOURS["red"])
    return to_tensor(image.reduce(4))[0]


@pytest.mark.parametrize("form, box, points", [
    ("ellipse", (60, 90, 196, 166), None),  # an oval is no circle
    ("rectangle", (70, 100, 186, 156), None),  # a bar is no square
    # a regular pentagon: between a triangle and a square (triangularity 0.72, circularity 0.865)
    ("polygon", None, [(128 + 60 * math.cos(a), 128 + 60 * math.sin(a))
                       for a in (2 * math.pi * i / 5 - math.pi / 2 for i in range(5))]),
    ("polygon", None, [(40, 200), (216, 200), (128, 120)]),  # a flat triangle
])
def test_judge_rejects_almost_shapes(form, box, points):
    verdict = judge(_draw(form, box, points))
    assert verdict.colour == "red" and verdict.shape is None, verdict


def test_judge_reads_a_rotated_square():
    c, r = 128, 60
    square = [(c + r * math.cos(a), c + r * math.sin(a)) for a in (math.pi / 4 * (2 * i + 1) + 0.3
                                                                   for i in range(4))]
    assert judge(_draw("polygon", None, square)).shape == "square"


def test_clutter_is_deterministic_and_of_every_kind():
    assert torch.equal(clutter_batch(3, 4), clutter_batch(3, 4))
    assert not torch.equal(clutter_batch(3, 1), clutter_batch(4, 1))
    for kind in CLUTTER:
        for seed in range(5):
            pixels = torch.tensor(list(clutter(seed, kind=kind).getdata()))
            assert len(pixels.unique(dim=0)) > 1, (kind, seed)  # never a blank image
    from vqclip.images import to_tensor

    # "almost" shapes are single solid objects that the judge refuses to name
    verdicts = [judge(to_tensor(clutter(seed, kind="almost"))[0]) for seed in range(40)]
    assert all(v.shape is None for v in verdicts) and sum(v.colour is not None for v in verdicts) > 30


@pytest.mark.parametrize("shape", SHAPES)
def test_judge_tolerates_soft_edges_and_rounded_corners(shape):
    from PIL import Image, ImageDraw, ImageFilter

    from vqclip.images import to_tensor

    image = Image.new("RGB", (256, 256), COLOURS["yellow"])
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((70, 70, 186, 186), fill=COLOURS["blue"])
    elif shape == "square":
        draw.rounded_rectangle((78, 78, 178, 178), radius=14, fill=COLOURS["blue"])
    else:
        side = 136
        draw.polygon([(128, 128 - side * 0.43), (128 - side / 2, 128 + side * 0.43),
                      (128 + side / 2, 128 + side * 0.43)], fill=COLOURS["blue"])
    soft = image.filter(ImageFilter.GaussianBlur(4)).reduce(4)  # about 1 px of blur at 64 px
    assert judge(to_tensor(soft)[0]).matches("blue", shape)
