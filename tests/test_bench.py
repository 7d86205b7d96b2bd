"""`vqclip bench`: the official architectures in random weights, timed in a fresh process."""

import json

import torch

from vqclip.bench import OFFICIAL_F16_16384
from vqclip.cli import main
from vqclip.models.vqgan import read_vqgan_config


def test_the_benchmark_architecture_is_the_official_yaml(tmp_path):
    from test_vqgan import OFFICIAL_16384_YAML  # the published file, verbatim

    (tmp_path / "f16.yaml").write_text(OFFICIAL_16384_YAML)
    cfg = read_vqgan_config(tmp_path / "f16.yaml")
    assert {"embed_dim": cfg.embed_dim, "n_embed": cfg.n_embed, "ddconfig": cfg.ddconfig} \
        == OFFICIAL_F16_16384


def test_bench_prints_one_row_per_setting_with_time_memory_and_precision(capsys):
    assert main(["bench", "--size", "32", "--cutn", "1", "2", "--steps", "2", "--device", "cpu",
                 "--precision", "fp32", "--threads", "1", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["size"], r["cutn"]) for r in rows] == [(32, 1), (32, 2)]
    weights = (151_277_313 + 76_000_000) * 4  # ViT-B/32 and the VQGAN in fp32, at least
    for r in rows:
        assert r["precision"] == "fp32" and r["device"] == "cpu" and r["threads"] == 1
        assert 0 < r["s_per_step"] < 60 and r["peak_kind"] == "rss"
        assert r["peak_bytes"] > weights  # the child's own peak: it holds both models


def test_bench_table_names_the_machine(capsys):
    assert main(["bench", "--size", "16", "--cutn", "1", "--steps", "2", "--device", "cpu",
                 "--precision", "fp32"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("CPU ") and f"torch {torch.__version__}" in out[0]
    assert out[2].split()[:3] == ["16x16", "1", "fp32"] and out[2].endswith("GiB rss")


def test_bench_refuses_bad_settings_in_one_line(capsys):
    for argv in (["--steps", "1"], ["--size", "0"], ["--precision", "fp8"]):
        assert main(["bench", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("vqclip: error:")
