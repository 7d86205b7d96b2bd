"""CLIP ensembles: several models guide one run and score as one; long prompts are reported."""

import logging

import pytest
import torch
from PIL import Image

from vqclip.cli import main
from vqclip.config import load_config, parse_member
from vqclip.cutouts import MakeCutouts, SeedStreams
from vqclip.ensemble import EnsembleScorer
from vqclip.generator import Generator
from vqclip.images import read_png_text
from vqclip.losses import prompt_loss
from vqclip.models.clip import dropped_words, load_clip
from vqclip.scoring import Scorer

SMALL = dict(size=[32, 32], cutn=4, seed=1, precision="fp32")


@pytest.fixture(scope="module")
def pair(tiny_models, tiny_clip_b):
    """A generator guided by the two tiny CLIPs, the second weighing 3 to the first's 1."""
    return Generator.load(**tiny_models, clip_ensemble=[{**tiny_clip_b, "weight": 3.0}])


def _by_hand(gen, clip, cfg, z, streams):
    """One model's loss on z, as the loop computes it, from the pieces."""
    from vqclip.prompts import build_targets

    cutouts = MakeCutouts(clip.input_size, cfg.cutouts.cutn, cfg.cutouts.cut_pow,
                          cfg.cutouts.augments, cfg.cutouts.overview)
    targets = build_targets(clip, cfg, cutouts)
    image = gen.vqgan.decode(gen.vqgan.quantize_latents(z)).float()
    embeds = clip.encode_image(cutouts(image, streams)).view(z.shape[0], cfg.cutouts.cutn, -1)
    return sum(prompt_loss(embeds, t.embeds, t.weight, t.stop) for t in targets)


def test_the_loss_is_each_models_loss_weighted_and_one_model_is_itself(tiny_generator, pair,
                                                                       tmp_path):
    Image.new("RGB", (40, 40), "red").save(tmp_path / "red.png")
    prompts = dict(prompt="a red circle|blue:-0.5", image_prompts=[str(tmp_path / "red.png")],
                   noise_prompts=["3:0.5"])  # every kind, embedded by each model at its width
    for gen in (tiny_generator, pair):
        cfg = load_config(gen.config, candidates=2, **prompts, **SMALL)
        gen._settle(cfg)
        _, guides, z = gen._prepare(cfg, [1, 2])
        _, loss = gen._loss(cfg, z, z.detach(), guides, SeedStreams([1, 2]))
        streams = SeedStreams([1, 2])  # drawn from in the loop's order: the main model first
        losses = [_by_hand(gen, clip, cfg, z, streams) for clip in gen.clips]
        if len(gen.clips) == 1:
            assert torch.equal(loss, losses[0])  # exactly: an ensemble of one is the model
        else:
            assert [c.input_size for c in gen.clips] == [32, 48]
            assert torch.allclose(loss, (losses[0] + 3 * losses[1]) / 4, rtol=1e-6, atol=0)
            assert not torch.allclose(losses[0], losses[1])


def test_two_unlike_models_guide_a_run_and_rank_it_with_their_weights(pair, tmp_path):
    result = pair.generate("a red circle", steps=3, candidates=2,
                           output=str(tmp_path / "o.png"), **SMALL)
    assert result.ranked_by == ("ensemble of vqclip-test-tiny/clip.safetensors (0.25), "
                                "vqclip-test-tiny-b/clip.safetensors (0.75)")
    each = [Scorer(clip, cache=False).score(result.tensor, "a red circle")[0] for clip in pair.clips]
    assert result.scores == pytest.approx((0.25 * each[0] + 0.75 * each[1]).tolist(), abs=1e-6)
    text = read_png_text(tmp_path / "o-0.png")
    assert text["ranked_by"] == result.ranked_by and "vqclip-test-tiny-b" in text["config"]
    # the weights are the run's own: no reload to change them
    again = pair.generate("a red circle", steps=1, clip_weight=3.0, **SMALL)
    assert again.ranked_by.endswith("(0.5)")


def test_rank_clip_naming_a_guide_ranks_with_that_model_alone(tiny_models, tiny_clip_b):
    member = f"{tiny_clip_b['arch']}/{tiny_clip_b['pretrained']}"
    for rank_clip, name in [(f"{tiny_models['clip']}/{tiny_models['clip_pretrained']}",
                             "vqclip-test-tiny/clip.safetensors"),
                            (member, "vqclip-test-tiny-b/clip.safetensors")]:
        gen = Generator.load(**tiny_models, clip_ensemble=[member], rank_clip=rank_clip)
        assert gen.rank_clip in gen.clips  # not loaded again
        assert gen.generate("a red circle", steps=1, **SMALL).ranked_by == name


def test_a_scorer_of_an_ensemble_ranks_and_classifies_with_the_weighted_mean(tiny_models,
                                                                              tiny_clip_b):
    models = {k: v for k, v in tiny_models.items() if k.startswith("clip")}
    member = f"{tiny_clip_b['arch']}/{tiny_clip_b['pretrained']}:3"
    scorer = Scorer.load(config={"models": {"vqgan": "x"}}, device="cpu", cache=False,
                         clip_ensemble=[member], **models)
    assert isinstance(scorer, EnsembleScorer) and scorer.weights == [0.25, 0.75]
    images = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    one, two = scorer.scorers
    scores, kept = scorer.score(images, "a red circle")
    expected = 0.25 * one.score(images, "a red circle")[0] + 0.75 * two.score(images, "a red circle")[0]
    assert kept == [0, 1, 2] and torch.allclose(scores, expected)
    assert [m.index for m in scorer.rank(images, "a red circle")] == scores.argsort(
        descending=True).tolist()
    labels = ["a red circle", "a blue square"]
    got = scorer.classify(images, labels)
    for c, a, b in zip(got, one.classify(images, labels), two.classify(images, labels), strict=True):
        assert c.probs == pytest.approx({k: 0.25 * a.probs[k] + 0.75 * b.probs[k] for k in labels})
        assert sum(c.probs.values()) == pytest.approx(1.0) and c.top == max(c.probs, key=c.probs.get)


def test_the_command_line_takes_members_and_refuses_bad_ones(tiny_models, tiny_clip_b,
                                                              tmp_path, capsys):
    args = [f"--{k.replace('_', '-')}={v}" for k, v in tiny_models.items()]
    member = f"{tiny_clip_b['arch']}/{tiny_clip_b['pretrained']}:0.5"
    assert main(["-q", "generate", "a red circle", *args, "--clip-ensemble", member, "--size",
                 "32", "32", "--cutn", "4", "--steps", "2", "--output",
                 str(tmp_path / "o.png")]) == 0
    assert read_png_text(tmp_path / "o.png")["ranked_by"].endswith(
        "(0.667), vqclip-test-tiny-b/clip.safetensors (0.333)")
    capsys.readouterr()
    for spec, message in [("nope", "give ARCH/TAG[:WEIGHT]"), ("ViT-B-32/openai:0", "a number > 0"),
                          ("ViT-B-32/openai:-1", "a number > 0"), ("/openai", "give ARCH/TAG")]:
        assert main(["generate", "x", *args, "--clip-ensemble", spec]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vqclip: error: ") and message in err and err.count("\n") == 1, err
    assert main(["rank", str(tmp_path / "o.png"), "--prompt", "x", "--clip-ensemble", "nope"]) == 2
    assert "give ARCH/TAG" in capsys.readouterr().err
    for spec, message in [("ViT-B-32/openai:abc", "'abc' is not a number"),
                          ("ViT-B-32/openai:", "is not a number"),
                          ("ViT-B-32/openai:inf", "a number > 0"),
                          ("ViT-B-32/openai:1e999", "a number > 0")]:
        assert main(["generate", "x", "--clip-ensemble", spec]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    for yaml, message in [("models:\n  ensemble:\n  - {pretrained: openai}\n", "needs an arch"),
                          ("models:\n  ensemble:\n  - {arch: ViT-B-16}\n", "needs an arch"),
                          ("models:\n  ensemble: {arch: ViT-B-16/openai}\n", "a mapping where a list belongs")]:
        (tmp_path / "bad.yaml").write_text(yaml)
        assert main(["generate", "x", "--config", str(tmp_path / "bad.yaml")]) == 2, yaml
        err = capsys.readouterr().err
        assert err.startswith("vqclip: error: ") and message in err and err.count("\n") == 1, err


def test_members_parse_with_names_paths_and_weights():
    assert parse_member("ViT-B-16/openai") == {"arch": "ViT-B-16", "pretrained": "openai",
                                               "weight": 1.0}
    assert parse_member("RN50/c:/w/x.pt:.5") == {"arch": "RN50", "pretrained": "c:/w/x.pt",
                                                 "weight": 0.5}
    assert parse_member("ViT-B-16/laion2b_s34b_b88k:2e0")["weight"] == 2.0
    assert parse_member("RN50/c:/w/x.pt") == {"arch": "RN50", "pretrained": "c:/w/x.pt",
                                              "weight": 1.0}


def test_a_prompt_longer_than_a_models_context_is_cut_with_one_warning(tiny_clip_b, caplog):
    clip = load_clip(tiny_clip_b["arch"], tiny_clip_b["pretrained"])
    long = "a red circle on alpha bravo charlie delta echo foxtrot golf hotel india kilo lima " \
           "mike oscar papa quebec romeo sierra tango"
    assert dropped_words(clip.tokenizer, "a red circle") is None
    dropped = dropped_words(clip.tokenizer, long)  # 16 tokens: the start, 14 of text, the end
    assert dropped and long.endswith(" " + dropped) and "tango" in dropped
    assert len(clip.tokenizer.encode(long[:-len(dropped)])) == 14
    with caplog.at_level(logging.WARNING, logger="vqclip"):
        clip.encode_text([long, "a red circle"])
        clip.encode_text([long])
    cut = [r for r in caplog.records if "drops" in r.getMessage()]
    assert len(cut) == 1 and "16 tokens" in cut[0].getMessage() and dropped in cut[0].getMessage()
