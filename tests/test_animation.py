"""Animations: schedules, the frame transform, the frames and their records, and bad input."""

import json

import imageio.v3 as iio
import pytest
import torch
from PIL import Image

from vqclip.animation import frame_seed, warp
from vqclip.cli import main
from vqclip.images import read_png_text, to_tensor
from vqclip.schedules import parse_schedule, prompts_by_frame, schedule_values, value_at

SMALL = dict(size=[32, 32], cutn=4, seed=1)


def test_keyframes_are_exact_at_keys_linear_between_and_held_outside():
    keys = parse_schedule("2:1.0, 6:2.0, 8:0.0", "zoom")
    assert keys == [(2, 1.0), (6, 2.0), (8, 0.0)]
    assert [value_at(keys, f) for f in (0, 2, 4, 6, 7, 8, 20)] == [1.0, 1.0, 1.5, 2.0, 1.0, 0.0, 0.0]
    assert schedule_values(1.05, 3) == [1.05, 1.05, 1.05]
    assert schedule_values("-3", 2, "angle") == [-3.0, -3.0]


@pytest.mark.parametrize("bad, message", [
    ("0:abc", "'abc' is not a number"), ("3:1, 1:2", "increasing frame order"),
    ("1:1, 1:2", "increasing frame order"), ("-1:1", "FRAME a whole number"),
    ("0:1,", "FRAME a whole number"), ("nan", "not a finite number")])
def test_bad_schedules_say_what_is_wrong(bad, message):
    with pytest.raises(ValueError, match=message):
        parse_schedule(bad, "zoom")


def test_stories_and_switches_choose_each_frames_prompt():
    assert prompts_by_frame("a^b^c", [], 6) == ["a", "a", "b", "b", "c", "c"]
    assert prompts_by_frame("a^b", [], 5) == ["a", "a", "b", "b", "b"]  # part i from i * 5 // 2
    assert prompts_by_frame("a", ["2:b:2|c:-1", "4:d"], 6) == ["a", "a", "b:2|c:-1", "b:2|c:-1", "d", "d"]
    for prompt, at, frames, message in [("a^ ^b", [], 4, "empty part"), ("a^b^c", [], 2, "only 2"),
                                        ("a^b", ["1:c"], 4, "not both"), ("a", ["4:b"], 4, "beyond"),
                                        ("a", ["1:b", "1:c"], 4, "two prompts")]:
        with pytest.raises(ValueError, match=message):
            prompts_by_frame(prompt, at, frames)


def test_warp_moves_the_picture_as_documented():
    image = torch.zeros(1, 3, 16, 16)
    image[:, :, 4, 11] = 1.0  # a dot above and right of the centre (7.5, 7.5)

    def dot(x):
        return divmod(int(x[0, 0].argmax()), 16)

    assert torch.allclose(warp(image), image, atol=1e-6)
    assert dot(warp(image, translate_x=2, border="edge")) == (4, 13)  # right
    assert dot(warp(image, translate_y=3, border="edge")) == (7, 11)  # down
    assert dot(warp(image, angle=90, border="edge")) == (4, 4)  # counter-clockwise: to the upper left
    zoomed = warp(image, zoom=2.0, border="edge")  # twice as far from the centre: about (0.5, 14.5)
    assert dot(zoomed)[0] <= 1 and dot(zoomed)[1] >= 14
    wide = torch.rand(1, 3, 8, 12)
    assert torch.allclose(warp(wide, angle=360), wide, atol=1e-5)
    uncovered = warp(torch.rand(1, 3, 16, 16) + 0.5, zoom=0.5)  # zoom out: edges are filled
    assert uncovered.min() >= 0.5


def test_frame_0_is_generate_with_the_same_seed_and_the_same_command_makes_the_same_frames(
        tiny_generator, tmp_path):
    assert frame_seed(7, 0) == 7 and len({frame_seed(s, f) for s in range(3) for f in range(50)}) == 150
    for i in range(2):
        tiny_generator.animate("a red circle", frames=3, steps_per_frame=2, first_steps=4,
                               zoom=1.1, output=str(tmp_path / f"run{i}"), **SMALL)
    still = tiny_generator.generate("a red circle", steps=4, **SMALL)
    first = to_tensor(Image.open(tmp_path / "run0" / "frame-00000.png"))
    assert torch.equal(first, to_tensor(still.images[0]))
    for f in range(3):
        frames = [to_tensor(Image.open(tmp_path / f"run{i}" / f"frame-{f:05d}.png")) for i in range(2)]
        assert torch.equal(*frames)


def test_animation_writes_frames_records_and_video(tiny_generator, tmp_path):
    seen = []
    result = tiny_generator.animate(
        "a red circle^a blue square", frames=4, steps_per_frame=2, first_steps=3,
        zoom="0:1.0, 3:1.3", angle=2, output=str(tmp_path / "anim"),
        callback=lambda f, record: seen.append((f, record["image"].shape)), **SMALL)
    folder = tmp_path / "anim"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["animation.mp4", "animation.state.safetensors",
                     *[f"frame-{f:05d}.png" for f in range(4)], "frames.jsonl"]
    assert sorted(result.files) == sorted(folder / n for n in names)
    records = [json.loads(line) for line in (folder / "frames.jsonl").read_text().splitlines()]
    assert records == result.records and [r["frame"] for r in records] == [0, 1, 2, 3]
    assert [r["prompt"] for r in records] == ["a red circle"] * 2 + ["a blue square"] * 2
    assert [r["steps"] for r in records] == [3, 2, 2, 2]
    assert records[0]["zoom"] is None  # frame 0 is not moved; frame f's move is from f - 1
    assert [round(r["zoom"], 4) for r in records[1:]] == [1.1, 1.2, 1.3]
    text = read_png_text(folder / "frame-00002.png")
    assert text["prompt"] == "a blue square" and text["frame"] == "2" and text["angle"] == "2.0"
    assert "animation:" in text["config"] and text["seed"] == "1"
    assert len(iio.imread(folder / "animation.mp4", index=None, plugin="FFMPEG")) == 4
    assert seen == [(f, (1, 3, 32, 32)) for f in range(4)]


def test_without_steps_a_frame_is_the_one_before_moved(tmp_path):
    """steps_per_frame 0: each frame is the previous one warped, through the VQGAN's round trip
    (the bundled VQGAN's: a random one reconstructs nothing); it is nearer the warped previous
    frame than the unwarped one by a clear margin."""
    from vqclip.generator import Generator

    gen = Generator.load(preset="shapes", download=False)
    gen.animate("a red circle", frames=3, steps_per_frame=0, first_steps=30, zoom=1.25, angle=10,
                translate_x=3, output=str(tmp_path / "a"), seed=0)

    def frame(f):
        return to_tensor(Image.open(tmp_path / "a" / f"frame-{f:05d}.png"))

    for f in (1, 2):
        before, now = frame(f - 1), frame(f)
        moved = warp(before, zoom=1.25, angle=10, translate_x=3)
        to_moved, to_before = (now - moved).abs().mean(), (now - before).abs().mean()
        assert to_moved < 0.6 * to_before, (f, float(to_moved), float(to_before))


def test_prompt_at_switches_at_its_frames(tiny_generator, tmp_path):
    result = tiny_generator.animate("a red circle", prompt_at=["1:a blue square", "3:a green triangle"],
                                    frames=4, steps_per_frame=1, first_steps=1,
                                    output=str(tmp_path / "p"), **SMALL)
    assert [r["prompt"] for r in result.records] == ["a red circle", "a blue square",
                                                     "a blue square", "a green triangle"]


@pytest.mark.parametrize("extra, message", [
    (["--frames", "0"], "frames must be >= 1"),
    (["--frames", "-2"], "frames must be >= 1"),
    (["--zoom", "0:abc"], "is not a number"),
    (["--zoom", "5:1, 2:1.1"], "increasing frame order"),
    (["--angle=-1:3"], "FRAME a whole number"),
    (["--zoom", "0:1, 3:-0.5"], "must stay > 0"),
    (["--prompt-at", "9", "a blue square"], "beyond the last frame"),
    (["--prompt-at", "x", "a blue square"], "FRAME must be a whole number"),
    (["--candidates", "2"], "one candidate"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny_models, tmp_path, capsys, extra,
                                                          message, monkeypatch):
    from vqclip.generator import Generator

    def never(*args, **kwargs):
        raise AssertionError("the models were loaded before the input was checked")

    monkeypatch.setattr(Generator, "load", never)
    monkeypatch.chdir(tmp_path)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in tiny_models.items()]
    code = main(["animate", "a red circle", *args, "--frames", "5", "--output",
                 str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "outputs").exists()


def test_an_empty_story_part_and_existing_frames_are_refused(tiny_models, tmp_path, capsys):
    args = [f"--{k.replace('_', '-')}={v}" for k, v in tiny_models.items()]
    assert main(["animate", "a red circle^^a blue square", *args, "--output", str(tmp_path)]) == 2
    assert "empty part" in capsys.readouterr().err
    (tmp_path / "frame-00000.png").write_bytes(b"earlier")
    assert main(["animate", "a red circle", *args, "--output", str(tmp_path)]) == 2
    assert "exists" in capsys.readouterr().err
    assert (tmp_path / "frame-00000.png").read_bytes() == b"earlier"


def test_ctrl_c_keeps_the_finished_frames_and_a_playable_video(tiny_generator, tmp_path):
    from vqclip.animation import AnimationInterrupted

    def stop(frame, record):
        if frame == 1:
            raise KeyboardInterrupt

    with pytest.raises(AnimationInterrupted) as info:
        tiny_generator.animate("a red circle", frames=5, steps_per_frame=1, first_steps=2,
                               output=str(tmp_path / "a"), callback=stop, **SMALL)
    result = info.value.result
    assert result.interrupted and [r["frame"] for r in result.records] == [0, 1]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "animation.mp4", "animation.state.safetensors", "frame-00000.png", "frame-00001.png",
        "frames.jsonl"]
    assert len((tmp_path / "a" / "frames.jsonl").read_text().splitlines()) == 2
    assert len(iio.imread(tmp_path / "a" / "animation.mp4", index=None, plugin="FFMPEG")) == 2


def test_overwrite_replaces_an_earlier_animation_and_nothing_else(tiny_generator, tmp_path):
    folder = tmp_path / "a"
    tiny_generator.animate("a red circle", frames=3, steps_per_frame=1, first_steps=1,
                           output=str(folder), **SMALL)
    (folder / "frame-final.png").write_bytes(b"mine")  # not a name animate writes
    with pytest.raises(FileExistsError):
        tiny_generator.animate("a blue square", frames=2, output=str(folder), **SMALL)
    tiny_generator.animate("a blue square", frames=2, steps_per_frame=1, first_steps=1,
                           output=str(folder), overwrite=True, **SMALL)
    assert sorted(p.name for p in folder.iterdir()) == [
        "animation.mp4", "animation.state.safetensors", "frame-00000.png", "frame-00001.png",
        "frame-final.png", "frames.jsonl"]
    assert read_png_text(folder / "frame-00001.png")["prompt"] == "a blue square"


def test_a_presets_candidates_are_for_generations_not_animations(tiny_models, tiny_generator, tmp_path):
    """The shapes preset makes 4 candidates; an animation, which has one, takes no more from a
    preset or config file, only from a --candidates given on purpose (refused above)."""
    from vqclip.config import load_config

    cfg = load_config(**tiny_models, size=[32, 32], cutn=4, candidates=2)
    result = tiny_generator.animate("x", config=cfg, frames=2, steps_per_frame=1,
                                    output=tmp_path / "api")
    assert len(result.records) == 2
    settings = tmp_path / "four.yaml"
    settings.write_text("candidates: 4\n")
    argv = ["-q", "animate", "x", "--config", str(settings), "--frames", "2",
            "--steps-per-frame", "1", "--size", "32", "32", "--cutn", "4", "--output", str(tmp_path / "cli")]
    for key, value in tiny_models.items():
        argv += [f"--{key.replace('_', '-')}", value]
    assert main(argv) == 0 and (tmp_path / "cli" / "frame-00001.png").is_file()
