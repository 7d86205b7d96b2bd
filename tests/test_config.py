"""Config: schema defaults, presets, merge order, and loud failures for unknown keys and bad values."""

import pytest
from omegaconf import OmegaConf

from vqclip.config import FLAT_KEYS, GenerateConfig, list_presets, load_config


def test_default_preset_is_imagenet_with_the_default_pair():
    cfg = load_config(prompt="x")
    assert cfg.preset == "imagenet" and "imagenet" in list_presets()
    assert (cfg.models.vqgan, cfg.models.clip, cfg.models.clip_pretrained) == (
        "imagenet_f16_16384", "ViT-B-32", "openai")


def test_every_flat_key_names_a_schema_key():
    schema, missing = OmegaConf.structured(GenerateConfig), object()
    for key in FLAT_KEYS.values():
        assert OmegaConf.select(schema, key, default=missing) is not missing, key


def test_merge_order_preset_then_file_then_kwargs_then_overrides(tmp_path):
    yaml = tmp_path / "mine.yaml"
    yaml.write_text("optim:\n  lr: 0.3\n  steps: 7\ncutouts:\n  cutn: 5\n")
    cfg = load_config(preset="imagenet", files=[yaml], steps=9, cutn=6,
                      overrides=["cutouts.cutn=4", "lr=0.05"])
    assert cfg.optim.steps == 9  # keyword over file
    assert cfg.cutouts.cutn == 4  # override over keyword
    assert cfg.optim.lr == 0.05  # flat names work in overrides too
    assert cfg.size == [256, 256]  # the preset's


def test_config_object_as_base_and_types_are_converted():
    base = load_config(prompt="a", steps=3)
    cfg = load_config(base, overrides=["optim.steps=5", "size=[64,32]"])
    assert cfg.optim.steps == 5 and cfg.size == [64, 32] and cfg.prompts.text == "a"
    assert load_config(size=(64, 48)).size == [64, 48]  # tuples from Python are fine


@pytest.mark.parametrize("kwargs, message", [
    ({"overrides": ["optim.lrr=3"]}, "Key 'lrr' not in 'OptimConfig'.*optim.lrr"),
    ({"overrides": ["optim.lr=fast"]}, "could not be converted to Float.*optim.lr"),
    ({"overrides": ["steps=1.5"]}, "could not be converted to Integer"),
    ({"overrides": ["nonsense"]}, "not key=value"),
    ({"stepz": 3}, "unknown setting 'stepz'"),
    ({"preset": "nope"}, "unknown preset 'nope'; available: .*imagenet"),
    ({"size": [0, 256]}, "each side must be in 1..4096"),
    ({"size": [256, 100000]}, "each side must be in 1..4096"),
    ({"size": [256]}, "size must be \\[width, height\\]"),
    ({"optimizer": "lion"}, "unknown optimizer 'lion'; available: adam, adamw, sgd"),
    ({"augments": ["affine", "swirl"]}, "unknown augmentation 'swirl'; available: affine"),
    ({"lr": -1.0}, "lr must be in \\(0, 100"),
    ({"lr": 1e39}, "lr must be in"),
    ({"overrides": ["optim.lr=.inf"]}, "optim.lr must be a finite number"),
    ({"init_weight": float("nan")}, "init_weight must be a finite number"),
    ({"cutn": 0}, "cutn must be >= 1"),
    ({"cutn": 4, "overview": 5}, "cutouts.overview must be in 0..cutn \\(4\\)"),
    ({"candidates": 0}, "candidates must be in 1..64"),
    ({"video": "x.avi"}, "must end in .mp4 or .gif"),
    ({"output": "x.jpg"}, "must end in .png"),
    ({"prompt": "a||b"}, "empty prompt"),
    ({"noise_prompts": ["x:1"]}, "SEED\\[:WEIGHT\\]"),
])
def test_bad_settings_fail_with_one_clear_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        load_config(**kwargs)
    assert "\n" not in str(info.value)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(files=[tmp_path / "missing.yaml"])
    with pytest.raises(FileNotFoundError, match="image not found"):
        load_config(image_prompts=[str(tmp_path / "missing.png:0.5")])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="cannot read image"):
        load_config(init_image=str(garbage))
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(files=[bad])
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must be a mapping"):
        load_config(files=[listy])


def test_text_overrides_stay_text():
    # YAML 1.1 would read 16:9 as sexagesimal 969 and 1e3 as a float
    assert load_config(overrides=["prompt=16:9"]).prompts.text == "16:9"
    assert load_config(overrides=["prompts.text=1e3", "optim.name=adam"]).prompts.text == "1e3"


def test_oversized_images_are_a_clear_error(tmp_path, monkeypatch):
    from PIL import Image

    Image.new("RGB", (16, 16)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 256 pixels > 2x: Pillow's bomb error
    with pytest.raises(ValueError, match="cannot read image .*big.png"):
        load_config(init_image=str(tmp_path / "big.png"))


def test_a_torch_device_is_taken_as_its_name():
    import torch

    assert load_config(preset="shapes", device=torch.device("cpu")).device == "cpu"
