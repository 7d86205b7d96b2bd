"""Speed and memory of the loop: seconds per step, peak memory and the precision that ran.

The models are the default pair's architectures, imagenet_f16_16384's VQGAN and ViT-B/32 with
QuickGELU (as OpenAI's weights use), with random weights: they cost exactly what trained ones
do, and need no download, so the benchmark runs offline. Each setting runs in a fresh process,
so that its peak memory is its own (the resident set on a CPU, the allocator's peak on CUDA).

Example:
    >>> for row in bench_grid([128, 256], [16, 32], device="cpu"):  # doctest: +SKIP
    ...     print(row["size"], row["cutn"], row["s_per_step"], row["peak_bytes"])
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import platform
import resource
import sys
import time
from typing import Any, Iterator, Sequence

import torch

__all__ = ["OFFICIAL_F16_16384", "bench_grid", "bench_one", "loss_at", "machine", "precision_agreement",
           "random_generator"]

# model.params of the published vqgan_imagenet_f16_16384 YAML (its loss section aside)
OFFICIAL_F16_16384 = {
    "embed_dim": 256, "n_embed": 16384,
    "ddconfig": {"double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3,
                 "out_ch": 3, "ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2,
                 "attn_resolutions": [16], "dropout": 0.0},
}


def random_generator(device: str | torch.device = "cpu", seed: int = 0):
    """A :class:`vqclip.Generator` of the default pair's architectures with random weights."""
    import open_clip

    from .config import load_config
    from .device import resolve_device
    from .generator import Generator
    from .models.clip import CLIP, _quiet_random_init, fast_visual
    from .models.vqgan import VQGAN, VQGANConfig

    device = resolve_device(device)
    torch.manual_seed(seed)
    vqgan = VQGAN(VQGANConfig(kind="vq", **OFFICIAL_F16_16384).check("OFFICIAL_F16_16384"))
    with _quiet_random_init(True):  # random on purpose: the row says so
        model = open_clip.create_model("ViT-B-32", force_quick_gelu=True)
    pp = open_clip.get_model_preprocess_cfg(model)
    clip = CLIP(fast_visual(model.eval().requires_grad_(False)).to(device),
                open_clip.get_tokenizer("ViT-B-32"), 224, tuple(pp["mean"]), tuple(pp["std"]),
                "ViT-B-32/random")
    config = load_config(preset="imagenet", device=str(device))
    return Generator(vqgan.eval().requires_grad_(False).to(device), clip, config)


def bench_one(size: int, cutn: int, *, steps: int = 4, device: str = "auto",
              precision: str = "auto", threads: int | None = None, checkpoint: bool = False,
              compile: bool = False) -> dict:
    """Time one setting in this process: the mean of the steps after the first (which pays
    one-time allocations), and this process's peak memory so far."""
    if threads:
        torch.set_num_threads(threads)
    gen = random_generator(device)
    cuda = gen.device.type == "cuda"
    if cuda:  # synchronize and the memory counters act on the current device
        torch.cuda.set_device(gen.device)
    marks: dict[int, float] = {}

    def tick(step: int, info: dict) -> None:
        if step in (0, steps - 1):
            if cuda:
                torch.cuda.synchronize()
            marks[step] = time.perf_counter()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result = gen.generate("a lighthouse at dusk", steps=steps, seed=0, cutn=cutn, size=[size, size],
                          precision=precision, checkpoint=checkpoint, compile=compile,
                          callback=tick)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:  # ru_maxrss is in KiB on Linux, in bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"size": result.config.size[0], "cutn": cutn, "device": str(gen.device),
            "precision": result.config.precision, "checkpoint": checkpoint, "compile": compile,
            "threads": torch.get_num_threads(),
            "steps_timed": steps - 1,
            "s_per_step": (marks[steps - 1] - marks[0]) / (steps - 1),
            "peak_bytes": peak, "peak_kind": "allocated" if cuda else "rss"}


def bench_grid(sizes: Sequence[int], cutns: Sequence[int], **kwargs) -> Iterator[dict]:
    """:func:`bench_one` for every size and cutn, each in a fresh process, one at a time."""
    if kwargs.get("steps", 4) < 2:
        raise ValueError("steps must be >= 2: the first step is not timed")
    context = multiprocessing.get_context("spawn")
    for size in sizes:
        for cutn in cutns:
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
                yield pool.submit(bench_one, size, cutn, **kwargs).result()


def loss_at(gen, prompt: str | None = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The first step's losses ``(K,)`` and their gradient on the latents ``(K, D, h, w)``.

    The latents are the start and the cutouts the first step's of a run with these settings
    (give ``seed``), so calls that differ only in ``precision`` see the same inputs: how far
    a precision moves the loss and gradient from fp32's, with everything else fixed.
    """
    from .config import load_config

    if prompt is not None:
        kwargs["prompt"] = prompt
    cfg = load_config(gen.config, **kwargs)
    if cfg.seed is None:
        raise ValueError("loss_at needs a seed: the start and the cutouts come from it")
    cfg.output.path = cfg.output.video = None  # it writes nothing
    gen._settle(cfg)
    streams, guides, z = gen._prepare(cfg, [cfg.seed + k for k in range(cfg.candidates)])
    _, loss = gen._loss(cfg, z, z.detach(), guides, streams)
    loss.sum().backward()
    return loss.detach(), z.grad


def precision_agreement(gen, precision: str = "bf16", **settings) -> dict:
    """How far ``precision`` moves the first step's losses and gradient from fp32's, with the
    latents and the cutouts fixed (:func:`loss_at`; give ``seed``).

    Returns:
        ``loss_rel_diff``: the largest relative difference of a candidate's loss;
        ``grad_cosine``: the smallest cosine between a candidate's gradients on z;
        and both losses.
    """
    import torch.nn.functional as F

    ref_loss, ref_grad = loss_at(gen, precision="fp32", **settings)
    loss, grad = loss_at(gen, precision=precision, **settings)
    return {"precision": precision, "loss_fp32": ref_loss.tolist(), "loss": loss.tolist(),
            "loss_rel_diff": ((loss - ref_loss).abs() / ref_loss.abs()).max().item(),
            "grad_cosine": F.cosine_similarity(grad.flatten(1), ref_grad.flatten(1)).min().item()}


def machine() -> str:
    """The CPU's model name (and the GPU's, if one is used), torch's version and its threads."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from .device import cpu_bf16_features

    flags = cpu_bf16_features()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"CPU {cpu} ({torch.backends.cpu.get_cpu_capability()}{''.join(', ' + f for f in flags)})"
            f"{gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads")
