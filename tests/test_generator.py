"""The generation loop with tiny random-weight models through the real loaders."""

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from vqclip.generator import GenerationError, GenerationInterrupted, Generator
from vqclip.images import load_image, read_png_text, to_tensor

SMALL = dict(size=[32, 32], cutn=4, seed=1)


def test_loss_decreases(tiny_generator):
    result = tiny_generator.generate(prompt="a red circle", steps=40, augments=[], lr=0.2, **SMALL)
    losses = result.losses[:, 0]
    assert result.losses.shape == (40, 1)
    assert losses[-5:].mean() < losses[:5].mean() - 0.01


def test_same_seed_is_bitwise_identical_on_cpu(tiny_generator):
    runs = [tiny_generator.generate(prompt="a red circle:1|a blue square:-0.5", steps=6, **SMALL)
            for _ in range(2)]
    assert torch.equal(runs[0].tensor, runs[1].tensor)
    assert torch.equal(runs[0].losses, runs[1].losses)
    other = tiny_generator.generate(prompt="a red circle:1|a blue square:-0.5", steps=6,
                                    **{**SMALL, "seed": 2})
    assert not torch.equal(runs[0].tensor, other.tensor)


def test_candidate_batch_equals_single_runs_with_the_same_seeds(tiny_generator):
    # Equal up to float rounding: a batched matmul may sum in another order than a single one.
    # Rounding can flip a latent to another code at the quantizer's decision boundary and then
    # differ visibly; these settings stay clear of that (all five augmentations together flip
    # one code of one candidate at step 2 with these tiny random models). In fp32: bf16 keeps 8
    # bits, its sums in another order move the loss by about 4e-3 and flip codes within these
    # 5 steps (measured on an AVX512-BF16 EPYC), and which seed a candidate follows does not
    # depend on the precision.
    kw = dict(prompt="a green triangle", steps=5, size=[32, 32], cutn=4, precision="fp32",
              augments=["affine", "perspective", "erasing", "noise"])
    batch = tiny_generator.generate(seed=10, candidates=3, **kw)
    assert batch.tensor.shape == (3, 3, 32, 32) and batch.seeds == [10, 11, 12]
    for k in range(3):
        single = tiny_generator.generate(seed=10 + k, **kw)
        torch.testing.assert_close(batch.losses[:, k], single.losses[:, 0], atol=1e-5, rtol=0)
        torch.testing.assert_close(batch.tensor[k], single.tensor[0], atol=1e-4, rtol=0)
    assert not torch.allclose(batch.tensor[0], batch.tensor[1])


def test_gradients_reach_the_latents(tiny_generator):
    grads = []
    tiny_generator.generate(prompt="x", steps=2, callback=lambda step, info: grads.append(
        info["z"].clone()), **SMALL)
    assert not torch.equal(grads[0], grads[1])  # z moved: the gradient got through


def test_callback_gets_step_image_loss_and_z(tiny_generator):
    seen = []
    tiny_generator.generate(prompt="x", steps=3, candidates=2, callback=lambda s, i: seen.append(
        (s, i["image"].shape, i["loss"].shape, i["z"].shape)), **SMALL)
    assert seen == [(s, (2, 3, 32, 32), (2,), (2, 4, 16, 16)) for s in range(3)]


def test_latents_stay_in_the_codebook_range(tiny_generator):
    book = tiny_generator.vqgan.codebook
    zs = []
    tiny_generator.generate(prompt="x", steps=5, lr=5.0, callback=lambda s, i: zs.append(i["z"]),
                            **SMALL)
    lo, hi = book.min(0).values.view(1, -1, 1, 1), book.max(0).values.view(1, -1, 1, 1)
    assert all(((z >= lo) & (z <= hi)).all() for z in zs)


def test_size_is_rounded_to_the_vqgan_factor(tiny_generator, caplog):
    caplog.set_level("INFO", logger="vqclip")
    result = tiny_generator.generate(prompt="x", steps=1, size=[33, 30], cutn=2, seed=0)
    assert result.config.size == [34, 30] and result.images[0].size == (34, 30)
    assert "rounded" in caplog.text


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd", "radam", "rmsprop"])
def test_every_optimizer_runs(tiny_generator, optimizer):
    result = tiny_generator.generate(prompt="x", steps=2, optimizer=optimizer, **SMALL)
    assert result.losses.shape == (2, 1) and torch.isfinite(result.losses).all()


def test_image_noise_and_init_prompts(tiny_generator, tmp_path):
    Image.new("RGB", (40, 30), (200, 20, 20)).save(tmp_path / "red.png")
    Image.new("RGB", (32, 32), (20, 20, 200)).save(tmp_path / "blue.png")
    result = tiny_generator.generate(
        prompt="", image_prompts=[f"{tmp_path / 'red.png'}:2"], noise_prompts=["7:0.5"],
        init_image=str(tmp_path / "blue.png"), init_weight=0.5, steps=2, **SMALL)
    assert result.losses.shape == (2, 1)
    # starting from the encoded init image: the first callback image is its reconstruction
    # (in fp32, as the expected one is decoded; auto may mean bf16 on this CPU)
    start = []
    tiny_generator.generate(prompt="x", init_image=str(tmp_path / "blue.png"), steps=1,
                            precision="fp32", callback=lambda s, i: start.append(i["image"]),
                            **SMALL)
    z = tiny_generator.vqgan.encode(torch.tensor([0.078, 0.078, 0.784]).view(1, 3, 1, 1).expand(
        1, 3, 32, 32))
    expected = tiny_generator.vqgan.decode(tiny_generator.vqgan.quantize_latents(z))
    torch.testing.assert_close(start[0], expected, atol=0.01, rtol=0)


def test_nothing_to_aim_for_is_an_error(tiny_generator):
    with pytest.raises(ValueError, match="nothing to aim for"):
        tiny_generator.generate(prompt="", steps=1, **SMALL)


def test_nan_loss_stops_with_a_clear_message_and_writes_no_image(tiny_generator, tmp_path,
                                                                 monkeypatch):
    import vqclip.generator as g

    monkeypatch.setattr(g, "prompt_loss", lambda e, *a, **k: e.sum((1, 2)) * float("nan"))
    with pytest.raises(GenerationError, match="loss became .*nan.* at step 0.*lower lr"):
        tiny_generator.generate(prompt="x", steps=3, output=str(tmp_path / "o.png"),
                                video=str(tmp_path / "o.mp4"), **SMALL)
    assert list(tmp_path.iterdir()) == []  # no image, no half-written video


def test_out_of_memory_names_the_knobs(tiny_generator, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    # on the class: under bf16 the loop encodes with a copy of this CLIP (a low-precision one)
    monkeypatch.setattr(type(tiny_generator.clip), "encode_image", oom)
    with pytest.raises(GenerationError, match="out of memory on cpu at 32x32 with cutn 4 and 1 "
                                              "candidate.*--size, --cutn or --candidates"):
        tiny_generator.generate(prompt="x", steps=1, **SMALL)


def test_interrupt_keeps_the_current_image_and_video(tiny_generator, tmp_path):
    def stop(step, info):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(GenerationInterrupted) as info:
        tiny_generator.generate(prompt="x", steps=50, save_every=1, callback=stop,
                                output=str(tmp_path / "o.png"), video=str(tmp_path / "o.mp4"),
                                **SMALL)
    result = info.value.result
    assert result.interrupted and result.steps_done == 4
    assert (tmp_path / "o.png").is_file() and (tmp_path / "o.mp4").is_file()
    assert read_png_text(tmp_path / "o.png")["interrupted"] == "True"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.mp4", "o.png", "o.state.safetensors",
                                                          "o.yaml"]


def test_png_metadata_round_trips(tiny_generator, tmp_path):
    result = tiny_generator.generate(prompt="a 16\\:9 red circle:2", steps=2, candidates=2,
                                     output=str(tmp_path / "out.png"), **SMALL)
    assert [p.name for p in result.files] == ["out-0.png", "out-0.yaml", "out-1.png", "out-1.yaml",
                                              "out-ranking.json", "out.state.safetensors"]
    text = read_png_text(tmp_path / "out-1.png")
    assert text["prompt"] == "a 16\\:9 red circle:2" and text["seed"] == "2"
    assert text["vqgan"].endswith("vqgan.safetensors") and text["clip"].startswith("vqclip-test-tiny/")
    config = OmegaConf.create(text["config"])
    assert config == result.config and config.seed == 1 and config.size == [32, 32]
    sidecar = OmegaConf.load(tmp_path / "out-1.yaml")
    assert OmegaConf.to_container(sidecar) == {**result.info(1)}
    assert torch.equal(to_tensor(load_image(tmp_path / "out-1.png")), to_tensor(result.images[1]))


def test_outputs_are_not_overwritten_unless_asked(tiny_generator, tmp_path):
    (tmp_path / "o.png").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="o.png exists.*--overwrite"):
        tiny_generator.generate(prompt="x", steps=1, output=str(tmp_path / "o.png"), **SMALL)
    assert (tmp_path / "o.png").read_bytes() == b"precious"
    tiny_generator.generate(prompt="x", steps=1, output=str(tmp_path / "o.png"), overwrite=True,
                            **SMALL)
    assert read_png_text(tmp_path / "o.png")["prompt"] == "x"


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_video_has_one_frame_per_save_every_plus_the_final(tiny_generator, tmp_path, suffix):
    import imageio.v3 as iio

    path = tmp_path / f"v{suffix}"
    tiny_generator.generate(prompt="x", steps=9, save_every=2, candidates=2, video=str(path),
                            **SMALL)
    frames = iio.imread(path, index=None, **({"plugin": "FFMPEG"} if suffix == ".mp4" else {}))
    assert frames.shape[0] == len(range(0, 9, 2)) + 1
    assert frames.shape[1:3] == (2 + 32 + 2, 2 + 32 + 2 + 32 + 2)  # candidates side by side, padded
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary left


def test_generator_refuses_a_config_for_other_models(tiny_generator):
    other = OmegaConf.merge(tiny_generator.config, {"models": {"vqgan": "imagenet_f16_16384"}})
    with pytest.raises(ValueError, match="this Generator holds"):
        tiny_generator.generate("x", config=other, steps=1)
    with pytest.raises(ValueError, match="runs on cpu"):
        tiny_generator.generate("x", device="cuda:3", steps=1)


def test_defaults_come_from_the_generator_config(tiny_models):
    gen = Generator.load(**tiny_models, steps=3, cutn=2, size=[16, 16], prompt="a cat")
    result = gen.generate(seed=0)
    assert result.steps_done == 3 and result.images[0].size == (16, 16)
    assert result.config.prompts.text == "a cat" and result.timings["per_step"] > 0


def test_bf16_runs_on_the_cpu_and_fp16_asks_for_a_gpu(tiny_generator):
    full = tiny_generator.generate(prompt="x", steps=3, precision="fp32", **SMALL)
    half = tiny_generator.generate(prompt="x", steps=3, precision="bf16", **SMALL)
    assert half.tensor.dtype == torch.float32 and torch.isfinite(half.losses).all()
    assert not torch.equal(full.losses, half.losses)  # autocast really ran in bf16
    torch.testing.assert_close(full.losses[0], half.losses[0], atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="fp16 needs a GPU; on the CPU use bf16"):
        tiny_generator.generate(prompt="x", steps=1, precision="fp16", **SMALL)


def test_a_nan_from_the_last_update_is_an_error_not_a_black_image(tiny_generator, tmp_path,
                                                                  monkeypatch):
    real_step = torch.optim.Adam.step

    def poisoned(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        self.param_groups[0]["params"][0].data[0, 0, 0, 0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", poisoned)
    with pytest.raises(GenerationError, match="latents became NaN or inf in step 0's update"):
        tiny_generator.generate("x", steps=1, output=str(tmp_path / "o.png"), **SMALL)
    assert not any(tmp_path.iterdir())


def test_prompt_is_the_first_argument(tiny_generator):
    result = tiny_generator.generate("a red circle:1|blue:-0.5", steps=1, **SMALL)
    assert result.config.prompts.text == "a red circle:1|blue:-0.5"


def test_flat_init_is_one_code_everywhere(tiny_generator):
    from vqclip.cutouts import SeedStreams
    from vqclip.prompts import init_latents

    cfg = tiny_generator.config.copy()
    cfg.size, cfg.candidates = [32, 32], 2
    starts = {}
    for init in ("flat", "random"):
        cfg.prompts.init = init
        z = init_latents(tiny_generator.vqgan, cfg, SeedStreams([1, 2]), 'cpu').flatten(2)  # (K, D, cells)
        starts[init] = torch.equal(z, z[:, :, :1].expand_as(z))
    assert starts == {"flat": True, "random": False}
    tiny_generator.generate("a plain start", steps=2, init="flat", **SMALL)
    with pytest.raises(ValueError, match="unknown init 'plain'; available: random, flat, gray"):
        tiny_generator.generate("x", steps=1, init="plain", **SMALL)


def test_gray_init_is_a_gray_image_encoded_the_same_for_every_seed(tiny_generator):
    from vqclip.cutouts import SeedStreams
    from vqclip.prompts import init_latents

    cfg = tiny_generator.config.copy()
    cfg.size, cfg.candidates, cfg.prompts.init = [32, 32], 2, "gray"
    z = init_latents(tiny_generator.vqgan, cfg, SeedStreams([1, 2]), 'cpu')
    gray = tiny_generator.vqgan.encode(torch.full((1, 3, 32, 32), 0.5))
    assert torch.equal(z[0], z[1]) and torch.allclose(z[:1], gray)


def test_denoise_removes_a_speck_and_keeps_a_large_object():
    # through the round trip of the bundled VQGAN, which keeps a 3-pixel speck (blurred a little)
    gen = Generator.load(preset="shapes", download=False)
    gen.config.denoise_size = 7
    vqgan = gen.vqgan
    image = torch.full((1, 3, 64, 64), 0.5)
    image[:, :, 20:44, 20:44] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]  # a red square
    image[:, :, 4:7, 50:53] = 1.0  # a white speck
    z = vqgan.encode(image)
    before = vqgan.decode(vqgan.quantize_latents(z))
    gen.denoise(gen.config, z)
    after = vqgan.decode(vqgan.quantize_latents(z))
    assert (before[0, :, 4:7, 50:53] - 0.5).abs().max() > 0.3
    assert (after[0, :, 2:10, 48:56] - 0.5).abs().max() < 0.1
    assert (after[0, :, 24:40, 24:40] - image[0, :, 24:40, 24:40]).abs().max() < 0.1


def test_denoise_setting_runs_and_is_checked(tiny_generator):
    tiny_generator.generate("a plain start", steps=4, denoise_every=2, denoise_size=3, **SMALL)
    for bad, match in [(dict(denoise_every=-1), "denoise_every must be >= 0"),
                       (dict(denoise_size=4), "denoise_size must be an odd number >= 3, got 4")]:
        with pytest.raises(ValueError, match=match):
            tiny_generator.generate("x", steps=1, **bad, **SMALL)


def test_the_loop_reads_the_device_every_few_steps_not_every_step(tiny_generator, monkeypatch):
    """Each read (.item(), .cpu(), .tolist()) waits for a GPU to finish: the loop reads the losses
    once per LOSS_EVERY steps, so 10 more steps add one read of each kind, not ten. (Adam's own
    step counter is a host tensor unless capturable: its .item() waits for nothing.)"""
    import traceback

    from vqclip.generator import LOSS_EVERY

    calls = []

    def counted(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = traceback.extract_stack(limit=2)[0].filename
            if "torch/optim/" not in caller:
                calls.append(name)
            return real(self, *args, **kwargs)
        return read

    for name in ("item", "cpu", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))

    def reads(steps):
        calls.clear()
        tiny_generator.generate("x", steps=steps, **SMALL)
        return len(calls)

    assert LOSS_EVERY == 10
    assert reads(20) - reads(10) <= 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_step_never_waits_for_the_device(tiny_models):
    tiny = Generator.load(**{**tiny_models, "device": "cuda"})
    torch.cuda.set_sync_debug_mode("error")  # raises on any synchronizing call
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            torch.ones(1, device="cuda").item()  # the mode is on
        cfg = tiny.config.copy()
        cfg.size, cfg.seed, cfg.cutouts.cutn = [32, 32], 0, 4
        cfg.prompts.text = "x"
        tiny._settle(cfg)
        torch.cuda.set_sync_debug_mode(0)
        streams, cutouts, targets, z = tiny._prepare(cfg, [0])
        opt = torch.optim.Adam([z], lr=0.1)
        torch.cuda.set_sync_debug_mode("error")
        for _ in range(3):
            tiny._step(cfg, z, z.detach(), opt, cutouts, streams, targets)
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_ctrl_c_between_loss_reads_still_refuses_a_nan_image(tiny_generator, tmp_path,
                                                             monkeypatch):
    import vqclip.generator as g

    monkeypatch.setattr(g, "prompt_loss", lambda e, *a, **k: e.sum((1, 2)) * float("nan"))

    def ctrl_c(step, info):
        if step == 2:  # before the first read of the losses, at step 9
            raise KeyboardInterrupt

    with pytest.raises(GenerationError, match="loss became .*nan.* at step 0"):
        tiny_generator.generate("x", steps=20, output=str(tmp_path / "o.png"), callback=ctrl_c,
                                **SMALL)
    assert list(tmp_path.iterdir()) == []
