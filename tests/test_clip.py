"""CLIP loading through open_clip: custom configs, local weight files, the registry, freezing."""

import json

import pytest
import torch
from conftest import TINY_CLIP

from vqclip import pretrained
from vqclip.checkpoints import CheckpointError, save_safetensors
from vqclip.models.clip import load_clip, register_clip_config

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)


@pytest.fixture(scope="session")
def tiny_arch(tmp_path_factory):
    path = tmp_path_factory.mktemp("clipcfg") / "vqclip-test-tiny.json"
    path.write_text(json.dumps(TINY_CLIP))
    return register_clip_config(path)


@pytest.fixture
def tiny_weights(tiny_arch):
    import open_clip

    torch.manual_seed(0)
    return open_clip.create_model(tiny_arch).state_dict()


def test_custom_config_loads_from_safetensors_frozen_with_preprocessing(tiny_arch, tiny_weights, tmp_path):
    path = save_safetensors(tiny_weights, tmp_path / "open_clip_model.safetensors")
    clip = load_clip(tiny_arch, path)
    assert all(torch.equal(clip.model.state_dict()[k], v) for k, v in tiny_weights.items())
    assert not clip.model.training and not any(p.requires_grad for p in clip.model.parameters())
    assert clip.input_size == 32 and clip.mean == pytest.approx(OPENAI_MEAN)  # open_clip's default

    tokens = clip.tokenizer(["a red circle"])
    assert tokens.shape == (1, 77) and tokens[0, 0] == 49406  # open_clip's real BPE: <start_of_text>
    text = clip.encode_text(["a red circle", "a blue square"])
    images = torch.rand(3, 3, 32, 32, requires_grad=True)
    image_embeds = clip.encode_image(images)
    assert text.shape == (2, 32) and image_embeds.shape == (3, 32) and image_embeds.dtype == torch.float32
    image_embeds.sum().backward()  # gradients reach the pixels, not the frozen weights
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_registry_entry_for_a_custom_arch_sets_mean_std(tiny_arch, tiny_weights, monkeypatch,
                                                       isolated_cache):
    """The path the bundled models take: a registry entry, its file in the cache, its own mean/std."""
    name = f"{tiny_arch}/test"
    monkeypatch.setitem(pretrained.CLIP_MODELS, name, {
        "arch": tiny_arch, "pretrained": "test", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
        "description": "test", "license": "test",
        "files": {"weights": pretrained.RemoteFile("http://127.0.0.1:9/w", "w.safetensors")}})
    save_safetensors(tiny_weights, isolated_cache / name.replace("/", "--") / "w.safetensors")
    clip = load_clip(name, download=False)
    assert clip.mean == (0.5, 0.5, 0.5) and clip.std == (0.25, 0.25, 0.25)
    assert torch.allclose(clip.normalize(torch.full((1, 3, 2, 2), 0.75)), torch.ones(1, 3, 2, 2))


@pytest.mark.parametrize("wrap", ["plain", "training"])
def test_pickled_state_dicts_load(tiny_arch, tiny_weights, tmp_path, wrap):
    path = tmp_path / "open_clip_pytorch_model.bin"
    if wrap == "plain":  # HF's open_clip_pytorch_model.bin
        torch.save(tiny_weights, path)
    else:  # open_clip's training checkpoints: DDP prefix, optimizer state beside
        torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in tiny_weights.items()},
                    "optimizer": {"state": {}}}, path)
    clip = load_clip(tiny_arch, path)
    assert torch.equal(clip.model.state_dict()["text_projection"], tiny_weights["text_projection"])


def test_mismatched_weights_name_the_keys(tiny_arch, tiny_weights, tmp_path):
    tiny_weights.pop("logit_scale")
    path = save_safetensors(tiny_weights, tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match=r"w.safetensors.*missing keys \(1\): logit_scale"):
        load_clip(tiny_arch, path)


def test_bad_names_are_clear_errors(tiny_arch, tmp_path):
    with pytest.raises(ValueError, match="unknown CLIP architecture 'ViT-Q-99'.*ViT-B-32"):
        load_clip("ViT-Q-99")
    with pytest.raises(ValueError, match="no registry weights ViT-B-32/laion2b_s34b_b79k.*openai.*open_clip knows"):
        load_clip("ViT-B-32", "laion2b_s34b_b79k")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_clip(tiny_arch, tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.json"
    bad.write_text('{"embed_dim": 8}')
    with pytest.raises(ValueError, match="vision_cfg, text_cfg"):
        register_clip_config(bad)


def test_a_tag_the_registry_lacks_for_a_bundled_architecture_names_the_tags_it_has(monkeypatch):
    from vqclip import pretrained as registry

    # a bundled architecture is registered with open_clip only when one of its entries loads:
    # a retired tag (vqclip-shapes/v1, say) must not read as an unknown architecture
    monkeypatch.setitem(registry.CLIP_MODELS, "zz-shapes/v2", {"arch": "zz-shapes", "files": {}})
    with pytest.raises(ValueError, match=r"^no registry weights zz-shapes/v1; vqclip's registry "
                                         r"has: v2$"):
        load_clip("zz-shapes", "v1")
    with pytest.raises(ValueError, match="unknown CLIP architecture 'zz-shapes'"):
        load_clip("zz-shapes", "weights.safetensors")  # a file: the architecture is what is missing


def test_registry_weights_not_present_offline_say_what_to_download(monkeypatch):
    monkeypatch.setenv("VQCLIP_OFFLINE", "1")
    with pytest.raises(pretrained.DownloadError, match="vqclip download ViT-B-32/openai.*huggingface.co"):
        load_clip("ViT-B-32", "openai")


def test_full_size_vit_b_32_openai_from_the_cache_gets_quick_gelu(isolated_cache):
    """ViT-B-32 in its real size, random weights, saved as the registry's safetensors file."""
    import open_clip
    from open_clip.transformer import QuickGELU

    from vqclip.models.clip import _QuickGELU

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", force_quick_gelu=True)
    sd = model.state_dict()
    entry = pretrained.CLIP_MODELS["ViT-B-32/openai"]["files"]["weights"]
    save_safetensors(sd, isolated_cache / "ViT-B-32--openai" / entry.filename)
    del model

    clip = load_clip("ViT-B-32", "openai", download=False)
    assert clip.name == "ViT-B-32/openai" and clip.input_size == 224
    assert clip.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    # OpenAI's weights need QuickGELU; a GELU model would load them "fine" and be wrong (open_clip#771)
    assert isinstance(clip.model.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert isinstance(clip.model.visual.transformer.resblocks[0].mlp.gelu, _QuickGELU)  # fused
    assert torch.equal(clip.model.state_dict()["visual.proj"], sd["visual.proj"])
    with torch.no_grad():
        assert clip.encode_image(torch.rand(1, 3, 224, 224)).shape == (1, 512)


def test_registry_tag_wins_over_a_folder_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "openai").mkdir()
    monkeypatch.setenv("VQCLIP_OFFLINE", "1")
    with pytest.raises(pretrained.DownloadError, match="vqclip download ViT-B-32/openai"):
        load_clip("ViT-B-32", "openai")


def test_a_registry_entry_can_ship_its_architecture_config(tiny_weights, monkeypatch,
                                                          isolated_cache):
    """The bundled models' path: the arch is unknown to open_clip until its JSON is read."""
    import open_clip

    arch = "vqclip-test-shipped"
    name = f"{arch}/v1"
    monkeypatch.setitem(pretrained.CLIP_MODELS, name, {
        "arch": arch, "pretrained": "v1", "description": "test", "license": "test", "files": {
            "weights": pretrained.RemoteFile("http://127.0.0.1:9/w", "w.safetensors"),
            "config": pretrained.RemoteFile("http://127.0.0.1:9/c", f"{arch}.json")}})
    folder = isolated_cache / name.replace("/", "--")
    save_safetensors(tiny_weights, folder / "w.safetensors")
    (folder / f"{arch}.json").write_text(json.dumps(TINY_CLIP))
    assert arch not in open_clip.list_models()
    clip = load_clip(name, download=False)
    assert clip.name == name and torch.equal(clip.model.state_dict()["text_projection"],
                                             tiny_weights["text_projection"])


def test_bundled_models_are_never_downloaded(monkeypatch, isolated_cache):
    monkeypatch.setitem(pretrained.CLIP_MODELS, "vqclip-test-bundled/v1", {
        "arch": "x", "pretrained": "v1", "description": "test", "license": "test", "bundled": True,
        "files": {"weights": pretrained.RemoteFile("", "w.safetensors")}})
    with pytest.raises(pretrained.DownloadError, match="ships with vqclip in .*checkpoints.*restore"):
        pretrained.download("vqclip-test-bundled/v1")


@pytest.mark.parametrize("bf16", [False, True])
def test_fast_visual_matches_open_clips_image_tower(tiny_arch, tiny_weights, bf16):
    """Same embeddings and input gradients as open_clip's own tower (its nn.MultiheadAttention and
    patch convolution), in fp32 and under the loop's bf16 autocast; the same state-dict keys."""
    import copy

    import open_clip

    from vqclip.models.clip import _Patchify, _QuickGELU, _SelfAttention, fast_visual

    reference = open_clip.create_model(tiny_arch, force_quick_gelu=True).eval().requires_grad_(False)
    reference.load_state_dict(tiny_weights)
    fast = fast_visual(copy.deepcopy(reference))
    assert isinstance(fast.visual.conv1, _Patchify)
    assert all(isinstance(b.attn, _SelfAttention) and isinstance(b.mlp.gelu, _QuickGELU)
               for b in fast.visual.transformer.resblocks)
    assert fast.state_dict().keys() == reference.state_dict().keys()

    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    outputs, grads = [], []
    for model in (reference, fast):
        x = images.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model.encode_image(x).float()
        out.square().sum().backward()
        outputs.append(out)
        grads.append(x.grad)
    tol = 3e-2 if bf16 else 1e-5  # bf16 keeps 8 bits: the two orders of rounding differ
    assert torch.allclose(outputs[1], outputs[0], rtol=tol, atol=tol)
    cos = torch.nn.functional.cosine_similarity(grads[1].flatten(), grads[0].flatten(), dim=0)
    assert cos > (0.99 if bf16 else 1 - 1e-6)
