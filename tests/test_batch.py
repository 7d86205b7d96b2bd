"""`vqclip batch`: jobs files, stable ids and seeds, shards, and outputs written exactly once."""

import json

import pytest
import torch

from vqclip import generator
from vqclip.batch import plan, read_jobs, shard
from vqclip.cli import main
from vqclip.config import load_config
from vqclip.errors import GenerationError
from vqclip.images import load_image, to_tensor

from test_cli_generate import TINY_RUN, flags


@pytest.fixture
def runs(monkeypatch):
    """The prompts Generator.generate ran, in order."""
    seen = []
    real = generator.Generator.generate

    def counting(self, *args, **kwargs):
        seen.append(kwargs["config"].prompts.text)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(generator.Generator, "generate", counting)
    return seen


def batch(tiny_models, jobs, out, *extra):
    return main(["-q", "batch", str(jobs), "--out", str(out), *flags(tiny_models), *TINY_RUN,
                 "--steps", "2", *extra])


def test_jobs_files_of_each_kind(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("# a comment\na red circle\n\n  a blue square  \n")
    assert read_jobs(text) == [(2, {"prompt": "a red circle"}), (4, {"prompt": "a blue square"})]
    yml = tmp_path / "p.yaml"
    yml.write_text("- a red circle\n- prompt: a blue square\n  seed: 4\n  steps: 3\n")
    assert read_jobs(yml) == [(1, {"prompt": "a red circle"}),
                              (2, {"prompt": "a blue square", "seed": 4, "steps": 3})]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('"a red circle"\n\n{"prompt": "x", "optim.lr": 0.2}\n')
    assert read_jobs(jsonl) == [(1, {"prompt": "a red circle"}), (3, {"prompt": "x", "optim.lr": 0.2})]


@pytest.mark.parametrize("name, text, message", [
    ("p.yaml", "- a\n- b\n- prompt: c: d\n", "p.yaml:3: not YAML"),
    ("p.yaml", "prompt: a\n", "p.yaml:1: a YAML jobs file is a list of jobs"),
    ("p.yaml", "- a\n- seed: 3\n", "p.yaml:2: a job needs a prompt"),
    ("p.yaml", "- a\n- [b, c]\n", "p.yaml:2: a job is a prompt or a mapping"),
    ("p.jsonl", '"a"\n{"prompt": \n', "p.jsonl:2: not JSON"),
    ("p.txt", "# nothing\n\n", "p.txt: no jobs in it"),
])
def test_bad_jobs_files_name_the_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_jobs(path)


def _plan(tmp_path, settings, repeat=1):
    return plan(list(enumerate(settings, 1)), load_config(preset="shapes"), tmp_path, repeat)


def test_ids_and_seeds_are_stable_and_ignore_line_numbers(tmp_path):
    jobs = _plan(tmp_path, [{"prompt": "a red circle"}, {"prompt": "a blue square", "seed": 7}])
    again = _plan(tmp_path, [{"prompt": "new first line"}, {"prompt": "a blue square", "seed": 7},
                             {"prompt": "a red circle"}])
    assert {j.id: j.config.seed for j in jobs} == {j.id: j.config.seed for j in again[1:]}
    assert jobs[1].config.seed == 7 and jobs[0].config.seed is not None
    assert jobs[0].config.output.path == str(tmp_path / "img" / f"{jobs[0].id}.png")
    # the id covers the settings: another step count is another job
    assert _plan(tmp_path, [{"prompt": "a blue square", "seed": 7, "steps": 3}])[0].id != jobs[1].id
    # the same job twice is one job; its seed given explicitly is the same job again
    twice = _plan(tmp_path, [{"prompt": "a red circle"}, {"prompt": "a red circle"},
                             {"prompt": "a red circle", "seed": jobs[0].config.seed}])
    assert [j.id for j in twice] == [jobs[0].id]


def test_repeat_gives_each_copy_its_own_seeds(tmp_path):
    jobs = _plan(tmp_path, [{"prompt": "x", "seed": 10, "candidates": 3}, {"prompt": "y"}], repeat=3)
    assert [j.config.seed for j in jobs[:3]] == [10, 13, 16]  # candidates never share a seed
    assert len({j.id for j in jobs}) == 6 and len({j.config.seed for j in jobs[3:]}) == 3


@pytest.mark.parametrize("setting, message", [
    ({"clip": "ViT-B-32"}, "line 2: 'clip' is the batch's to set"),
    ({"output.path": "x.png"}, "line 2: 'output.path' is the batch's to set"),
    ({"stepz": 3}, "line 2: .*stepz"),
    ({"steps": -1}, "line 2: .*steps"),
    ({"seed": "abc"}, "line 2: .*seed"),
])
def test_bad_job_settings_name_the_line(tmp_path, setting, message):
    with pytest.raises(ValueError, match=message):
        _plan(tmp_path, [{"prompt": "a"}, {"prompt": "b", **setting}])


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_shards_cover_every_job_once(tmp_path, n):
    jobs = _plan(tmp_path, [{"prompt": f"prompt {i}"} for i in range(20)])
    shares = [shard(jobs, f"{i}/{n}") for i in range(n)]
    assert sorted(j.id for s in shares for j in s) == sorted(j.id for j in jobs)
    if n > 1:
        assert all(len(s) < len(jobs) for s in shares)


@pytest.mark.parametrize("spec", ["4/4", "1", "-1/2", "a/b", "1/0"])
def test_bad_shard_specs(tmp_path, spec):
    with pytest.raises(ValueError, match="--shard is i/n"):
        shard([], spec)


def _manifest(out):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_each_job_is_written_once_and_reruns_do_only_what_is_missing(tiny_models, tmp_path, runs):
    jobs, out = tmp_path / "jobs.txt", tmp_path / "out"
    jobs.write_text("".join(f"prompt {i}\n" for i in range(5)))
    assert batch(tiny_models, jobs, out) == 0
    assert len(runs) == 5
    done = _manifest(out)
    assert sorted(r["prompt"] for r in done) == [f"prompt {i}" for i in range(5)]
    for r in done:
        meta = json.loads((out / "meta" / f"{r['id']}.json").read_text())
        assert meta["config"]["prompts"]["text"] == r["prompt"] and meta["seed"] == r["seed"]
        assert (out / r["files"][0]).exists() and r["files"][0] == f"img/{r['id']}.png"
    assert batch(tiny_models, jobs, out) == 0 and len(runs) == 5  # nothing left to do
    # three jobs lost (one of them halfway: its image is there, its commit marker is not)
    for r in done[:3]:
        (out / "meta" / f"{r['id']}.json").unlink()
    (out / "img" / f"{done[1]['id']}.png").unlink()
    assert batch(tiny_models, jobs, out) == 0
    assert sorted(runs[5:]) == sorted(r["prompt"] for r in done[:3])
    again = _manifest(out)
    assert sorted(r["id"] for r in again) == sorted(r["id"] for r in done)  # one line each


def test_a_job_makes_the_image_generate_makes(tiny_models, tmp_path):
    jobs, out = tmp_path / "jobs.yaml", tmp_path / "out"
    jobs.write_text("- prompt: a red circle\n  seed: 5\n  candidates: 2\n")
    assert batch(tiny_models, jobs, out) == 0
    [record] = _manifest(out)
    single = tmp_path / "single.png"
    assert main(["-q", "generate", "a red circle", *flags(tiny_models), *TINY_RUN, "--steps", "2",
                 "--seed", "5", "--candidates", "2", "--output", str(single)]) == 0
    for k in range(2):
        assert torch.equal(to_tensor(load_image(out / "img" / f"{record['id']}-{k}.png")),
                           to_tensor(load_image(tmp_path / f"single-{k}.png")))
    assert (out / "img" / f"{record['id']}-ranking.json").exists()


def test_failed_jobs_are_listed_and_retried(tiny_models, tmp_path, monkeypatch, capsys):
    jobs, out = tmp_path / "jobs.txt", tmp_path / "out"
    jobs.write_text("fine\nbroken\nfine too\n")
    real = generator.Generator.generate

    def failing(self, *args, **kwargs):
        if kwargs["config"].prompts.text == "broken":
            raise GenerationError("the loss is NaN at step 1")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(generator.Generator, "generate", failing)
    assert batch(tiny_models, jobs, out) == 1
    assert "line 2) failed: the loss is NaN" in capsys.readouterr().err
    [failed] = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert failed["prompt"] == "broken" and failed["line"] == 2 and failed["attempts"] == 1
    assert sorted(r["prompt"] for r in _manifest(out)) == ["fine", "fine too"]
    monkeypatch.setattr(generator.Generator, "generate", real)
    assert batch(tiny_models, jobs, out) == 0
    assert not (out / "failed.jsonl").exists() and len(_manifest(out)) == 3


def test_shards_sharing_a_folder_keep_each_others_failures(tiny_models, tmp_path, monkeypatch):
    jobs, out = tmp_path / "jobs.txt", tmp_path / "out"
    jobs.write_text("".join(f"broken {i}\n" for i in range(6)))

    def failing(self, *args, **kwargs):
        raise GenerationError("the loss is NaN at step 1")

    monkeypatch.setattr(generator.Generator, "generate", failing)
    for i in range(3):
        batch(tiny_models, jobs, out, "--shard", f"{i}/3")
    failed = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert sorted(r["prompt"] for r in failed) == [f"broken {i}" for i in range(6)]
    share = int(failed[0]["id"], 16) % 3
    assert batch(tiny_models, jobs, out, "--shard", f"{share}/3") == 1  # its lines replaced
    again = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in again) == sorted(r["id"] for r in failed)


def test_a_stale_manifest_is_rebuilt_from_meta(tiny_models, tmp_path):
    jobs, out = tmp_path / "jobs.txt", tmp_path / "out"
    jobs.write_text("a\nb\n")
    assert batch(tiny_models, jobs, out) == 0
    done = _manifest(out)
    (out / "manifest.jsonl").write_text(json.dumps(done[0]) + "\n")
    assert batch(tiny_models, jobs, out) == 0
    assert _manifest(out) == done


@pytest.mark.parametrize("text, extra, message", [
    ("a\n", ["a stray prompt"], "the prompts come from"),
    ("- a\n- {prompt: b, clip: ViT-B-32}\n", [], "jobs.yaml, line 2: 'clip' is the batch's"),
    ("- a\n- {prompt: b, size: big}\n", [], "jobs.yaml, line 2: "),
    ("- a\n", ["--repeat", "0"], "--repeat must be >= 1"),
])
def test_bad_input_exits_2_before_anything_runs(tiny_models, tmp_path, runs, capsys, text, extra, message):
    jobs, out = tmp_path / "jobs.yaml", tmp_path / "out"
    jobs.write_text(text)
    assert batch(tiny_models, jobs, out, *extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert runs == [] and not out.exists()


def test_memory_and_file_handles_stay_flat_over_200_jobs(tiny_models, tmp_path, monkeypatch):
    """Soak: 200 jobs in one process. Resident memory after job 200 within 30 MiB of that after
    job 20 (the models, caches and allocator pools are warm by then; a leak of one 32x32 image
    and its latents per job would be ~20 KiB x 180 = 3.5 MiB, of a cutouts batch far more), and
    not one more open file."""
    import os

    from vqclip import batch as batch_module

    def rss() -> int:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    seen = []
    real = batch_module.run_job

    def measured(*args, **kwargs):
        record = real(*args, **kwargs)
        seen.append((rss(), len(os.listdir("/proc/self/fd"))))
        return record

    monkeypatch.setattr(batch_module, "run_job", measured)
    jobs, out = tmp_path / "jobs.txt", tmp_path / "out"
    jobs.write_text("".join(f"soak {i}\n" for i in range(200)))
    assert main(["-q", "batch", str(jobs), "--out", str(out), *flags(tiny_models),
                 "--size", "32", "32", "--cutn", "2", "--steps", "1"]) == 0
    assert len(seen) == 200 and len(_manifest(out)) == 200
    (rss_20, fds_20), (rss_200, fds_200) = seen[19], seen[199]
    assert rss_200 - rss_20 < 30 * 2**20, [r for r, _ in seen[19::20]]
    assert fds_200 <= fds_20


def test_ray_is_named_when_missing(tiny_models, tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("a\n")
    assert batch(tiny_models, jobs, tmp_path / "out", "--ray", "local") == 2
    assert 'pip install "vqclip[ray]"' in capsys.readouterr().err
    assert batch(tiny_models, jobs, tmp_path / "out", "--workers", "2") == 2
    assert "--workers needs --ray" in capsys.readouterr().err
