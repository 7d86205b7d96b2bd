"""How a generation fails: a non-finite loss or latents, or out of memory, as one clear line."""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
from omegaconf import DictConfig

__all__ = ["GenerationError", "GenerationInterrupted", "check_finite", "memory_errors"]

T = TypeVar("T")


class GenerationError(RuntimeError):
    """The loop cannot go on: a non-finite loss, or out of memory."""


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; ``.result`` holds the images as they were (already saved if asked)."""

    def __init__(self, result):
        super().__init__(f"interrupted after {result.steps_done} steps")
        self.result = result  # a vqclip.outputs.GenerationResult


def check_finite(losses: list[torch.Tensor], checked: int, z: torch.Tensor, lr: float) -> int:
    """Raise GenerationError if a loss since step ``checked``, or the latents, are not finite;
    returns the number of steps checked. One wait for the device, however many steps."""
    recent = torch.stack(losses[checked:]).cpu()  # (steps, K)
    bad = (~torch.isfinite(recent)).any(1).nonzero()
    if len(bad):
        step = checked + int(bad[0])
        raise GenerationError(f"the loss became {losses[step].tolist()} at step {step}: stopped "
                              f"instead of saving a broken image; try a lower lr (now {lr})")
    if not torch.isfinite(z).all():  # the last update itself can overflow
        steps = f"step {len(losses) - 1}'s update" if len(losses) - checked == 1 else \
            f"the updates of steps {checked}-{len(losses) - 1}"
        raise GenerationError(f"the latents became NaN or inf in {steps}; try a lower lr (now {lr})")
    return len(losses)


def memory_errors(cfg: DictConfig, run: Callable[[], T]) -> T:
    """Run ``run``, turning out-of-memory errors into one line that names what reduces memory.

    The new error is raised outside the ``except`` block, so it does not keep the original and
    its frames (and their GPU tensors) alive in a notebook.
    """
    try:
        return run()
    except RuntimeError as e:  # torch.OutOfMemoryError is one; so is the CPU allocator's
        text = str(e)
        if isinstance(e, GenerationError) or not (
                isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower()
                or "can't allocate memory" in text):
            raise
    (w, h) = cfg.size
    raise GenerationError(
        f"out of memory on {cfg.device} at {w}x{h} with cutn {cfg.cutouts.cutn} and "
        f"{cfg.candidates} candidate(s): lower --size, --cutn or --candidates")
