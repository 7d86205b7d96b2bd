"""Shared fixtures: tiny models in the real formats, an isolated cache, a real local HTTP server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n 2 (the README's test command): two workers share the two cores, one thread each,
    # and so do the commands they start (which inherit these variables)
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_name] = "1"
    torch.set_num_threads(1)

# A taming VQGAN small enough for CPU tests; taming's GroupNorm needs channels divisible by 32.
TINY_DDCONFIG = dict(double_z=False, z_channels=8, resolution=32, in_channels=3, out_ch=3, ch=32,
                     ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16], dropout=0.0)

TAMING_YAML = """\
model:
  base_learning_rate: 4.5e-06
  target: taming.models.vqgan.{target}
  params:
    embed_dim: {embed_dim}
    n_embed: {n_embed}
    monitor: val/rec_loss
{extra}    ddconfig:
      double_z: false
      z_channels: {z_channels}
      resolution: {resolution}
      in_channels: 3
      out_ch: 3
      ch: {ch}
      ch_mult: {ch_mult}
      num_res_blocks: {num_res_blocks}
      attn_resolutions: {attn_resolutions}
      dropout: 0.0
    lossconfig:
      target: taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator
      params:
        disc_conditional: false
        disc_in_channels: 3
        disc_start: 250001
        disc_weight: 0.8
        codebook_weight: 1.0
"""

GUMBEL_EXTRA = """\
    kl_weight: 1.0e-08
    temperature_scheduler_config:
      target: taming.lr_scheduler.LambdaWarmUpCosineScheduler
      params:
        warm_up_steps: 0
        max_decay_steps: 1000001
        lr_start: 0.9
        lr_max: 0.9
        lr_min: 1.0e-06
"""


def write_taming_yaml(path, ddconfig=TINY_DDCONFIG, embed_dim=4, n_embed=16, gumbel=False):
    path.write_text(TAMING_YAML.format(
        target="GumbelVQ" if gumbel else "VQModel", embed_dim=embed_dim, n_embed=n_embed,
        extra=GUMBEL_EXTRA if gumbel else "", **ddconfig))
    return path


# Lightning pickles its callback objects by class; a module that does not exist at load time
# stands in for pytorch_lightning here, so the loader cannot import it even if it tried.
_fake_pkg = types.ModuleType("fake_lightning")
_fake = types.ModuleType("fake_lightning.callbacks")


class ModelCheckpoint:
    def __init__(self):
        self.monitor, self.best_model_path = "val/rec_loss", "logs/last.ckpt"
        self.best_model_score = torch.tensor(0.5)


ModelCheckpoint.__module__ = _fake.__name__
_fake.ModelCheckpoint = ModelCheckpoint


def lightning_checkpoint(state_dict, extra_loss_keys=True):
    """A dict shaped like an official taming ``last.ckpt`` (Lightning 1.x)."""
    sd = dict(state_dict)
    if extra_loss_keys:  # the training loss rides along in official checkpoints
        from taming.modules.discriminator.model import NLayerDiscriminator

        disc = NLayerDiscriminator(input_nc=3, ndf=8, n_layers=1)
        sd.update({f"loss.discriminator.{k}": v for k, v in disc.state_dict().items()})
        sd["loss.perceptual_loss.scaling_layer.shift"] = torch.zeros(1, 3, 1, 1)
    return {
        "epoch": 3, "global_step": 1000, "pytorch-lightning_version": "1.0.8",
        "callbacks": {ModelCheckpoint: ModelCheckpoint().__dict__, "cb": ModelCheckpoint()},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}},
                              "param_groups": [{"lr": 4.5e-6, "params": [0]}]}],
        "lr_schedulers": [], "state_dict": sd,
    }


def save_lightning(obj, path):
    sys.modules.update({_fake_pkg.__name__: _fake_pkg, _fake.__name__: _fake})
    try:
        torch.save(obj, path)
    finally:
        del sys.modules[_fake.__name__], sys.modules[_fake_pkg.__name__]
    return path


@pytest.fixture(autouse=True)
def torch_threads():
    """Every test starts with this process's thread count, whatever the one before set: rounding
    in a parallel sum depends on it, and tests compare runs bit for bit (with another process
    too)."""
    threads = torch.get_num_threads()
    yield threads
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own empty cache and never sees the user's."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("VQCLIP_CACHE", str(cache))
    monkeypatch.delenv("VQCLIP_OFFLINE", raising=False)
    return cache


class FileServer:
    """A real HTTP server on 127.0.0.1 that serves ``files`` and honours Range requests."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut_once: dict[str, int] = {}  # path -> bytes to send before dropping the connection
        self.requests: list[tuple[str, str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                server.requests.append((self.path, rng))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(body) and rng:
                    self.send_response(416)
                    self.end_headers()
                    return
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(body) - start))
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                cut = server.cut_once.pop(self.path, None)
                self.wfile.write(body[start:cut] if cut else body[start:])
                if cut:
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = FileServer()
    yield srv
    srv.close()


# The tiny CLIP used wherever a test needs one: open_clip's real code and tokenizer, few weights.
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_tiny_clip(folder, name: str, config: dict):
    """A CLIP ``name`` of ``config`` (an open_clip model config) in ``folder``: the config JSON,
    registered, and random weights from torch's generator as it stands. Returns both paths."""
    import json

    import open_clip

    from vqclip.checkpoints import save_safetensors
    from vqclip.models.clip import register_clip_config

    path = folder / f"{name}.json"
    path.write_text(json.dumps(config))
    register_clip_config(path)
    weights = folder / "clip.safetensors"
    save_safetensors(open_clip.create_model(name).state_dict(), weights)
    return path, weights


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A tiny VQGAN (vqclip safetensors) and a tiny CLIP (config JSON + weights) on disk.

    Returns the keyword arguments that point ``load_config``/``Generator.load`` at them; the CLI
    flags are the same names with dashes.
    """
    from vqclip.checkpoints import save_safetensors
    from vqclip.models.vqgan import VQGAN, VQGANConfig

    folder = tmp_path_factory.mktemp("tiny_models")
    cfg = VQGANConfig(kind="vq", embed_dim=4, n_embed=16, ddconfig=dict(TINY_DDCONFIG))
    torch.manual_seed(0)
    save_safetensors(VQGAN(cfg).state_dict(), folder / "vqgan.safetensors",
                     metadata={"vqclip.vqgan_config": cfg.to_json()})
    clip_config, weights = write_tiny_clip(folder, "vqclip-test-tiny", TINY_CLIP)
    return {"vqgan": str(folder / "vqgan.safetensors"), "clip": "vqclip-test-tiny",
            "clip_pretrained": str(weights), "clip_config": str(clip_config), "device": "cpu"}


# another family for ensembles: its own input size, embedding width and a short text context
TINY_CLIP_B = {
    "embed_dim": 24,
    "vision_cfg": {"image_size": 48, "layers": 1, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_clip_b(tmp_path_factory):
    """A second tiny CLIP on disk, unlike the first: ``{"arch", "pretrained", "config"}``, an
    ensemble member's fields."""
    torch.manual_seed(1)
    config, weights = write_tiny_clip(tmp_path_factory.mktemp("tiny_clip_b"),
                                      "vqclip-test-tiny-b", TINY_CLIP_B)
    return {"arch": "vqclip-test-tiny-b", "pretrained": str(weights), "config": str(config)}


@pytest.fixture(scope="session")
def tiny_generator(tiny_models):
    from vqclip.generator import Generator

    return Generator.load(**tiny_models)


def free_port() -> int:
    """A TCP port free on the loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """``item.rep_call``: the test's own report, for fixtures that keep evidence of a failure."""
    report = yield
    if report.when == "call":
        item.rep_call = report
    return report


def cli_process(*args: str, interruptible: bool = False, **kwargs) -> subprocess.Popen:
    """``python -m vqclip ARGS`` in a new process, its output captured as text. ``interruptible``:
    in a session of its own, for ``os.killpg(proc.pid, SIGINT)`` as a terminal's Ctrl-C, with
    SIGINT's default handler (a background job, CI under nohup, inherits SIGINT ignored, and
    Python then installs no KeyboardInterrupt handler). ``env``: variables set over this one's."""
    if interruptible:
        kwargs.update(start_new_session=True,
                      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **kwargs.pop("env", {})}
    return subprocess.Popen([sys.executable, "-m", "vqclip", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def wait_for(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    """Wait until ``ready()`` is true while ``proc`` runs; fail with its output if it ends first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)


def api_misuse(source: str) -> list[str]:
    """What a Python example (README block, notebook cell) gets wrong about the public API: imports
    of names vqclip does not export, and keywords that ``Generator.load`` / ``.generate`` do not
    take. Examples that need downloaded weights cannot run in CI; this is their check."""
    import ast
    import inspect

    import vqclip
    from vqclip.config import FLAT_KEYS
    from vqclip.generator import Generator

    takes = {name: set(inspect.signature(getattr(Generator, name)).parameters) | set(FLAT_KEYS)
             for name in ("load", "generate")}
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module == "vqclip":
            problems += [f"not exported: {a.name}" for a in node.names if a.name not in vqclip.__all__]
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in takes:
            problems += [f"{node.func.attr}() takes no {k.arg!r}" for k in node.keywords
                         if k.arg is not None and k.arg not in takes[node.func.attr]]
    return problems
