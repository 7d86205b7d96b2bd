"""VQGAN loading from taming-format YAML + ckpt, the inference API, and parity with taming."""

import subprocess
import sys
import types

import pytest
import torch
from conftest import (
    TINY_DDCONFIG,
    lightning_checkpoint,
    save_lightning,
    write_taming_yaml,
)

from vqclip.checkpoints import CheckpointError
from vqclip.models.vqgan import (
    VQGAN,
    VQGANConfig,
    clamp_with_grad,
    converted_path,
    load_vqgan,
    read_vqgan_config,
)


def tiny_config(gumbel=False):
    # GumbelVQ needs z_channels == embed_dim (8); the VQ model may differ (4)
    return VQGANConfig(kind="gumbel" if gumbel else "vq", embed_dim=8 if gumbel else 4,
                       n_embed=16, ddconfig=dict(TINY_DDCONFIG))


def write_tiny(tmp_path, gumbel=False, seed=0):
    """A random-weight tiny VQGAN as taming writes it: <stem>.yaml + Lightning last.ckpt."""
    torch.manual_seed(seed)
    model = VQGAN(tiny_config(gumbel))
    ckpt = save_lightning(lightning_checkpoint(model.state_dict()), tmp_path / "tiny.ckpt")
    write_taming_yaml(tmp_path / "tiny.yaml", embed_dim=model.embed_dim, gumbel=gumbel)
    return model, ckpt


@pytest.mark.parametrize("gumbel", [False, True])
def test_loads_taming_checkpoint_strictly_and_exposes_api(tmp_path, gumbel):
    ref, ckpt = write_tiny(tmp_path, gumbel)
    model = load_vqgan(ckpt)  # finds tiny.yaml beside the checkpoint
    for key, value in ref.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    D = ref.embed_dim
    assert model.downsample_factor == 2 and model.codebook.shape == (16, D)

    image = torch.rand(2, 3, 32, 32)
    z = model.encode(image)
    assert z.shape == (2, D, 16, 16)
    z_q = model.quantize_latents(z)
    flat = z_q.movedim(1, -1).reshape(-1, 1, D)
    gap = (flat - model.codebook).abs().amax(-1).min(-1).values  # distance to the closest code
    assert gap.max() < 1e-6  # every vector is a code
    out = model.decode(z_q)
    assert out.shape == (2, 3, 32, 32) and out.min() >= 0 and out.max() <= 1


def test_quantize_passes_gradient_straight_through(tmp_path):
    _, ckpt = write_tiny(tmp_path)
    model = load_vqgan(ckpt)
    z = torch.randn(1, 4, 4, 4, requires_grad=True)
    model.quantize_latents(z).sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))


def test_clamp_with_grad_passes_only_inward_gradients():
    x = torch.tensor([-0.5, 0.5, 1.5], requires_grad=True)
    y = clamp_with_grad(x)
    assert torch.equal(y.detach(), torch.tensor([0.0, 0.5, 1.0]))
    (y * torch.tensor([1.0, 1.0, 1.0])).sum().backward()  # descent would lower every value
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0]))  # ...which pushes -0.5 further out


def test_key_mismatch_names_missing_and_unexpected_keys(tmp_path):
    ref, _ = write_tiny(tmp_path)
    sd = ref.state_dict()
    sd["quant_conv.extra"] = sd.pop("quant_conv.bias")
    save_lightning(lightning_checkpoint(sd), tmp_path / "tiny.ckpt")
    match = r"missing keys \(1\): quant_conv.bias.*unexpected keys \(1\): quant_conv.extra"
    with pytest.raises(CheckpointError, match=match):
        load_vqgan(tmp_path / "tiny.ckpt", convert=False)


def test_shape_mismatch_is_a_clear_error(tmp_path):
    _, ckpt = write_tiny(tmp_path)
    write_taming_yaml(tmp_path / "big.yaml", n_embed=32)
    with pytest.raises(CheckpointError, match="tiny.ckpt.*quantize.embedding.weight"):
        load_vqgan(ckpt, tmp_path / "big.yaml", convert=False)


def test_gumbel_needs_matching_channels(tmp_path):
    write_taming_yaml(tmp_path / "g.yaml", embed_dim=4, gumbel=True)
    with pytest.raises(ValueError, match="z_channels == embed_dim"):
        read_vqgan_config(tmp_path / "g.yaml")


def test_config_errors(tmp_path):
    _, ckpt = write_tiny(tmp_path)
    (tmp_path / "tiny.yaml").unlink()
    with pytest.raises(ValueError, match="no config given"):
        load_vqgan(ckpt)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  target: taming.models.cond_transformer.Net2NetTransformer\n  params: {}\n")
    with pytest.raises(ValueError, match="unsupported model.target.*GumbelVQ"):
        load_vqgan(ckpt, bad)
    with pytest.raises(FileNotFoundError):
        load_vqgan(tmp_path / "absent.ckpt")
    with pytest.raises(ValueError, match="unknown VQGAN 'nonsense'.*imagenet_f16_16384"):
        load_vqgan("nonsense")


def test_safetensors_conversion_happens_once_and_is_used(tmp_path, isolated_cache, monkeypatch):
    ref, ckpt = write_tiny(tmp_path)
    load_vqgan(ckpt)
    converted = converted_path(ckpt, isolated_cache, ref.config)
    assert converted.is_file()

    import vqclip.models.vqgan as vqgan_module

    real = vqgan_module.read_state_dict
    def only_safetensors(path):
        assert str(path).endswith(".safetensors"), f"re-read the pickle {path}"
        return real(path)

    monkeypatch.setattr(vqgan_module, "read_state_dict", only_safetensors)
    again = load_vqgan(ckpt)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ref.state_dict().items())
    # the converted file stands alone: its header carries the config
    alone = load_vqgan(converted)
    assert alone.config == ref.config


def test_import_has_no_side_effects_and_loading_avoids_lightning(tmp_path):
    _, ckpt = write_tiny(tmp_path)
    code = (
        "import sys, vqclip\n"
        "heavy = [m for m in ('torch', 'open_clip', 'taming', 'kornia') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        f"vqclip.load_vqgan({str(ckpt)!r}, convert=False)\n"
        "banned = ('pytorch_lightning', 'lightning', 'taming.models', 'taming.main')\n"
        "bad = [m for m in sys.modules if m.startswith(banned)]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _import_taming_models():
    """taming.models imports `taming.main` (gone from Lightning 2) for instantiate_from_config.

    Test-only shim: instantiate_from_config builds an Identity for the loss and temperature
    scheduler, which the comparison never uses.
    """
    shim = types.ModuleType("taming.main")
    shim.instantiate_from_config = lambda config: torch.nn.Identity()
    sys.modules.setdefault("taming.main", shim)
    from taming.models.vqgan import GumbelVQ, VQModel

    return VQModel, GumbelVQ


@pytest.mark.parametrize("gumbel", [False, True])
def test_decode_matches_taming_vqmodel(tmp_path, gumbel):
    VQModel, GumbelVQ = _import_taming_models()
    _, ckpt = write_tiny(tmp_path, gumbel, seed=1)
    ours = load_vqgan(ckpt, convert=False)
    params = dict(ddconfig=dict(TINY_DDCONFIG), lossconfig={}, n_embed=16, embed_dim=ours.embed_dim)
    theirs = GumbelVQ(temperature_scheduler_config={}, **params) if gumbel else VQModel(**params)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    theirs.eval()

    torch.manual_seed(2)
    z = ours.codebook[torch.randint(0, 16, (2, 8, 8))].movedim(-1, 1)  # (2, D, 8, 8) codes
    with torch.no_grad():
        expected = ((theirs.decode(z) + 1) / 2).clamp(0, 1)
        got = ours.decode(z)
    inside = ((expected > 0) & (expected < 1)).float().mean()
    assert inside > 0.2, "the comparison would be vacuous if the clamp flattened most pixels"
    assert (got - expected).abs().max() <= 1e-5
    if not gumbel:  # the quantizer agrees too
        h = torch.randn(2, 4, 8, 8)
        assert torch.allclose(ours.quantize_latents(h), theirs.quantize(h)[0], atol=1e-6)


# The released imagenet_f16_16384 configs/model.yaml, verbatim (its sha256 is pinned in the registry).
OFFICIAL_16384_YAML = """\
model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.VQModel
  params:
    embed_dim: 256
    n_embed: 16384
    monitor: val/rec_loss
    ddconfig:
      double_z: false
      z_channels: 256
      resolution: 256
      in_channels: 3
      out_ch: 3
      ch: 128
      ch_mult:
      - 1
      - 1
      - 2
      - 2
      - 4
      num_res_blocks: 2
      attn_resolutions:
      - 16
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params:
        disc_conditional: false
        disc_in_channels: 3
        disc_start: 0
        disc_weight: 0.75
        disc_num_layers: 2
        codebook_weight: 1.0

"""


def test_official_yaml_text_matches_the_pinned_hash():
    import hashlib

    from vqclip.pretrained import VQGAN_MODELS

    pinned = VQGAN_MODELS["imagenet_f16_16384"]["files"]["config"]
    assert hashlib.sha256(OFFICIAL_16384_YAML.encode()).hexdigest() == pinned.sha256
    assert len(OFFICIAL_16384_YAML.encode()) == pinned.size


def test_full_size_imagenet_f16_16384_round_trip(tmp_path, isolated_cache):
    """The real architecture with random weights, saved as taming released it, loads back."""
    from taming.modules.discriminator.model import NLayerDiscriminator

    yaml = tmp_path / "model.yaml"
    yaml.write_text(OFFICIAL_16384_YAML)
    cfg = read_vqgan_config(yaml)
    torch.manual_seed(0)
    ref = VQGAN(cfg)
    sd = dict(ref.state_dict())
    disc = NLayerDiscriminator(input_nc=3, n_layers=2)  # disc_num_layers: 2, as in the YAML
    sd.update({f"loss.discriminator.{k}": v for k, v in disc.state_dict().items()})
    ckpt = save_lightning(lightning_checkpoint(sd, extra_loss_keys=False), tmp_path / "last.ckpt")
    del ref, disc

    model = load_vqgan(ckpt, yaml)
    assert model.codebook.shape == (16384, 256) and model.downsample_factor == 16
    assert torch.equal(model.state_dict()["quantize.embedding.weight"], sd["quantize.embedding.weight"])
    assert converted_path(ckpt, isolated_cache, cfg).is_file()
    again = load_vqgan(ckpt, yaml)  # now from the safetensors copy
    assert torch.equal(again.state_dict()["decoder.conv_out.weight"], sd["decoder.conv_out.weight"])
    with torch.no_grad():
        image = model.decode(model.codebook[torch.randint(0, 16384, (1, 2, 2))].movedim(-1, 1))
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


@pytest.mark.parametrize("change, message", [
    ({"num_res_blocks": 8000}, r"num_res_blocks=8000 \(an integer in 1..16\)"),
    ({"channels": 3}, r"unknown ddconfig keys \['channels'\]"),
    ({"ch_mult": "1,2"}, "ch_mult"),
])
def test_hostile_or_broken_configs_are_refused_before_building(tmp_path, change, message):
    from vqclip.checkpoints import save_safetensors

    cfg = tiny_config()
    cfg.ddconfig.update(change)
    path = save_safetensors({"w": torch.zeros(1)}, tmp_path / "x.safetensors",
                            {"vqclip.vqgan_config": cfg.to_json()})
    with pytest.raises(ValueError, match=message):
        load_vqgan(path)


def test_conversion_follows_content_not_name_or_mtime(tmp_path, isolated_cache):
    import os

    ref, ckpt = write_tiny(tmp_path, seed=0)
    load_vqgan(ckpt)
    stat = ckpt.stat()
    (tmp_path / "other").mkdir()
    other, _ = write_tiny(tmp_path / "other", seed=1)
    save_lightning(lightning_checkpoint(other.state_dict()), ckpt)  # same size, new weights...
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ...and the old mtime, as `cp -p` does
    assert ckpt.stat().st_size == stat.st_size
    loaded = load_vqgan(ckpt)
    assert torch.equal(loaded.codebook, other.codebook) and not torch.equal(loaded.codebook, ref.codebook)


def test_registry_name_wins_over_a_folder_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imagenet_f16_16384").mkdir()
    monkeypatch.setenv("VQCLIP_OFFLINE", "1")
    from vqclip.pretrained import DownloadError

    with pytest.raises(DownloadError, match="vqclip download imagenet_f16_16384"):
        load_vqgan("imagenet_f16_16384")
