"""Copies of frozen models whose weights are already in the autocast dtype.

Autocast casts the fp32 weight of every matrix product and convolution to bf16 (or fp16) on
every call: it caches casts only of weights that require gradients, and the loop's are frozen.
A copy made once per run saves those casts, 8% of a 128x128, 16-cutout bf16 step on a 2-core
EPYC with AVX512-BF16 (0.82 against 0.89 s/step, measured in one process, steps interleaved),
and rounds each weight exactly as autocast would. Normalization layers keep fp32 weights, as
under autocast.

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

_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._NormBase)


def low_precision_copy(model: nn.Module, parts: Sequence[str], dtype: torch.dtype) -> nn.Module:
    """A shallow copy of ``model`` whose submodules ``parts`` are deep copies with their
    parameters in ``dtype``, norm layers' aside; everything else is shared with ``model``."""
    twin = copy.copy(model)
    twin._modules = dict(model._modules)  # its own table of children: model keeps its own
    for name in parts:
        part = copy.deepcopy(model.get_submodule(name))
        for module in part.modules():
            if not isinstance(module, _NORMS):
                for param in module.parameters(recurse=False):
                    if param.is_floating_point():
                        param.data = param.data.to(dtype)
        twin._modules[name] = part
    return twin


class LowPrecisionCopies:
    """:func:`low_precision_copy` made once per model, parts and dtype, and made again when the
    model's weights change (a trainer tuning them in place, a new ``load_state_dict``)."""

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
