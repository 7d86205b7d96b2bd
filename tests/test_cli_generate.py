"""`vqclip generate`: end to end with real loaders, outputs, and every user-error path's exit code."""

import dataclasses
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from vqclip import pretrained
from vqclip.cli import main
from vqclip.images import read_png_text, to_tensor
from vqclip.resume import read_state

from conftest import cli_process, wait_for


def flags(models, **extra):
    args = []
    for key, value in {**models, **extra}.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


TINY_RUN = ["--size", "32", "32", "--cutn", "4", "--seed", "3"]


def test_generate_writes_png_sidecar_and_video(tiny_models, tmp_path, capsys):
    out, video = tmp_path / "red.png", tmp_path / "red.mp4"
    code = main(["generate", "a red circle:1|blue:-0.3", *flags(tiny_models), *TINY_RUN,
                 "--steps", "6", "--output", str(out), "--video", str(video), "--save-every", "2",
                 "optim.lr=0.2"])
    assert code == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(video), str(out), str(out.with_suffix(".yaml")),
                       str(tmp_path / "red.state.safetensors")]
    text = read_png_text(out)
    assert text["prompt"] == "a red circle:1|blue:-0.3" and text["seed"] == "3"
    assert "lr: 0.2" in text["config"]


def test_run_folders_under_outputs_never_overwrite(tiny_models, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert main(["generate", "A Red Circle!", *flags(tiny_models), *TINY_RUN, "steps=1"]) == 0
    pngs = sorted(tmp_path.glob("outputs/*/final.png"))
    assert len(pngs) == 2 and pngs[0].parent != pngs[1].parent
    assert all(p.parent.name.split("-", 2)[-1].startswith("a-red-circle") for p in pngs)
    assert all(p.with_suffix(".yaml").is_file() for p in pngs)


def test_real_architectures_through_the_default_preset(tmp_path, isolated_cache, monkeypatch,
                                                       capsys):
    """imagenet_f16_16384 + ViT-B-32 at full size (random weights) found in the cache by name."""
    import open_clip
    from conftest import lightning_checkpoint, save_lightning
    from test_vqgan import OFFICIAL_16384_YAML

    from vqclip.checkpoints import save_safetensors
    from vqclip.models.vqgan import VQGAN, read_vqgan_config

    entry = pretrained.VQGAN_MODELS["imagenet_f16_16384"]
    files = {k: dataclasses.replace(f, size=None, sha256=None) for k, f in entry["files"].items()}
    monkeypatch.setitem(pretrained.VQGAN_MODELS, "imagenet_f16_16384", {**entry, "files": files})
    folder = isolated_cache / "imagenet_f16_16384"
    folder.mkdir(parents=True)
    (folder / files["config"].filename).write_text(OFFICIAL_16384_YAML)
    torch.manual_seed(0)
    vqgan = VQGAN(read_vqgan_config(folder / files["config"].filename))
    save_lightning(lightning_checkpoint(vqgan.state_dict()), folder / files["ckpt"].filename)
    weights = pretrained.CLIP_MODELS["ViT-B-32/openai"]["files"]["weights"]
    save_safetensors(open_clip.create_model("ViT-B-32", force_quick_gelu=True).state_dict(),
                     isolated_cache / "ViT-B-32--openai" / weights.filename)
    del vqgan

    out = tmp_path / "x.png"
    code = main(["-q", "generate", "a lighthouse", "--size", "64", "48", "--cutn", "2",
                 "--steps", "2", "--output", str(out), "--seed", "0"])
    assert code == 0, capsys.readouterr().err
    text = read_png_text(out)
    assert (text["vqgan"], text["clip"]) == ("imagenet_f16_16384", "ViT-B-32/openai")
    with Image.open(out) as im:
        assert im.size == (64, 48)


def _image(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return tmp_path


@pytest.mark.parametrize("args, message", [
    (["a cat", "--init-image", "{tmp}/missing.png"], "image not found: .*missing.png"),
    (["a cat", "--image-prompt", "{tmp}/missing.png:0.5"], "image not found"),
    (["a cat", "--init-image", "{tmp}/broken.png"], "cannot read image .*broken.png"),
    (["a cat", "--image-prompt", "{tmp}/broken.png"], "cannot read image"),
    (["a||cat"], "empty prompt"),
    (["a cat:0"], "weight 0 has no effect"),
    (["a cat", "--noise-prompt", "x:1"], "SEED\\[:WEIGHT\\]"),
    (["a cat", "--size", "0", "256"], "each side must be in 1..4096"),
    (["a cat", "--size", "256", "99999"], "each side must be in 1..4096"),
    (["a cat", "--optimizer", "lion"], "unknown optimizer 'lion'; available: adam, adamw, sgd"),
    (["a cat", "--augments", "affine,swirl"], "unknown augmentation 'swirl'; available: affine"),
    (["a cat", "--vqgan", "imagenet_f16_9"],
     "unknown VQGAN 'imagenet_f16_9'; available: .*imagenet_f16_16384"),
    (["a cat", "--vqgan", "{tmp}/none.ckpt"], "VQGAN checkpoint not found"),
    (["a cat", "--clip", "ViT-Q-99"], "unknown CLIP architecture 'ViT-Q-99'; available: "),
    (["a cat", "--preset", "nope"], "unknown preset 'nope'; available: imagenet"),
    (["a cat", "--config", "{tmp}/none.yaml"], "config file not found"),
    (["a cat", "optim.lrr=1"], "Key 'lrr' not in 'OptimConfig'"),
    (["a cat", "--video", "{tmp}/v.avi"], "must end in .mp4 or .gif"),
    (["a cat", "--output", "{tmp}/folder.png", "--overwrite"], "folder.png is a folder"),
    (["a cat", "--video", "{tmp}/folder.png/../v.mp4", "--precision", "fp16"],
     "fp16 needs a GPU; on the CPU use bf16"),
    (["a", "red", "cat"], "one prompt only, got 3 words: quote it"),
    ([], "nothing to aim for"),
])
def test_user_errors_exit_2_with_one_line(args, message, tiny_models, tmp_path, capsys):
    tmp = _image(tmp_path)
    args = [a.replace("{tmp}", str(tmp)) for a in args]
    # the tiny models by default, so that the error is the one under test, not a missing download
    models = {k: v for k, v in tiny_models.items()
              if not any(a == f"--{k.replace('_', '-')}" for a in args)}
    if "--clip" in args:
        models = {k: v for k, v in models.items() if not k.startswith("clip")}
    code = main(["generate", *flags(models), *TINY_RUN, "--steps", "1", *args])  # args win
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("vqclip: error: "), err
    assert re.search(message, err), err


def test_existing_output_is_refused_then_overwritten_on_request(tiny_models, tmp_path, capsys):
    out = tmp_path / "o.png"
    out.write_bytes(b"keep me")
    run = ["generate", "x", *flags(tiny_models), *TINY_RUN, "--steps", "1", "--output", str(out)]
    assert main(run) == 2 and "exists" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert main([*run, "--overwrite"]) == 0 and read_png_text(out)["prompt"] == "x"


def test_bad_flag_values_exit_2_with_one_line(capsys):
    assert _exit_code(["generate", "x", "--steps", "many"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid int value: 'many'" in err


def _exit_code(argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code


def test_offline_default_preset_says_what_to_download(monkeypatch, capsys):
    monkeypatch.setenv("VQCLIP_OFFLINE", "1")
    assert main(["generate", "a red circle"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "Run `vqclip download imagenet_f16_16384 ViT-B-32/openai` while online" in err


def test_failed_download_is_one_line_naming_the_command(server, monkeypatch, capsys):
    entry = pretrained.VQGAN_MODELS["imagenet_f16_16384"]
    files = {k: dataclasses.replace(f, url=f"{server.url}/gone/{f.filename}")
             for k, f in entry["files"].items()}
    monkeypatch.setitem(pretrained.VQGAN_MODELS, "imagenet_f16_16384", {**entry, "files": files})
    assert main(["-q", "generate", "a red circle"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HTTP 404" in err and "vqclip download imagenet_f16_16384" in err


def test_nan_loss_exits_1_with_one_line_and_no_image(tiny_models, tmp_path, monkeypatch, capsys):
    import vqclip.generator as g

    monkeypatch.setattr(g, "prompt_loss", lambda e, *a, **k: e.sum((1, 2)) * float("nan"))
    code = main(["generate", "x", *flags(tiny_models), *TINY_RUN, "--steps", "3",
                 "--output", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "loss became [nan] at step 0" in err
    assert not any(tmp_path.iterdir())


def test_user_error_in_a_real_process_has_no_traceback(tmp_path):
    proc = cli_process("generate", "a cat", "--init-image", str(tmp_path / "missing.png"))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [f"vqclip: error: image not found: {tmp_path / 'missing.png'}"]


def test_ctrl_c_keeps_the_image_and_the_video_so_far_and_resume_goes_on_bit_for_bit(
        tiny_models, tmp_path):
    import imageio.v3 as iio

    out, video = tmp_path / "o.png", tmp_path / "o.mp4"
    proc = cli_process("-q", "generate", "x", *flags(tiny_models), *TINY_RUN, "--steps", "100000",
                       "--save-every", "1", "--output", str(out), "--video", str(video),
                       cwd=tmp_path, interruptible=True)
    wait_for(proc, lambda: list(tmp_path.glob(".o.tmp-*.mp4")))  # frames are written: it runs
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: to the whole group, ffmpeg included
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "interrupted after" in err
    steps = int(read_png_text(out)["steps_done"])
    assert 0 < steps < 100000 and read_png_text(out)["interrupted"] == "True"
    frames = iio.imread(video, index=None, plugin="FFMPEG")
    assert frames.shape[0] == steps + 1  # a frame per step, plus the final image
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == [
        "o.mp4", "o.png", "o.state.safetensors", "o.yaml"]

    # --resume goes on to 3 more steps as if never stopped; the video of the first part stays
    shown = video.read_bytes()
    assert main(["-q", "generate", "--resume", str(out), "--steps", str(steps + 3)]) == 0
    assert main(["-q", "generate", "x", *flags(tiny_models), *TINY_RUN, "--steps", str(steps + 3),
                 "--output", str(tmp_path / "u.png")]) == 0
    assert torch.equal(to_tensor(Image.open(out)), to_tensor(Image.open(tmp_path / "u.png")))
    resumed, whole = (read_state(tmp_path / f"{n}.state.safetensors", "generation")[1]
                      for n in "ou")
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert read_png_text(out)["steps_done"] == str(steps + 3) and video.read_bytes() == shown


def test_no_prompt_fails_before_any_model_is_loaded_or_downloaded(capsys):
    # the default preset's models are not in the (empty, isolated) cache: reaching them would
    # fail with a download error instead
    assert main(["generate", "--steps", "3"]) == 2
    assert capsys.readouterr().err == ("vqclip: error: nothing to aim for: give a text prompt, an "
                                       "image prompt or a noise prompt\n")


def test_output_problems_are_found_before_the_models_load(tmp_path, capsys):
    # the default preset's models are not in the cache: reaching them would be a download error
    (tmp_path / "taken.png").write_bytes(b"x")
    assert main(["generate", "x", "--output", str(tmp_path / "taken.png")]) == 2
    assert "taken.png exists" in capsys.readouterr().err


def test_quiet_after_the_command_and_prompts_with_equals_signs(tiny_models, tmp_path, capsys):
    out = tmp_path / "e.png"
    assert main(["generate", "-q", "E=mc2 poster", *flags(tiny_models), *TINY_RUN, "steps=1",
                 "--output", str(out)]) == 0
    assert read_png_text(out)["prompt"] == "E=mc2 poster"
    assert "generate:" not in capsys.readouterr().err  # no progress bar


def test_a_failed_run_leaves_no_empty_run_folder(tiny_models, tmp_path, monkeypatch, capsys):
    import vqclip.generator as g

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(g, "prompt_loss", lambda e, *a, **k: e.sum((1, 2)) * float("nan"))
    assert main(["generate", "x", *flags(tiny_models), *TINY_RUN, "steps=2"]) == 1
    assert list((tmp_path / "outputs").iterdir()) == []


def test_a_refused_video_path_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "v.mp4").write_bytes(b"old")
    assert main(["generate", "x", "--video", "v.mp4"]) == 2
    assert "v.mp4 exists" in capsys.readouterr().err
    assert list((tmp_path / "outputs").iterdir()) == []


def test_best_only_saves_the_best_ranked_candidate_alone(tiny_models, tmp_path):
    import json

    run = ["-q", "generate", *flags(tiny_models), *TINY_RUN, "--steps", "2", "--candidates", "3",
           "--seed", "4"]
    assert main([*run, "x", "--output", str(tmp_path / "all.png")]) == 0
    ranking = json.loads((tmp_path / "all-ranking.json").read_text())
    assert main([*run, "x", "--best-only", "--output", str(tmp_path / "best.png")]) == 0
    assert sorted(p.name for p in tmp_path.glob("best*")) == [
        "best.png", "best.state.safetensors", "best.yaml"]
    assert torch.equal(to_tensor(Image.open(tmp_path / "best.png")),
                       to_tensor(Image.open(ranking["best"])))
    text = read_png_text(tmp_path / "best.png")
    assert text["rank"] == "1" and text["candidate"] == str(ranking["candidates"][0]["candidate"])
    assert ranking["candidates"][0]["candidate"] != 0  # so that the check above can fail
    # with no text prompt nothing ranks: the lowest last loss is the best
    assert main([*run, "--noise-prompt", "2:1", "--output", str(tmp_path / "n.png")]) == 0
    losses = read_state(tmp_path / "n.state.safetensors", "generation")[1]["losses"][-1]
    assert int(losses.argmin()) != 0  # so that keeping candidate 0 would fail
    assert main([*run, "--noise-prompt", "2:1", "--best-only", "--output", str(tmp_path / "b.png")]) == 0
    assert sorted(p.name for p in tmp_path.glob("b*.png")) == ["b.png", "best.png"]
    assert torch.equal(to_tensor(Image.open(tmp_path / "b.png")),
                       to_tensor(Image.open(tmp_path / f"n-{int(losses.argmin())}.png")))
