"""Going on from a stopped or finished run (`--resume`): bit for bit, and bad input refused."""

import hashlib
import json
import os
import shutil
import signal

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from vqclip.cli import main
from vqclip.cutouts import MakeCutouts
from vqclip.generator import GenerationInterrupted
from vqclip.images import read_png_text, to_tensor
from vqclip.resume import read_state

from conftest import cli_process, wait_for

SMALL = dict(size=[32, 32], cutn=4, seed=1)


def _frames(folder, n):
    return [to_tensor(Image.open(folder / f"frame-{f:05d}.png")) for f in range(n)]


def _records(folder):
    return [{k: v for k, v in json.loads(line).items() if k != "path"}
            for line in (folder / "frames.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_a_finished_generation_goes_on_bit_for_bit(tiny_generator, tmp_path, optimizer):
    # two candidates, a pull toward the start and a denoise every 3 steps: all carried over
    kw = dict(candidates=2, init_weight=0.2, denoise_every=3, optimizer=optimizer, **SMALL)
    whole = tiny_generator.generate("a red circle", steps=9, output=str(tmp_path / "w.png"), **kw)
    tiny_generator.generate("a red circle", steps=4, output=str(tmp_path / "p.png"), **kw)
    resumed = tiny_generator.generate(resume=tmp_path / "p-1.png", steps=9)
    assert torch.equal(resumed.tensor, whole.tensor) and torch.equal(resumed.losses, whole.losses)
    assert resumed.steps_done == 9 and read_png_text(tmp_path / "p-0.png")["steps_done"] == "9"
    assert [p.name for p in resumed.files] == ["p-0.png", "p-0.yaml", "p-1.png", "p-1.yaml",
                                               "p-ranking.json", "p.state.safetensors"]


def test_ctrl_c_inside_a_step_undoes_that_step_and_goes_on_bit_for_bit(tiny_generator, tmp_path,
                                                                       monkeypatch):
    whole = tiny_generator.generate("a red circle", steps=7, **SMALL)
    three = tiny_generator.generate("a red circle", steps=3, **SMALL)
    cut, calls = MakeCutouts.forward, []

    def stop_in_step_4(self, *args):
        out = cut(self, *args)  # the streams have moved on: the step is half done
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(MakeCutouts, "forward", stop_in_step_4)
    with pytest.raises(GenerationInterrupted) as info:
        tiny_generator.generate("a red circle", steps=7, output=str(tmp_path / "o.png"), **SMALL)
    monkeypatch.undo()
    assert info.value.result.steps_done == 3
    assert torch.equal(info.value.result.tensor, three.tensor)  # as after step 3, not during 4
    resumed = tiny_generator.generate(resume=tmp_path / "o.png")  # to the run's own 7 steps
    assert torch.equal(resumed.tensor, whole.tensor) and resumed.steps_done == 7


def test_save_state_false_writes_none_and_then_there_is_nothing_to_resume(tiny_generator,
                                                                          tmp_path):
    tiny_generator.generate("x", steps=1, output=str(tmp_path / "o.png"), save_state=False,
                            **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.png", "o.yaml"]
    with pytest.raises(FileNotFoundError, match="no saved state there"):
        tiny_generator.generate(resume=tmp_path / "o.png", steps=2)


def test_an_animation_stopped_or_finished_goes_on_bit_for_bit(tiny_generator, tmp_path):
    from vqclip.animation import AnimationInterrupted

    kw = dict(steps_per_frame=2, first_steps=3, zoom="0:1.0, 3:1.2", angle=3, **SMALL)
    tiny_generator.animate("a red circle", frames=5, output=str(tmp_path / "whole"), **kw)

    def stop(frame, record):
        if frame == 1:
            raise KeyboardInterrupt

    with pytest.raises(AnimationInterrupted):
        tiny_generator.animate("a red circle", frames=5, output=str(tmp_path / "part"),
                               callback=stop, **kw)
    os.rename(tmp_path / "part", tmp_path / "moved")  # a folder goes on where it is now
    tiny_generator.animate(resume=tmp_path / "moved")  # to the run's own 5 frames
    tiny_generator.animate("a red circle", frames=3, output=str(tmp_path / "short"), **kw)
    result = tiny_generator.animate(resume=tmp_path / "short", frames=5)  # a finished one, longer
    for folder in ("moved", "short"):
        assert all(torch.equal(a, b) for a, b in zip(_frames(tmp_path / "whole", 5),
                                                     _frames(tmp_path / folder, 5), strict=True))
        assert _records(tmp_path / folder) == _records(tmp_path / "whole")
    assert [r["frame"] for r in result.records] == [0, 1, 2, 3, 4]
    assert all(p.parent == tmp_path / "short" for p in result.files)
    import imageio.v3 as iio

    assert len(iio.imread(tmp_path / "short" / "animation.mp4", index=None, plugin="FFMPEG")) == 5


def test_an_animation_stopped_by_sigint_goes_on_bit_for_bit(tiny_models, tmp_path):
    model_flags = [f"--{k.replace('_', '-')}={v}" for k, v in tiny_models.items()]
    run = ["-q", "animate", "a red circle", *model_flags, "--size", "32", "32", "--cutn", "4",
           "--seed", "2", "--first-steps", "3", "--steps-per-frame", "2", "--zoom", "1.1"]
    proc = cli_process(*run, "--frames", "1000", "--output", str(tmp_path / "part"),
                       interruptible=True)
    wait_for(proc, lambda: (tmp_path / "part" / "frame-00002.png").exists())
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err and "interrupted after" in err, err
    done = len(read_state(tmp_path / "part" / "animation.state.safetensors", "animation",
                          tensors=False)[0]["records"])
    # stopped between a frame's PNG and its state, that frame is made again
    assert done >= 2 and len(list((tmp_path / "part").glob("frame-*.png"))) in (done, done + 1)
    assert main([*run, "--resume", str(tmp_path / "part"), "--frames", str(done + 2)]) == 0
    assert main([*run, "--frames", str(done + 2), "--output", str(tmp_path / "whole")]) == 0
    assert all(torch.equal(a, b) for a, b in zip(_frames(tmp_path / "whole", done + 2),
                                                 _frames(tmp_path / "part", done + 2), strict=True))


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*")
            if p.is_file()}


def test_bad_resumes_are_one_line_exit_2_before_any_model_loads(tiny_generator, tiny_models,
                                                                  tmp_path, capsys, monkeypatch):
    from vqclip.generator import Generator

    tiny_generator.generate("a red circle", steps=4, output=str(tmp_path / "g" / "o.png"),
                            **SMALL)
    tiny_generator.animate("a red circle", frames=2, steps_per_frame=1, first_steps=1,
                           output=str(tmp_path / "a"), **SMALL)
    (tmp_path / "fake.state.safetensors").write_bytes(b"\x80\x04K\x01.")  # a pickle, not a state
    save_file({"z": torch.zeros(1)}, str(tmp_path / "damaged.state.safetensors"),
              metadata={"vqclip": json.dumps({"format": "vqclip-state/1", "kind": "generation"})})
    shutil.copytree(tmp_path / "a", tmp_path / "a2")
    (tmp_path / "a2" / "frame-00001.png").unlink()
    before = _digest(tmp_path)

    def never(*args, **kwargs):
        raise AssertionError("the models were loaded before the input was checked")

    monkeypatch.setattr(Generator, "load", never)
    png = str(tmp_path / "g" / "o.png")
    for line, message in [
        (["generate", "--resume", str(tmp_path / "a" / "frame-00000.png")], "no saved state there"),
        (["generate", "--resume", str(tmp_path / "fake.state.safetensors")],
         "is not a vqclip state file"),
        (["generate", "--resume", str(tmp_path / "a" / "animation.state.safetensors")],
         "holds no generation state"),
        (["generate", "--resume", str(tmp_path / "damaged.state.safetensors")],
         "is damaged: no config in it"),
        (["generate", "--resume", png, "--steps", "4"], "has 4 steps already"),
        (["generate", "--resume", png, "--steps", "9", "--lr", "0.5"],
         "the run has optim.lr=0.1, not 0.5"),
        (["generate", "--resume", png, "--steps", "9", "a blue square"],
         "the run has prompts.text=a red circle, not a blue square"),
        (["generate", "--resume", png, "--steps", "9", "--preset", "shapes"],
         "the run has models.vqgan="),
        (["animate", "--resume", str(tmp_path / "g")], "no saved state there"),
        (["animate", "--resume", str(tmp_path / "a")], "has 2 frames already"),
        (["animate", "--resume", str(tmp_path / "a2"), "--frames", "4"],
         "frame-00001.png is missing"),
        (["animate", "--resume", str(tmp_path / "a"), "--frames", "4", "--steps", "9"],
         "the run has optim.steps="),
        (["animate", "--resume", str(tmp_path / "a"), "--frames", "4", "--output", "b"],
         "drop --output"),
        (["animate", "--resume", str(tmp_path / "a"), "--frames", "4", "--zoom", "1.2"],
         "the run has animation.zoom=1.0, not 1.2"),
    ]:
        assert main(line) == 2, line
        err = capsys.readouterr().err
        assert err.startswith("vqclip: error: ") and message in err and err.count("\n") == 1, err
    assert _digest(tmp_path) == before


def test_settings_given_again_that_match_are_fine(tiny_models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = ["-q", "generate", "a red circle", *[f"--{k.replace('_', '-')}={v}" for k, v in
                                                tiny_models.items()],
            "--size", "30", "30", "--cutn", "4", "--seed", "1", "--output", "./o.png"]
    assert main([*line, "--steps", "2"]) == 0
    # the same line again, with --resume: the size is compared as rounded, auto as what ran,
    # the (default) preset under the model flags, the output as the run's own file
    assert main([*line, "--steps", "4", "--precision", "auto", "--preset", "imagenet",
                 "--resume", "o.png"]) == 0
    assert read_png_text(tmp_path / "o.png")["steps_done"] == "4"
    # a new run over it that keeps no state leaves none of the old one to resume by mistake
    assert main([*line, "--steps", "1", "--overwrite", "--no-state"]) == 0
    assert not (tmp_path / "o.state.safetensors").exists()
