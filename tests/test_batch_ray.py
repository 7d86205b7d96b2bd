"""`vqclip batch --ray local`: the same jobs and pixels as in-process, every listener on the
loopback, and exactly one output per job when an actor is killed mid-run.

Each test runs the CLI in a process of its own with a time limit, Ray's usage statistics off and
every proxy variable pointing at a dead loopback port (Ray's usage code probes cloud metadata
addresses otherwise), so nothing leaves the machine."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vqclip.cli import main

from conftest import cli_process, wait_for
from test_cli_generate import TINY_RUN, flags

pytest.importorskip("ray", reason="Ray is the optional extra vqclip[ray]; the dev extra installs it")
pytestmark = pytest.mark.xdist_group("ray")  # under pytest -n, one Ray cluster at a time

DEAD_PROXY = "http://127.0.0.1:9"
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "http_proxy": DEAD_PROXY, "https_proxy": DEAD_PROXY,
           "HTTP_PROXY": DEAD_PROXY, "HTTPS_PROXY": DEAD_PROXY, "OMP_NUM_THREADS": "1"}


def ray_batch(tiny_models, jobs, out, *extra, steps=2):
    return cli_process("-q", "batch", str(jobs), "--out", str(out), *flags(tiny_models), *TINY_RUN,
                       "--steps", str(steps), "--ray", "local", "--workers", "2", *extra,
                       env=RAY_ENV)


def finish(proc, timeout=240):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, err
    return err


def pixels(path):
    return np.asarray(Image.open(path))


def listeners() -> set[tuple[str, int]]:
    """The (address, inode) of every listening TCP socket on the machine."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, state, inode = row.split()[1], row.split()[3], row.split()[9]
            if state == "0A":  # LISTEN
                found.add((local.split(":")[0], inode))
    return found


def is_loopback(hex_address: str) -> bool:
    if len(hex_address) == 8:  # IPv4, little-endian: 127.x.x.x ends in 7F
        return hex_address.endswith("7F")
    return hex_address in ("00000000000000000000000001000000",  # ::1
                           "0000000000000000FFFF00000100007F")  # ::ffff:127.0.0.1


def test_ray_local_makes_what_in_process_makes_and_listens_on_loopback_only(tiny_models, tmp_path):
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text("- a red circle\n- {prompt: a blue square, seed: 4}\n- {prompt: x, candidates: 2}\n")
    torch.set_num_threads(1)  # as each of the 2 actors on 2 cores: another count rounds otherwise
    assert main(["-q", "batch", str(jobs), "--out", str(tmp_path / "here"), *flags(tiny_models),
                 *TINY_RUN, "--steps", "2"]) == 0
    before = listeners()
    proc = ray_batch(tiny_models, jobs, tmp_path / "ray")
    opened = set()
    while proc.poll() is None:
        opened |= listeners() - before
        time.sleep(0.2)
    finish(proc)
    assert opened, "no listener seen: the check saw nothing of Ray"
    assert all(is_loopback(address) for address, _ in opened), opened
    here = sorted(p.name for p in (tmp_path / "here" / "img").glob("*.png"))
    assert here == sorted(p.name for p in (tmp_path / "ray" / "img").glob("*.png")) and len(here) == 4
    for name in here:
        assert np.array_equal(pixels(tmp_path / "here" / "img" / name), pixels(tmp_path / "ray" / "img" / name))


def actor_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes().startswith(b"ray::_Worker"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def test_a_killed_actor_leaves_one_output_and_one_line_per_job(tiny_models, tmp_path):
    jobs, out = tmp_path / "jobs.txt", tmp_path / "out"
    jobs.write_text("".join(f"prompt {i}\n" for i in range(8)))
    proc = ray_batch(tiny_models, jobs, out, steps=40)
    wait_for(proc, lambda: any((out / "meta").glob("*.json")), timeout=180)
    [victim, *_] = actor_pids()
    os.kill(victim, signal.SIGKILL)
    finish(proc)
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["prompt"] for r in lines) == [f"prompt {i}" for i in range(8)]  # once each
    assert len(list((out / "meta").glob("*.json"))) == 8
    assert sorted(p.stem for p in (out / "img").glob("*.png")) == sorted(r["id"] for r in lines)
    assert not (out / "failed.jsonl").exists()
    assert len({r["worker"] for r in lines}) >= 2  # the restarted actor went on
