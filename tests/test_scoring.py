"""Zero-shot scoring (issue 5): classify, rank, search with its cache, and ranked candidates."""

import json
import logging

import pytest
import torch

from vqclip import cli
from vqclip.images import read_png_text, to_pil
from vqclip.scoring import EmbeddingCache, Scorer
from vqclip.shapes import batch

LABELS = [f"{c} {s}" for c in ("red", "green", "blue", "yellow", "orange", "purple", "white", "black")
          for s in ("circle", "square", "triangle")]


@pytest.fixture(scope="module")
def renders(tmp_path_factory):
    """16 held-out single-object renders saved as PNGs, with their true labels."""
    folder = tmp_path_factory.mktemp("renders")
    x, scenes = batch(0, 16, "test", num_objects=1)
    paths, truth = [], []
    for i, (image, scene) in enumerate(zip(x, scenes, strict=True)):
        obj = scene.objects[0]
        paths.append(folder / f"{i:02d}.png")
        to_pil(image).save(paths[-1])
        truth.append(f"{obj.colour} {obj.shape}")
    return folder, paths, truth, x


@pytest.fixture(scope="module")
def shapes_scorer(tmp_path_factory):
    # the preset's main CLIP alone: these tests are about one model's Scorer
    return Scorer.load(preset="shapes", clip_ensemble=[], download=False,
                       cache_dir=tmp_path_factory.mktemp("cache"))


class CountingEncoder:
    """Wraps a CLIP's image tower and counts the images it encodes."""

    def __init__(self, scorer, monkeypatch):
        self.images, inner = 0, scorer.clip.model.encode_image

        def encode(x, *args, **kwargs):
            self.images += len(x)
            return inner(x, *args, **kwargs)

        monkeypatch.setattr(scorer.clip.model, "encode_image", encode)


def run(capsys, *argv):
    code = cli.main(["-q", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_classifies_the_shapes_renders_with_the_bundled_clip(renders, capsys):
    _, paths, truth, _ = renders
    code, out, _ = run(capsys, "classify", *map(str, paths), "--labels", ",".join(LABELS),
                       "--templates", "a {}", "--preset", "shapes", "--json")
    assert code == 0
    results = json.loads(out)
    assert [r["path"] for r in results] == list(map(str, paths))
    for r in results:
        assert set(r) == {"path", "top", "probs"}
        assert list(r["probs"]) == LABELS and sum(r["probs"].values()) == pytest.approx(1, abs=1e-5)
        assert r["top"] == max(r["probs"], key=r["probs"].get)
    assert [r["top"] for r in results] == truth


def test_cli_classify_table_without_json(renders, capsys):
    _, paths, truth, _ = renders
    code, out, _ = run(capsys, "classify", str(paths[0]), "--labels", ",".join(LABELS), "--preset",
                       "shapes", "--templates", "a {}", "--show", "2")
    assert code == 0
    line, = out.splitlines()
    assert line.startswith(str(paths[0])) and line.split()[1:3] == truth[0].split()


def test_rank_puts_the_matching_image_first(renders, shapes_scorer, capsys):
    _, paths, truth, x = renders
    target = truth[5]
    matches = shapes_scorer.rank(x, f"a {target}")
    assert truth[matches[0].index] == target
    assert [m.score for m in matches] == sorted((m.score for m in matches), reverse=True)
    code, out, _ = run(capsys, "rank", *map(str, paths), "--prompt", f"a {target}", "--preset",
                       "shapes", "--json")
    ranked = json.loads(out)
    assert code == 0 and all(set(r) == {"path", "score"} for r in ranked)
    assert ranked[0]["path"] == str(paths[5]) and len(ranked) == len(paths)
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)


def test_weighted_prompts_score_as_documented(renders, shapes_scorer):
    *_, x = renders
    images, _ = shapes_scorer.encode_images(x[:4])
    texts = shapes_scorer.encode_texts(["a red circle", "a square"]).cpu()
    expected = (images @ texts[0] - 0.5 * images @ texts[1]) / 1.5
    got = {m.index: m.score for m in shapes_scorer.rank(x[:4], "a red circle:1|a square:-0.5")}
    assert torch.allclose(torch.tensor([got[i] for i in range(4)]), expected, atol=1e-5)


def test_paths_pil_images_and_tensors_embed_alike(renders, shapes_scorer):
    _, paths, _, x = renders
    from_paths, _ = shapes_scorer.encode_images(paths[:3])
    from_pil, _ = shapes_scorer.encode_images([to_pil(im) for im in x[:3]])
    from_tensor, _ = shapes_scorer.encode_images(x[:3])
    assert torch.allclose(from_paths, from_pil, atol=1e-5)
    assert torch.allclose(from_pil, from_tensor, atol=1e-5)


def test_describe_returns_the_best_texts(renders, shapes_scorer):
    *_, truth, x = renders
    best = shapes_scorer.describe(x[2], [f"a {label}" for label in LABELS], top_k=3)
    assert best[0][0] == f"a {truth[2]}" and len(best) == 3
    assert best[0][1] >= best[1][1] >= best[2][1]


def test_templates_are_averaged_per_label(shapes_scorer):
    both = shapes_scorer.label_embeddings(["red circle", "blue square"], ["a {}", "a picture of a {}"])
    parts = shapes_scorer.encode_texts(["a red circle", "a picture of a red circle"]).cpu()
    assert torch.allclose(both[0], torch.nn.functional.normalize(parts.mean(0), dim=-1), atol=1e-5)


def test_search_finds_the_file_and_hits_the_cache_the_second_time(renders, tmp_path, monkeypatch):
    _, paths, truth, _ = renders
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    for i, p in enumerate(paths[:8]):
        (folder / ("nested" if i % 2 else "") / p.name).write_bytes(p.read_bytes())
    cache = tmp_path / "cache"
    first = Scorer.load(preset="shapes", clip_ensemble=[], download=False, cache_dir=cache,
                        batch_size=3)
    count = CountingEncoder(first, monkeypatch)
    hits = first.search(folder, f"a {truth[3]}", top_k=2)
    assert hits[0].path == str(folder / "nested" / paths[3].name) and len(hits) == 2
    assert count.images == 8

    second = Scorer.load(preset="shapes", clip_ensemble=[], download=False,
                         cache_dir=cache)  # a new process would
    count = CountingEncoder(second, monkeypatch)
    again = second.search(folder, f"a {truth[3]}", top_k=2)
    assert count.images == 0
    assert [(m.path, round(m.score, 5)) for m in again] == [(m.path, round(m.score, 5)) for m in hits]

    # a changed file is encoded again, and only that one; its new content is what is found
    (folder / paths[0].name).write_bytes(paths[3].read_bytes())
    again = second.search(folder, f"a {truth[3]}", top_k=2)
    assert count.images == 0  # same bytes as a file already cached: found by content hash
    assert {m.path for m in again} == {str(folder / paths[0].name), hits[0].path}
    assert again[0].score == pytest.approx(again[1].score, abs=1e-6)
    (folder / paths[0].name).write_bytes(paths[10].read_bytes())
    again = second.search(folder, f"a {truth[10]}", top_k=1)
    assert count.images == 1 and again[0].path == str(folder / paths[0].name)


def test_corrupt_images_are_skipped_with_a_warning(renders, tmp_path, caplog):
    _, paths, truth, _ = renders
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.png").write_bytes(paths[1].read_bytes())
    (folder / "junk.png").write_bytes(b"not an image")
    whole = paths[2].read_bytes()
    (folder / "cut.png").write_bytes(whole[:len(whole) // 2])  # truncated
    (folder / "notes.txt").write_text("not an image either, and not looked at")
    (folder / ".hidden.png").write_bytes(paths[2].read_bytes())
    scorer = Scorer.load(preset="shapes", clip_ensemble=[], download=False,
                         cache_dir=tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="vqclip"):
        hits = scorer.search(folder, f"a {truth[1]}")
    assert [m.path for m in hits] == [str(folder / "good.png")]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "junk.png" in warned and "cut.png" in warned


def test_a_damaged_cache_is_rebuilt(tmp_path, caplog):
    path = tmp_path / "e.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    with caplog.at_level(logging.WARNING, logger="vqclip"):
        cache = EmbeddingCache(path)
    cache.put({"abc": torch.ones(4)})
    assert torch.equal(cache.get({"abc", "def"})["abc"], torch.ones(4))
    assert "damaged" in caplog.text


def test_one_clip_load_serves_generator_and_scorer(tiny_models, monkeypatch):
    import vqclip.models.clip as clip_module
    from vqclip.generator import Generator

    calls = []
    real = clip_module.load_clip
    monkeypatch.setattr(clip_module, "load_clip", lambda *a, **k: calls.append(a) or real(*a, **k))
    gen = Generator.load(**tiny_models)
    result = gen.generate("a red circle", steps=1, seed=0, size=[32, 32], cutn=2)
    assert gen.scorer.clip is gen.clip and gen.ranker() is gen.scorer
    assert gen.scorer.rank(result.tensor, "a red circle")[0].score == pytest.approx(result.scores[0])
    assert len(calls) == 1


def test_candidates_are_ranked_saved_with_scores_and_the_best_marked(tiny_generator, tmp_path):
    out = tmp_path / "c.png"
    result = tiny_generator.generate("a red circle|blurry:-0.5", steps=2, seed=3, candidates=3,
                                     size=[32, 32], cutn=2, output=str(out))
    images, _ = tiny_generator.scorer.encode_images(result.tensor)
    texts = tiny_generator.scorer.encode_texts(["a red circle", "blurry"]).cpu()
    expected = (images @ texts[0] - 0.5 * images @ texts[1]) / 1.5
    assert result.scores == pytest.approx(expected.tolist(), abs=1e-5)
    ranking = json.loads((tmp_path / "c-ranking.json").read_text())
    assert ranking["prompt"] == "a red circle|blurry:-0.5"
    assert ranking["ranked_by"] == tiny_generator.clip.name
    ranked = ranking["candidates"]
    assert [r["rank"] for r in ranked] == [1, 2, 3]
    assert [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
    assert ranking["best"] == ranked[0]["path"] == str(tmp_path / f"c-{result.order[0]}.png")
    for r in ranked:
        text = read_png_text(r["path"])
        assert int(text["rank"]) == r["rank"] and float(text["clip_score"]) == r["score"]
        assert int(text["seed"]) == r["seed"] == 3 + r["candidate"]


@pytest.fixture(scope="module")
def other_clip(tiny_models, tmp_path_factory):
    """The tiny architecture with other random weights: a second, different CLIP."""
    import open_clip

    from vqclip.checkpoints import save_safetensors

    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("other") / "other.safetensors"
    save_safetensors(open_clip.create_model(tiny_models["clip"]).state_dict(), path)
    return f"{tiny_models['clip']}/{path}"


def test_rank_clip_ranks_with_the_other_model(tiny_models, other_clip, tmp_path, capsys):
    from vqclip.generator import Generator
    from vqclip.models.clip import load_clip

    out = tmp_path / "r.png"
    code = cli.main(["-q", "generate", "a blue square", "--candidates", "3", "--steps", "2",
                     "--seed", "0", "--size", "32", "32", "--cutn", "2", "--output", str(out),
                     "--rank-clip", other_clip, *_flags(tiny_models)])
    assert code == 0
    ranking = json.loads((tmp_path / "r-ranking.json").read_text())
    arch, path = other_clip.split("/", 1)
    ranker = Scorer(load_clip(arch, path), cache=False)
    assert ranking["ranked_by"] == ranker.clip.name != Generator.load(**tiny_models).clip.name
    images = [r["path"] for r in ranking["candidates"]]
    expected = [round(m.score, 6) for m in ranker.rank(images, "a blue square")]
    assert [r["score"] for r in ranking["candidates"]] == pytest.approx(expected, abs=1e-3)


def _flags(models):
    return [a for k, v in models.items() for a in (f"--{k.replace('_', '-')}", v)]


@pytest.mark.parametrize("argv, message", [
    (["classify", "x.png", "--labels", "cat"], "at least two non-empty labels"),
    (["classify", "x.png", "--labels", "cat,cat"], "labels repeat"),
    (["classify", "x.png", "--labels", "cat,dog", "--templates", "a photo"], "needs {} where"),
    (["rank", "x.png", "--prompt", ""], "empty prompt"),
    (["search", "{tmp}/nowhere", "a cat"], "folder not found"),
    (["search", "{tmp}", "a cat"], "no images in"),
    (["search", "{tmp}", "a cat", "--top", "0"], "--top must be >= 1"),
    (["generate", "a cat", "--rank-clip", "ViT-B-32"], "must be ARCH/TAG"),
])
def test_user_errors_exit_2_with_one_line(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if argv[0] != "generate":
        argv += ["--preset", "shapes"]
    code, _, err = run(capsys, *argv, *(["--output", str(tmp_path / "o.png")]
                                        if argv[0] == "generate" else []))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_unreadable_images_only_exit_1(tmp_path, capsys, caplog):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 broken")
    with caplog.at_level(logging.WARNING, logger="vqclip"):
        code, out, err = run(capsys, "rank", str(bad), "--prompt", "a cat", "--preset", "shapes",
                             "--json")
    assert code == 1 and json.loads(out) == [] and "none of the images could be read" in err
    assert "bad.jpg" in caplog.text


def test_an_edit_that_keeps_size_and_mtime_is_still_seen(renders, tmp_path, monkeypatch):
    import os

    from PIL import Image

    *_, truth, x = renders
    folder = tmp_path / "bmp"
    folder.mkdir()
    image = folder / "a.bmp"  # BMP: the same size in bytes whatever the picture
    to_pil(x[0]).save(image)
    scorer = Scorer.load(preset="shapes", clip_ensemble=[], download=False,
                         cache_dir=tmp_path / "cache")
    count = CountingEncoder(scorer, monkeypatch)
    before = scorer.search(folder, "a red circle")[0].score
    st = image.stat()
    to_pil(x[1]).save(image)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p or exiftool -P would
    assert image.stat().st_size == st.st_size and image.stat().st_mtime_ns == st.st_mtime_ns
    after = scorer.search(folder, "a red circle")[0].score
    assert count.images == 2 and after != pytest.approx(before, abs=1e-6)
    assert Image.open(image).size == (64, 64)


def test_skipped_files_keep_the_others_in_their_places(renders, tmp_path, shapes_scorer):
    _, paths, truth, _ = renders
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"no")
    matches = shapes_scorer.rank([paths[0], bad, paths[2]], f"a {truth[2]}")
    assert [(m.index, m.path) for m in matches] == [(2, str(paths[2])), (0, str(paths[0]))]
    classes = shapes_scorer.classify([bad, paths[4]], LABELS, ["a {}"])
    assert [(c.index, c.path, c.top) for c in classes] == [(1, str(paths[4]), truth[4])]


def test_exif_rotation_16_bit_and_transparency_are_read_as_seen(renders, tmp_path, shapes_scorer):
    import numpy as np
    from PIL import Image

    *_, x = renders
    upright = to_pil(x[0])
    rotated = tmp_path / "rotated.jpg"  # stored upside down, with orientation 3 to undo it
    exif = Image.Exif()
    exif[0x0112] = 3
    upright.rotate(180).save(rotated, quality=95, exif=exif)
    upright.save(tmp_path / "upright.jpg", quality=95)
    a, _ = shapes_scorer.encode_images([rotated, tmp_path / "upright.jpg"])
    assert (a[0] @ a[1]).item() > 0.99

    grey = np.asarray(upright.convert("L"), dtype=np.uint16) * 257  # the same picture in 16 bits
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    upright.convert("L").save(tmp_path / "grey8.png")
    b, _ = shapes_scorer.encode_images([tmp_path / "grey16.png", tmp_path / "grey8.png"])
    assert (b[0] @ b[1]).item() > 0.999

    rgba = upright.convert("RGBA")
    rgba.putalpha(0)  # all transparent, with the picture still in the colour channels
    Image.new("RGB", upright.size, "white").save(tmp_path / "white.png")
    c, _ = shapes_scorer.encode_images([rgba, tmp_path / "white.png"])
    assert (c[0] @ c[1]).item() > 0.999


def test_integer_tensors_are_refused(shapes_scorer):
    with pytest.raises(ValueError, match="float"):
        shapes_scorer.encode_images(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_a_cache_that_cannot_be_opened_is_skipped_with_a_warning(renders, tmp_path, caplog):
    _, paths, truth, _ = renders
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("the cache folder cannot be made here")
    scorer = Scorer.load(preset="shapes", clip_ensemble=[], download=False,
                         cache_dir=blocked)
    with caplog.at_level(logging.WARNING, logger="vqclip"):
        matches = scorer.rank(paths[:3], f"a {truth[1]}")
    assert matches[0].index == 1 and "cache" in caplog.text and "off for this run" in caplog.text


def test_ctrl_c_while_ranking_keeps_the_candidates_unranked(tiny_generator, tmp_path, monkeypatch):
    from vqclip.generator import GenerationInterrupted

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny_generator.ranker(), "score", stop)
    with pytest.raises(GenerationInterrupted) as info:
        tiny_generator.generate("a cat", steps=2, seed=0, candidates=2, size=[32, 32], cutn=2,
                                output=str(tmp_path / "k.png"))
    result = info.value.result
    assert result.scores is None and result.interrupted and result.steps_done == 2
    ranking = json.loads((tmp_path / "k-ranking.json").read_text())
    assert ranking["best"] is None and [r["score"] for r in ranking["candidates"]] == [None, None]
    assert read_png_text(tmp_path / "k-1.png")["interrupted"] == "True"


def test_a_cache_of_another_schema_version_is_rebuilt(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:  # an older layout, without the version mark
        db.execute("CREATE TABLE files (path TEXT PRIMARY KEY, size INTEGER, sha256 TEXT)")
    image = tmp_path / "x.png"
    image.write_bytes(b"stands in for an image")
    cache = EmbeddingCache(path)
    cache.put({"k": torch.ones(3)}, [(image, image.stat(), "k")])
    assert torch.equal(cache.lookup([image])[0], torch.ones(3))
    assert torch.equal(cache.get({"k"})["k"], torch.ones(3))


def test_32_bit_images_with_8_bit_values_keep_their_brightness():
    import numpy as np
    from PIL import Image

    from vqclip.images import to_rgb

    image = Image.fromarray(np.full((4, 4), 200, dtype=np.int32))
    assert image.mode == "I" and np.asarray(to_rgb(image))[0, 0].tolist() == [200, 200, 200]


def test_batch_size_is_checked_before_the_model_loads(monkeypatch):
    import vqclip.models.clip as clip_module

    monkeypatch.setattr(clip_module, "load_clip", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        Scorer.load(preset="shapes", batch_size=0)
