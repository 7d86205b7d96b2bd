"""Copies of frozen models whose weights are already in the autocast dtype.

Autocast casts the fp32 weight of every matrix product and convolution to bf16 (or fp16) on
every call: it caches casts only of weights that require gradients, and the loop's are frozen.
A copy made once per run saves those casts, 8% of a 128x128, 16-cutout bf16 step on a 2-core
EPYC with AVX512-BF16 (0.82 against 0.89 s/step, measured in one process, steps interleaved),
and rounds each weight exactly as autocast would. Only the weights of matrix products and
convolutions (linear and convolution layers, CLIP's patch embedding and attention projections)
are cast, as autocast casts them; norms, embeddings and the rest keep fp32.

Example:
    >>> copies = LowPrecisionCopies()
    >>> decoder = copies.get(vqgan, ["post_quant_conv", "decoder"], torch.bfloat16)  # doctest: +SKIP
    >>> with torch.autocast("cpu", dtype=torch.bfloat16):  # doctest: +SKIP
    ...     image = decoder.decode(z)
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

__all__ = ["LowPrecisionCopies", "low_precision_copy"]

def _products() -> tuple[type, ...]:
    """Layers whose weights feed matrix products or convolutions, which autocast lowers."""
    from .clip import _Patchify, _SelfAttention

    return (nn.Linear, nn.modules.conv._ConvNd, nn.MultiheadAttention, _Patchify, _SelfAttention)


def low_precision_copy(model: nn.Module, parts: Sequence[str], dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` for calling, not for changing: its submodules ``parts`` are frozen deep
    copies with the weights of matrix products and convolutions in ``dtype``; everything else
    (the other children, and the parameter, buffer and hook tables) is shared with ``model``."""
    twin = copy.copy(model)
    twin._modules = dict(model._modules)  # its own table of children: model keeps its own
    layers = _products()
    for name in parts:
        part = model.get_submodule(name)
        # the cast weights go in through deepcopy's memo: no full-precision copy is made first
        memo = {id(p): nn.Parameter(p.detach().to(dtype), requires_grad=False)
                for m in part.modules() if isinstance(m, layers)
                for p in m.parameters(recurse=False) if p.is_floating_point()}
        twin._modules[name] = copy.deepcopy(part, memo).requires_grad_(False)
    return twin


class LowPrecisionCopies:
    """:func:`low_precision_copy` made once per model, parts and dtype, and made again when the
    model's parameters change in place (a trainer's step, ``load_state_dict``). Changes through
    ``.data`` escape the check: the generator makes a new set for every run."""

    def __init__(self):
        self._made: dict[tuple, tuple[tuple, nn.Module]] = {}

    def get(self, model: nn.Module, parts: Sequence[str], dtype: torch.dtype) -> nn.Module:
        key = (id(model), tuple(parts), dtype)
        stamp = tuple((p.data_ptr(), p._version) for name in parts
                      for p in model.get_submodule(name).parameters())
        made = self._made.get(key)
        if made is None or made[0] != stamp:
            made = self._made[key] = (stamp, low_precision_copy(model, parts, dtype))
        return made[1]
