"""The bundled shapes models: checksums, offline use from any directory, and generation that the
pixel-only judge confirms (issue 4's end-to-end check, at the preset's default settings)."""

import os
import subprocess
import sys

import pytest

from vqclip import pretrained
from vqclip.images import load_image, read_png_text
from vqclip.shapes.judge import judge

BUNDLED = {name: entry for name, entry in {**pretrained.VQGAN_MODELS, **pretrained.CLIP_MODELS}.items()
           if entry.get("bundled")}


def test_bundled_weights_match_the_registry_checksums():
    assert set(BUNDLED) == {"shapes_f4_512", "vqclip-shapes/v2", "vqclip-shapes-rn/v1"}
    total = 0
    for name, entry in BUNDLED.items():
        for remote in entry["files"].values():
            path = pretrained.PROJECT_CHECKPOINTS / name.replace("/", "--") / remote.filename
            assert path.stat().st_size == remote.size, path
            assert pretrained.sha256sum(path) == remote.sha256, path
            total += remote.size
    assert total <= 30_000_000  # issue 20 raised the budget for shipped weights from 20 MB to 30 MB


def test_bundled_models_are_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "PROJECT_CHECKPOINTS", tmp_path / "gone")
    with pytest.raises(pretrained.DownloadError, match="ships with vqclip"):
        pretrained.download("shapes_f4_512", cache_dir=tmp_path / "cache")


@pytest.fixture(scope="module")
def shapes_generator():
    from vqclip.generator import Generator

    return Generator.load(preset="shapes", download=False)


# two prompts per shape, each colour once or twice; seeds fixed so that the test is repeatable
PROMPTS = [("red", "circle"), ("blue", "square"), ("yellow", "triangle"), ("green", "circle"),
           ("purple", "square"), ("white", "triangle")]


# Issue 4's generation bar is not met yet (README, "Quality"): with the shipped models (two CLIPs,
# best of 2) the judge confirmed 31 of 72 runs (scripts/eval_shapes.py), and 1 of these 6.
# strict: the day this passes, the marker must go. Six runs at the preset's settings take 3 to
# 4 minutes on a 2-core CPU, a sixth of CI's budget, so CI leaves it to VQCLIP_QUALITY=1.
@pytest.mark.skipif(not os.environ.get("VQCLIP_QUALITY"),
                    reason="six generations at preset settings (3-4 min); VQCLIP_QUALITY=1 runs "
                           "it, and scripts/eval_shapes.py measures the bar on 72")
@pytest.mark.xfail(strict=True, reason="generation does not follow the prompt often enough yet: "
                                       "the judge confirms 31 of 72 at preset settings")
def test_generation_follows_the_prompt(shapes_generator):
    hits = []
    for i, (colour, shape) in enumerate(PROMPTS):
        result = shapes_generator.generate(f"a {colour} {shape}", seed=i)
        hits.append(judge(result.tensor[0]).matches(colour, shape))
    # the bar for the full 72-run evaluation is 80%; here 5 of 6
    assert sum(hits) >= 5, list(zip(PROMPTS, hits, strict=True))


def test_main_command_runs_offline_from_any_directory(tmp_path):
    env = {**os.environ, "VQCLIP_OFFLINE": "1", "VQCLIP_CACHE": str(tmp_path / "empty-cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "vqclip", "-q", "generate", "a red circle", "--preset", "shapes",
         "--output", "x.png", "--video", "x.mp4", "--seed", "0", "--steps", "10"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    image = load_image(tmp_path / "x.png")
    assert image.size == (64, 64) and (tmp_path / "x.mp4").stat().st_size > 0
    text = read_png_text(tmp_path / "x.png")
    assert text["prompt"] == "a red circle" and "shapes_f4_512" in text["config"]
    # whether the image shows a red circle is test_generation_follows_the_prompt's question
