"""The plumbing the shapes trainers share: the learning-rate schedule, bf16 autocast on the CPU,
atomic safetensors checkpoints and JSONL logs."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from ..checkpoints import save_safetensors

__all__ = ["bf16_autocast", "log_record", "save_weights", "warmup_cosine"]


def warmup_cosine(opt: torch.optim.Optimizer, steps: int):
    """Linear warm-up over a tenth of the run (200 steps at most), then cosine decay."""
    warmup = max(1, min(200, steps // 10))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(i, steps) / steps)))


def save_weights(state: dict, path: Path, metadata: dict[str, str]) -> None:
    """Write a state dict as safetensors (fp32 as trained, on the CPU), atomically."""
    save_safetensors({k: v.detach().cpu().contiguous() for k, v in state.items()}, path, metadata)


def bf16_autocast(device: str | torch.device = "cpu", bf16: bool | None = None):
    """bf16 autocast if ``bf16``; None: on a GPU, and on a CPU with bf16 arithmetic (elsewhere it
    is emulated, tens of times slower than fp32)."""
    from ..device import cpu_has_bf16

    device = torch.device(device)
    enabled = (device.type != "cpu" or cpu_has_bf16()) if bf16 is None else bf16
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def log_record(path: str | Path | None, record: dict) -> None:
    """Append ``record`` with the time to a JSONL file (nothing if ``path`` is None)."""
    if path is not None:
        with open(path, "a") as f:
            f.write(json.dumps({"time": round(time.time(), 1), **record}) + "\n")
