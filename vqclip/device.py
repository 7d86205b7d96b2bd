"""Device and precision choices, resolved once at the edge (CLI or top-level API) and passed down."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["AUTOCAST_DTYPES", "autocast", "check_precision", "cpu_bf16_features", "cpu_has_bf16",
           "resolve_device", "resolve_precision"]

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # by precision; fp32 has none


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA, then MPS, then CPU; anything else is checked and returned.

    Raises:
        ValueError: an unknown device string, or CUDA/MPS asked for where there is none.
    """
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} asked for, but there are only "
                         f"{torch.cuda.device_count()} CUDA devices")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} asked for, but MPS is not available here")
    return dev


def check_precision(precision: str, device: torch.device) -> None:
    """Raise ValueError if ``precision`` cannot run on ``device``."""
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("precision fp16 needs a GPU; on the CPU use bf16")


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a run uses: ``auto`` becomes bf16 on a CPU with bf16 arithmetic
    (AVX512-BF16 or AMX) and fp32 elsewhere; other values are checked and kept.

    Without native bf16 a CPU emulates it, tens of times slower than fp32 (1 against 100
    GFLOP/s for a matrix product on a 2-core AVX2 EPYC). On a GPU, auto keeps fp32: bf16 was
    no faster at 512x512 on an H100 (README, Performance).
    """
    check_precision(precision, device)
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"


def autocast(precision: str, device: torch.device):
    """Mixed precision for ``precision`` (``auto`` resolved here) on ``device``: autocast to
    bf16 or fp16, or nothing for fp32."""
    precision = resolve_precision(precision, device)
    if precision not in AUTOCAST_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def cpu_has_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic natively (AVX512-BF16 or AMX)."""
    return bool(cpu_bf16_features())


def cpu_bf16_features() -> list[str]:
    """This CPU's bf16 arithmetic: ``["AVX512-BF16", "AMX"]``, either, or none."""
    # private helpers of torch.cpu (AMX's since about torch 2.4): absent means no
    return [name for name, helper in (("AVX512-BF16", "_is_avx512_bf16_supported"),
                                      ("AMX", "_is_amx_tile_supported"))
            if getattr(torch.cpu, helper, lambda: False)()]
