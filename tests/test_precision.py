"""Precision: what `auto` chooses, that it is recorded, and that bf16 agrees with fp32 on a step
with the latents and cutouts fixed (loss within 1%, gradient on z at cosine >= 0.99)."""

import pytest
import torch

from vqclip.bench import loss_at, precision_agreement, random_generator
from vqclip.device import resolve_precision
from vqclip.generator import Generator

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_is_bf16_only_on_cpus_with_bf16_arithmetic(monkeypatch):
    for avx512_bf16, amx, expected in ((False, False, "fp32"), (True, False, "bf16"),
                                       (False, True, "bf16")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert resolve_precision("auto", CPU) == expected
        assert resolve_precision("auto", CUDA) == "fp32"  # bf16 was no faster on an H100
        assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_precision("fp16", CPU)


def test_the_precision_that_ran_is_recorded(tiny_generator, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    result = tiny_generator.generate("x", steps=1, seed=0, size=[32, 32], cutn=2, precision="auto")
    assert result.config.precision == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    result = tiny_generator.generate("x", steps=1, seed=0, size=[32, 32], cutn=2, precision="auto")
    assert result.config.precision == "bf16"


def test_loss_at_is_the_first_step_of_a_run(tiny_generator):
    loss, grad = loss_at(tiny_generator, "a red circle", seed=3, size=[32, 32], cutn=2,
                                        precision="fp32")
    seen = []
    tiny_generator.generate("a red circle", seed=3, size=[32, 32], cutn=2, precision="fp32",
                            steps=1, callback=lambda step, info: seen.append(info["loss"]))
    assert torch.equal(loss, seen[0]) and grad.shape[0] == 1
    assert (grad.abs().sum(1) > 0).all()  # every latent cell's footprint is seen by some cutout
    with pytest.raises(ValueError, match="needs a seed"):
        loss_at(tiny_generator, "x", size=[32, 32], cutn=2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_agrees_with_fp32_on_the_bundled_pair(seed):
    gen = Generator.load(preset="shapes", download=False)
    check = precision_agreement(gen, "bf16", prompt="a red circle", seed=seed)
    assert check["loss_rel_diff"] < 0.01 and check["grad_cosine"] >= 0.99, check


def test_bf16_agrees_with_fp32_on_the_official_architectures():
    """imagenet_f16_16384 + ViT-B/32 (random weights) at 64x64 with 4 cutouts, every default
    augmentation: small, since CPUs without bf16 arithmetic emulate it slowly."""
    gen = random_generator("cpu")
    check = precision_agreement(gen, "bf16", prompt="a red circle", seed=0, size=[64, 64], cutn=4)
    assert check["loss_rel_diff"] < 0.01 and check["grad_cosine"] >= 0.99, check


def test_low_precision_copies_round_as_autocast_and_follow_the_weights(tiny_generator):
    """The loop's bf16 copies of the decoder and CLIP's image tower: the originals untouched, the
    norms in fp32, the same images and embeddings as autocast over the fp32 models, and a new
    copy once a weight changes in place."""
    from vqclip.models.low_precision import LowPrecisionCopies

    vqgan, clip = tiny_generator.vqgan, tiny_generator.clip
    copies = LowPrecisionCopies()
    twin = copies.get(vqgan, ["post_quant_conv", "decoder"], torch.bfloat16)
    assert copies.get(vqgan, ["post_quant_conv", "decoder"], torch.bfloat16) is twin  # made once
    assert twin.encoder is vqgan.encoder and twin.decoder is not vqgan.decoder
    assert twin.decoder.conv_in.weight.dtype == torch.bfloat16
    assert twin.decoder.norm_out.weight.dtype == torch.float32  # as autocast leaves norms
    assert all(p.dtype == torch.float32 for p in vqgan.parameters())

    assert not any(p.requires_grad for p in twin.decoder.parameters())
    z0 = torch.randn(2, vqgan.embed_dim, 4, 4, generator=torch.Generator().manual_seed(0))
    grads = []
    for model in (twin, vqgan):  # forward and backward, with the decoder checkpointed
        z = z0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            image = model.decode(z, checkpoint=True)
        image.square().sum().backward()
        grads.append((image.detach(), z.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        visual = copies.get(clip.model, ["visual"], torch.bfloat16).visual
        images = clip.normalize(torch.rand(2, 3, clip.input_size, clip.input_size))
        assert torch.equal(visual(images), clip.model.visual(images))

    bias = vqgan.decoder.conv_out.bias
    before = bias.clone()
    with torch.no_grad():
        bias.add_(1.0)  # a trainer's in-place update
    try:
        again = copies.get(vqgan, ["post_quant_conv", "decoder"], torch.bfloat16)
        assert again is not twin
        assert torch.equal(again.decoder.conv_out.bias, bias.bfloat16())
    finally:
        with torch.no_grad():
            bias.copy_(before)  # the generator is shared by other tests
