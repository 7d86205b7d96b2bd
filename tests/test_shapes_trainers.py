"""Training of the shapes models: a few real steps, the loss falls, the checkpoints load back."""

import json

import pytest
import torch

from vqclip.models.clip import load_clip
from vqclip.models.vqgan import load_vqgan
from vqclip.shapes.clip_trainer import SHAPES_CLIP_ARCH, train_clip
from vqclip.shapes.vqgan_trainer import SHAPES_VQGAN_CONFIG, train_vqgan


def _losses(log):
    return [json.loads(line)["loss"] for line in log.read_text().splitlines()]


def test_vqgan_training_smoke(tmp_path):
    torch.set_num_threads(1)  # the runs are deterministic on one thread, so this test is too
    log = tmp_path / "vq.jsonl"
    out = train_vqgan(tmp_path / "vq.safetensors", steps=12, batch_size=4, lr=2e-3, save_every=6,
                      progress=False, log_file=log, log_every=1)
    losses = _losses(log)
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    model = load_vqgan(out)  # the vqclip safetensors format, config in the header
    assert model.codebook.shape == (SHAPES_VQGAN_CONFIG.n_embed, 32) and model.downsample_factor == 4
    with torch.no_grad():
        image = model.decode(model.quantize_latents(model.encode(torch.rand(1, 3, 64, 64))))
    assert image.shape == (1, 3, 64, 64)


def test_clip_training_smoke(tmp_path):
    torch.set_num_threads(1)
    log = tmp_path / "clip.jsonl"
    out = train_clip(tmp_path / "clip.safetensors", steps=8, batch_size=16, save_every=4,
                     progress=False, log_file=log, log_every=1)
    losses = _losses(log)
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2])
    clip = load_clip(SHAPES_CLIP_ARCH, out, config=tmp_path / f"{SHAPES_CLIP_ARCH}.json")
    assert clip.input_size == 64
    assert clip.tokenizer(["a red circle"]).shape == (1, 32)  # open_clip's BPE, short context


def test_the_resnet_family_trains_through_the_command_and_loads_as_another_clip(tmp_path,
                                                                               capsys):
    from vqclip.cli import main

    out, log = tmp_path / "rn.safetensors", tmp_path / "rn.jsonl"
    assert main(["-q", "train", "shapes-clip", "--family", "resnet", "--steps", "6",
                 "--batch-size", "16", "--threads", "1", "--out", str(out), "--log", str(log)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    clip = load_clip("vqclip-shapes-rn", out, config=tmp_path / "vqclip-shapes-rn.json")
    assert type(clip.model.visual).__name__ == "ModifiedResNet" and clip.input_size == 64
    with torch.no_grad():
        assert clip.encode_image(torch.rand(2, 3, 64, 64)).shape == (2, 64)  # the ViT's width
    assert main(["train", "shapes-vqgan", "--family", "resnet"]) == 2  # for shapes-clip only


def test_train_command(tmp_path, capsys):
    from vqclip.cli import main

    out = tmp_path / "v.safetensors"
    assert main(["-q", "train", "shapes-vqgan", "--steps", "2", "--batch-size", "2", "--out",
                 str(out), "--threads", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(out) and load_vqgan(out).downsample_factor == 4


def test_mined_negatives_feed_clip_training(tiny_generator, tmp_path):
    from vqclip.shapes.clip_trainer import mine_negatives

    # random tiny models make nothing the judge accepts: every try is a negative
    negatives = mine_negatives(tiny_generator, n=3, steps=1, size=[64, 64], cutn=2)
    assert negatives.shape == (3, 3, 64, 64)
    runs = []
    generate = tiny_generator.generate
    tiny_generator.generate = lambda *a, **k: runs.append(1) or generate(*a, **k)
    try:  # three snapshots of one run: after steps 1 and 3, and the final image
        snaps = mine_negatives(tiny_generator, n=3, steps=5, snapshots=3, size=[64, 64], cutn=2)
    finally:
        del tiny_generator.generate
    assert snaps.shape == (3, 3, 64, 64) and len(runs) == 1
    assert not torch.equal(snaps[0], snaps[2])
    log = tmp_path / "clip.jsonl"
    train_clip(tmp_path / "clip.safetensors", steps=2, batch_size=8, progress=False,
               negatives=lambda step: negatives, log_file=log, log_every=1)
    assert len(_losses(log)) == 2


def test_train_command_refuses_wrong_files_in_one_line(tmp_path, capsys):
    from vqclip.cli import main

    vqgan = tmp_path / "v.safetensors"
    assert main(["-q", "train", "shapes-vqgan", "--steps", "1", "--batch-size", "1", "--out",
                 str(vqgan), "--threads", "1"]) == 0
    capsys.readouterr()
    out = str(tmp_path / "c.safetensors")
    for flag, message in (("--init", "weights do not fit the vqclip-shapes CLIP; missing keys"),
                          ("--negatives", "no mined negatives here")):
        assert main(["-q", "train", "shapes-clip", "--steps", "1", "--out", out, flag,
                     str(vqgan)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_attack_stays_within_eps_and_raises_the_loss():
    from vqclip.shapes.clip_trainer import _attack

    torch.manual_seed(0)
    w = torch.randn(3 * 8 * 8)
    images = torch.rand(4, 3, 8, 8) * 0.8 + 0.1  # away from 0 and 1, so clamping takes nothing

    def loss(x):
        return (x.flatten(1) @ w).sum()

    attacked = _attack(loss, images, eps=0.05, steps=3)
    assert (attacked - images).abs().max() <= 0.05 + 1e-6
    assert loss(attacked) > loss(images) + 0.5 * 0.05 * w.abs().sum() * 4  # most of the way there


def test_adversarial_clip_training_runs_from_the_command_line(tmp_path, capsys):
    from vqclip.cli import main

    out, log = tmp_path / "c.safetensors", tmp_path / "c.jsonl"
    assert main(["-q", "train", "shapes-clip", "--steps", "2", "--batch-size", "8", "--clutter", "4",
                 "--adversarial", "0.03", "--clean-weight", "0.5", "--out", str(out), "--threads", "1",
                 "--log", str(log)]) == 0
    assert out.is_file() and len(_losses(log)) == 1


def test_clip_fine_tuning_on_the_loop_banks_judged_images_and_repeats(tmp_path):
    from vqclip.generator import Generator
    from vqclip.shapes.loop_trainer import train_clip_on_loop

    torch.set_num_threads(1)

    def run(name):
        # 4 chains of a 4-step loop, judged every 2 steps: each run is judged twice, then restarts
        log = tmp_path / f"{name}.jsonl"
        out = train_clip_on_loop(tmp_path / f"{name}.safetensors", steps=5, chains=4, batch_size=8,
                                 negatives=8, positives=2, clutter=2, renders_per_label=1,
                                 workers=1, judge_every=2, device="cpu", loop_overrides=("steps=4",),
                                 progress=False, log_file=log, log_every=1)
        records = [json.loads(line) for line in log.read_text().splitlines()]
        return load_clip(SHAPES_CLIP_ARCH, out, config=tmp_path / f"{SHAPES_CLIP_ARCH}.json"), records

    tuned, records = run("a")
    assert [r["step"] for r in records] == list(range(5))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    # images 2 steps from gray are no shapes: the judge sends them to the negatives
    assert records[-1]["negatives"] > 0 and records[-1]["finals"] > 0
    shipped = Generator.load(preset="shapes", device="cpu").clip
    weights = [tuned.model.state_dict(), shipped.model.state_dict()]
    assert any(not torch.equal(a, b.to(a.dtype)) for a, b in zip(*map(dict.values, weights),
                                                                  strict=True))
    again, records_again = run("b")  # the same seed: the same run, the judge's timing aside
    assert [r["loss"] for r in records_again] == [r["loss"] for r in records]
    assert all(torch.equal(a, b) for a, b in zip(tuned.model.state_dict().values(),
                                                 again.model.state_dict().values(), strict=True))


def test_clip_fine_tuning_on_the_loop_can_start_on_clean_renders(tmp_path):
    from vqclip.shapes.loop_trainer import train_clip_on_loop

    torch.set_num_threads(1)

    def accepted(start):
        # one-step runs: from gray no shape forms in one step; from a clean render it survives one
        log = tmp_path / f"{start}.jsonl"
        train_clip_on_loop(tmp_path / f"{start}.safetensors", steps=2, chains=8, batch_size=8,
                           negatives=8, positives=2, clutter=2, renders_per_label=1, workers=1,
                           judge_every=1, device="cpu", loop_overrides=("optim.steps=1",),
                           progress=False, log_file=log, log_every=1, start=start)
        return json.loads(log.read_text().splitlines()[-1])["positives"]

    assert accepted("gray") == 0
    assert accepted("render") >= 4
    with pytest.raises(ValueError, match="start must be gray or render"):
        train_clip_on_loop(tmp_path / "x.safetensors", start="noise", device="cpu")


def test_train_command_refuses_options_of_another_model(tmp_path, capsys):
    from vqclip.cli import main

    for argv, message in ((["shapes-vqgan", "--chains", "8"], "--chains is for shapes-clip-loop"),
                          (["shapes-clip-loop", "--clutter", "4"], "--clutter is for shapes-clip,"),
                          (["shapes-clip", "--workers", "2"], "--workers is for shapes-clip-loop"),
                          (["shapes-vqgan", "--init", "x.safetensors"],
                           "--init is for shapes-clip and shapes-clip-loop, not shapes-vqgan")):
        assert main(["-q", "train", *argv, "--out", str(tmp_path / "x.safetensors")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())


def test_train_command_refuses_bad_loop_settings_before_writing_anything(tmp_path, capsys):
    from vqclip.cli import main

    out = tmp_path / "x.safetensors"
    assert main(["-q", "train", "shapes-clip-loop", "--workers", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "workers must be at least 1" in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())


def test_train_command_passes_loop_options_through(tmp_path, monkeypatch, capsys):
    from vqclip.cli import main
    from vqclip.shapes import loop_trainer

    seen = {}
    monkeypatch.setattr(loop_trainer, "train_clip_on_loop", lambda out, **kw: seen.update(kw, out=out) or out)
    assert main(["-q", "train", "shapes-clip-loop", "--init", "a.safetensors", "--chains", "64",
                 "--minutes", "1.5", "--device", "cpu", "--steps", "7", "--workers", "3",
                 "--start", "render", "--out",
                 str(tmp_path / "o.safetensors")]) == 0
    assert seen["init"] == "a.safetensors" and seen["chains"] == 64 and seen["time_limit"] == 90
    assert seen["device"] == "cpu" and seen["steps"] == 7 and seen["out"] == tmp_path / "o.safetensors"
    assert seen["workers"] == 3 and seen["start"] == "render"
