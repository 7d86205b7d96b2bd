"""`vqclip index` (issue 21): a folder embedded shard by shard into the cache that search reads,
resumed where it stopped, here or on Ray Data actors; and `search --min-score`, a stream."""

import json
import os

import pytest
import torch
from PIL import Image

from vqclip.images import image_files, iter_image_files, to_pil
from vqclip.index import index_folder
from vqclip.scoring import Scorer
from vqclip.shapes import batch

from conftest import cli_process
from test_batch_ray import RAY_ENV, finish
from test_scoring import CountingEncoder, run


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """20 single-object renders in two folders, one of them nested, and one file that is not an
    image; returns the folder and each render's label by file name."""
    root = tmp_path_factory.mktemp("pile")
    (root / "more" / "deeper").mkdir(parents=True)
    x, scenes = batch(1, 20, "test", num_objects=1)
    labels = {}
    for i, (image, scene) in enumerate(zip(x, scenes, strict=True)):
        path = root / ("more" if i % 3 == 1 else "more/deeper" if i % 3 == 2 else "") / f"{i:02d}.png"
        to_pil(image).save(path)
        labels[path.name] = f"{scene.objects[0].colour} {scene.objects[0].shape}"
    (root / "more" / "broken.png").write_bytes(b"not an image")
    return root, labels


def load(cache, ensemble=()):
    """The shapes preset's scorer: its main CLIP alone, or with ``ensemble=None`` both its CLIPs."""
    models = {} if ensemble is None else {"clip_ensemble": list(ensemble)}
    return Scorer.load(preset="shapes", download=False, cache_dir=cache, batch_size=4, **models)


def test_the_listing_streams_in_sorted_order(tmp_path):
    for name in ("b.png", "a/z.png", "a-b.png", "a/.hidden.png", ".dot/x.png", "A.JPG", "a/c/d.webp",
                 "notes.txt", "ab.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "link").symlink_to(tmp_path / "a")  # a linked folder is not followed
    expected = sorted(tmp_path / n for n in ("b.png", "a/z.png", "a-b.png", "A.JPG", "a/c/d.webp",
                                             "ab.png"))
    assert list(iter_image_files(tmp_path)) == expected == image_files(tmp_path)
    with pytest.raises(FileNotFoundError):
        iter_image_files(tmp_path / "nowhere")


def test_index_fills_every_models_cache_so_search_encodes_nothing(folder, tmp_path, monkeypatch):
    root, labels = folder
    scorer = load(tmp_path, ensemble=None)  # the preset's two CLIPs
    report = index_folder(scorer, root, shard_size=6)
    assert (report.files, report.shards, report.finished_before) == (21, 4, 0)
    assert (report.embedded, report.unreadable) == (20, 1)

    again = load(tmp_path, ensemble=None)  # as a new process would
    counts = [CountingEncoder(s, monkeypatch) for s in again.scorers]
    assert index_folder(again, root, shard_size=6).finished_before == 4
    hits = again.search(root, "a red circle", top_k=None, min_score=-1)
    assert [c.images for c in counts] == [0, 0] and len(hits) == 20
    ranked = scorer.rank(image_files(root), "a red circle")
    assert [(m.path, round(m.score, 5)) for m in hits] == [(m.path, round(m.score, 5)) for m in ranked]


def test_an_interrupted_index_resumes_at_the_first_unfinished_shard(folder, tmp_path, monkeypatch):
    root, _ = folder
    scorer = load(tmp_path)
    counter, inner = CountingEncoder(scorer, monkeypatch), scorer.clip.model.encode_image

    def stop_in_the_third_shard(x, *args, **kwargs):
        if counter.images >= 13:  # shards of 6, batches of 4: the third stops after one batch
            raise KeyboardInterrupt
        return inner(x, *args, **kwargs)

    monkeypatch.setattr(scorer.clip.model, "encode_image", stop_in_the_third_shard)
    with pytest.raises(KeyboardInterrupt):
        index_folder(scorer, root, shard_size=6)
    assert counter.images == 6 + 6 + 3  # the third shard's first batch holds the broken file

    again = load(tmp_path)
    count = CountingEncoder(again, monkeypatch)
    report = index_folder(again, root, shard_size=6)
    assert (report.shards, report.finished_before) == (4, 2)
    # the first batch of the third shard was stored before the interruption: not encoded again
    assert count.images == report.embedded == 2 + 3


def test_a_changed_file_redoes_its_shard_and_encodes_only_that_file(folder, tmp_path, monkeypatch):
    root, _ = folder
    pile = tmp_path / "pile"
    for path in image_files(root):
        (pile / path.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
        (pile / path.relative_to(root)).write_bytes(path.read_bytes())
    index_folder(load(tmp_path), pile, shard_size=4)
    files = image_files(pile)
    files[0].write_bytes(files[5].read_bytes())  # the same bytes as another file
    Image.open(files[6]).rotate(90).save(files[7])  # new content

    scorer = load(tmp_path)
    count = CountingEncoder(scorer, monkeypatch)
    report = index_folder(scorer, pile, shard_size=4)
    assert report.finished_before == report.shards - 2  # the two shards whose files changed
    assert count.images == 1  # the copy is known by its content; the edited file is new


def test_min_score_keeps_every_image_above_it_reading_the_folder_in_chunks(folder, tmp_path):
    root, labels = folder
    scorer = load(tmp_path)
    seen, score = [], scorer.score

    def counting_score(images, prompt, progress=False):
        seen.append(len(images))
        return score(images, prompt, progress)

    scorer.score = counting_score
    ranked = scorer.rank(image_files(root), "a blue square")
    threshold = ranked[5].score
    seen.clear()
    found = list(scorer.filter(iter_image_files(root), "a blue square", threshold, chunk_size=4))
    assert max(seen) == 4 and sum(seen) == 21
    assert {m.path for m in found} == {m.path for m in ranked if m.score >= threshold}
    assert [m.path for m in found] == sorted(m.path for m in found)  # folder order, as a stream
    best = scorer.search(root, "a blue square", top_k=None, min_score=threshold)
    assert [m.path for m in best] == [m.path for m in ranked[:len(best)]] and len(best) >= 6


def test_cli_index_and_search_with_min_score(folder, tmp_path, monkeypatch, capsys):
    root, labels = folder
    monkeypatch.setenv("VQCLIP_CACHE", str(tmp_path / "cache"))
    common = ["--preset", "shapes", "--clip-ensemble", "none"]  # the main CLIP alone
    code, out, _ = run(capsys, "index", str(root), *common, "--shard-size", "8", "--json")
    assert code == 0 and json.loads(out)["embedded"] == 20
    query = f"a {labels['00.png']}"
    code, out, _ = run(capsys, "search", str(root), query, *common, "--min-score", "0.5", "--json")
    found = json.loads(out)
    assert code == 0 and str(root / "00.png") in [m["path"] for m in found]
    assert all(m["score"] >= 0.5 for m in found) and len(found) < 20
    assert [m["score"] for m in found] == sorted((m["score"] for m in found), reverse=True)
    code, out, err = run(capsys, "search", str(root), query, *common, "--min-score", "0.99")
    assert code == 0 and out == "" and "no image scores 0.99 or more" in err


@pytest.mark.parametrize("argv, message", [
    (["search", "{root}", "a cat", "--min-score", "1.5"], "--min-score is a cosine similarity"),
    (["search", "{root}/nowhere", "a cat", "--min-score", "0.2"], "folder not found"),
    (["index", "{root}/nowhere"], "folder not found"),
    (["index", "{root}", "--shard-size", "0"], "--shard-size must be >= 1"),
    (["index", "{root}", "--workers", "2"], "--workers needs --ray"),
])
def test_bad_index_and_search_lines_exit_2_with_one_line(folder, capsys, argv, message):
    root, _ = folder
    code, out, err = run(capsys, *[a.format(root=root) for a in argv], "--preset", "shapes")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.xdist_group("ray")
def test_ray_local_index_stores_what_an_index_here_stores(folder, tmp_path, monkeypatch):
    root, _ = folder
    env = {**RAY_ENV, "VQCLIP_CACHE": str(tmp_path / "ray-cache")}
    proc = cli_process("-q", "index", str(root), "--preset", "shapes", "--shard-size", "6",
                       "--ray", "local", "--workers", "2", "--json", env=env)
    finish(proc, timeout=280)

    on_ray = load(tmp_path / "ray-cache", ensemble=None)
    counts = [CountingEncoder(s, monkeypatch) for s in on_ray.scorers]
    assert index_folder(on_ray, root, shard_size=6).finished_before == 4
    ray_embeds = [s.encode_images(image_files(root))[0] for s in on_ray.scorers]
    assert [c.images for c in counts] == [0, 0]  # all read from the cache the actors filled

    here = load(tmp_path / "here", ensemble=None)
    here_embeds = [s.encode_images(image_files(root))[0] for s in here.scorers]
    for a, b in zip(ray_embeds, here_embeds, strict=True):
        assert a.shape == (20, a.shape[1]) and torch.allclose(a, b, atol=1e-4)
    assert os.environ.get("RAY_ADDRESS") is None
