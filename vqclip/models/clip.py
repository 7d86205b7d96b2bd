"""CLIP through open_clip: architecture + weights, frozen, with everything the loop needs.

Weights come from the registry (``vqclip models``) or a local file, and are read by vqclip's safe
readers (safetensors, or the restricted unpickler for ``.bin``/``.pt``), never by ``torch.load``
with code execution. Tokenizer and mean/std come from open_clip, which ships both, so they work
offline.

Shape:
    ``encode_image``: ``(B, 3, S, S)`` in [0, 1] with ``S = input_size`` -> ``(B, D)`` float32.
    ``encode_text``: ``list[str]`` of length B -> ``(B, D)`` float32.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import load_strict, read_state_dict
from ..device import resolve_device

__all__ = ["CLIP", "fast_visual", "load_clip", "register_clip_config"]

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


@dataclass
class CLIP:
    """A frozen CLIP model with its tokenizer and preprocessing constants."""

    model: nn.Module
    tokenizer: Callable[[Sequence[str]], torch.Tensor]
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str
    # which weights these are, for caches of embeddings: the weights file's path, size and
    # modification time; None for random weights, whose embeddings are never worth keeping
    source: str | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Standardize images in [0, 1] with this model's mean/std."""
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        return (images - mean) / std

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Embed images in [0, 1] already at ``input_size``; gradients flow to ``images``."""
        # .float(): CLIP may run in fp16 on a GPU (openai/CLIP#30); the losses want fp32
        return self.model.encode_image(self.normalize(images)).float()

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed texts with open_clip's tokenizer; a text longer than its context is cut there,
        with a warning (once per model and text) that names the words dropped."""
        for text in texts:
            _warn_if_cut(self, text)
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.model.encode_text(tokens).float()


_CHECKED: set[tuple[str, str]] = set()  # (model, text) pairs already checked for length


def dropped_words(tokenizer, text: str) -> str | None:
    """What ``tokenizer`` cuts from the end of ``text`` to fit its context, as text; None when
    it fits, or when the tokenizer is not open_clip's plain BPE one (which this can read)."""
    n = getattr(tokenizer, "context_length", None)
    if not n or getattr(tokenizer, "reduction_fn", None) or not hasattr(tokenizer, "decode"):
        return None
    body = tokenizer.encode(text)  # without the start and end tokens, which take 2 places
    return tokenizer.decode(body[n - 2:]).strip() if len(body) > n - 2 else None


def _warn_if_cut(clip: CLIP, text: str) -> None:
    if (clip.name, text) in _CHECKED:
        return
    _CHECKED.add((clip.name, text))
    dropped = dropped_words(clip.tokenizer, text)
    if dropped:
        log.warning("%s reads %d tokens of a text; it drops the end of %r: %r", clip.name,
                    clip.tokenizer.context_length, text[:40] + ("..." if len(text) > 40 else ""),
                    dropped)


def register_clip_config(path: str | Path) -> str:
    """Register a custom architecture from an open_clip model-config JSON; returns its name.

    The name is the file's stem, as open_clip's own config folder does it.
    """
    import json

    import open_clip

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP config not found: {path}")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON model config ({e})") from None
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:  # open_clip would skip such a file silently
        raise ValueError(f"{path}: an open_clip model config needs {', '.join(missing)}")
    open_clip.add_model_config(path)
    return path.stem


def load_clip(arch: str, pretrained: str | Path | None = None, *, device: str | torch.device = "cpu",
              cache_dir: str | Path | None = None, download: bool = True,
              config: str | Path | None = None) -> CLIP:
    """Load a frozen CLIP model.

    Args:
        arch: an open_clip architecture (``"ViT-B-32"``), or ``"ARCH/TAG"`` from the registry.
        pretrained: a registry tag (``"openai"``), a weights file (``.safetensors``, ``.bin``,
            ``.pt``), or None for random weights (tests and training only).
        device: where to put the model; weights are read on the CPU first.
        cache_dir: the download cache.
        download: fetch registry weights that are not present yet.
        config: an open_clip model-config JSON that defines ``arch`` (custom architectures).
    Returns:
        A :class:`CLIP` in eval mode with ``requires_grad`` off.
    Raises:
        ValueError: unknown architecture or tag. FileNotFoundError: no such weights file.
        CheckpointError: unreadable weights, or weights that do not fit ``arch``.
        DownloadError: registry files that are not in the cache and cannot be fetched.

    Example:
        >>> clip = load_clip("ViT-B-32", "openai")  # doctest: +SKIP
    """
    import open_clip

    from .. import pretrained as registry

    device = resolve_device(device)
    if pretrained is None and "/" in arch and arch in registry.CLIP_MODELS:
        arch, pretrained = arch.split("/", 1)
    _register_arch(arch, pretrained, cache_dir=cache_dir, download=download, config=config)
    weights, quick_gelu, name, preprocess = _find_weights(arch, pretrained, cache_dir=cache_dir,
                                                          download=download)

    # OpenAI's weights were trained with QuickGELU; pairing them with GELU silently degrades
    # every embedding (open_clip#771), so the registry records it per entry.
    with _quiet_random_init(weights is not None):
        model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu,
                                       force_preprocess_cfg=preprocess, device="cpu")
    source = _load_weights(model, arch, weights) if weights is not None else None
    model = fast_visual(model.eval().requires_grad_(False).to(device))

    pp = open_clip.get_model_preprocess_cfg(model)
    size = _input_size(arch, pp["size"])  # before the tokenizer: a non-square model stops here
    return CLIP(model=model, tokenizer=open_clip.get_tokenizer(arch), input_size=size,
                mean=tuple(pp["mean"]), std=tuple(pp["std"]), name=name, source=source)


def fast_visual(model: nn.Module) -> nn.Module:
    """Run an open_clip ViT image tower's patch embedding and self-attention as plain matrix
    products, batch first, and its QuickGELU fused, in place; the same parameters (and
    state-dict keys) and the same results up to rounding. Other towers are returned as they are.

    Why: ``nn.MultiheadAttention`` turns batch-first input sequence-first, so its input
    projection runs as a batched product against a weight expanded per token position, and its
    backward clones transposed tensors; the stride-32 patch convolution's backward is a slow
    path on the CPU. These two took a fifth of a 32-cutout ViT-B/32 forward and backward there.
    """
    from open_clip.transformer import QuickGELU

    visual = getattr(model, "visual", None)
    conv = getattr(visual, "conv1", None)
    if isinstance(conv, nn.Conv2d) and conv.kernel_size == conv.stride and conv.padding == (0, 0) \
            and conv.groups == 1 and conv.dilation == (1, 1):
        visual.conv1 = _Patchify(conv)
    for block in getattr(getattr(visual, "transformer", None), "resblocks", []):
        attn = getattr(block, "attn", None)
        if isinstance(attn, nn.MultiheadAttention) and attn.batch_first and attn._qkv_same_embed_dim \
                and attn.bias_k is None and not attn.add_zero_attn and attn.dropout == 0 \
                and not hasattr(block, "ln_1_kv"):
            block.attn = _SelfAttention(attn)
        mlp = getattr(block, "mlp", None)
        if isinstance(getattr(mlp, "gelu", None), QuickGELU):  # as OpenAI's weights want
            mlp.gelu = _QuickGELU()
    return model


class _QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)`` as the fused ``silu(1.702 x) / 1.702``: the same function, with
    one fused kernel forward and backward instead of a sigmoid and products."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x * 1.702) / 1.702


class _Patchify(nn.Module):
    """A patch convolution (kernel = stride, no padding) as one product: ``(N, C, H, W) ->
    (N, D, H/p, W/p)``, the convolution's output layout."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias  # shared: the same state-dict keys
        self.patch = conv.kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (N, C, H, W), (ph, pw) = x.shape, self.patch
        if H % ph or W % pw:  # the convolution drops the remainder; keep its behaviour
            return F.conv2d(x, self.weight, self.bias, stride=self.patch)
        patches = x.view(N, C, H // ph, ph, W // pw, pw).permute(0, 2, 4, 1, 3, 5)
        out = F.linear(patches.reshape(N, (H // ph) * (W // pw), C * ph * pw),
                       self.weight.view(len(self.weight), -1), self.bias)  # (N, h * w, D)
        return out.view(N, H // ph, W // pw, -1).permute(0, 3, 1, 2)


class _SelfAttention(nn.Module):
    """``nn.MultiheadAttention``'s self-attention, batch first throughout: one input projection,
    a head split by view, ``scaled_dot_product_attention``. Called as open_clip calls the
    module it replaces; its parameters are that module's."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.num_heads = mha.num_heads
        self.in_proj_weight, self.in_proj_bias, self.out_proj = \
            mha.in_proj_weight, mha.in_proj_bias, mha.out_proj

    def forward(self, q_x, k_x=None, v_x=None, need_weights=False, attn_mask=None):
        if (k_x is not None and k_x is not q_x) or (v_x is not None and v_x is not q_x):
            raise ValueError("this attention is self-attention only")
        N, L, E = q_x.shape
        qkv = F.linear(q_x, self.in_proj_weight, self.in_proj_bias)  # (N, L, 3E)
        q, k, v = qkv.view(N, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if q.device.type == "cpu" and attn_mask is None and L <= _SHORT:
            out = _attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (N, H, L, E/H)
        return self.out_proj(out.transpose(1, 2).reshape(N, L, E)), None


_SHORT = 64  # tokens: up to here the two products win (measured at 50); beyond, untried


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention as two batched products, the softmax in fp32: ``(N, H, L, d)`` each.

    On the CPU this beats ``scaled_dot_product_attention`` at CLIP's short sequences (50 tokens
    for ViT-B/32), whose flash kernel's backward works in blocks made for long ones: forward
    and backward of 16 x 12 heads took 4.9 ms against 26.9 in bf16, 7.1 against 10.5 in fp32,
    on a 2-core AVX512-BF16 EPYC (torch 2.14).
    """
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (N, H, L, L)
    return scores.float().softmax(-1).to(v.dtype) @ v


def _register_arch(arch: str, pretrained: str | Path | None, *, cache_dir: str | Path | None,
                   download: bool, config: str | Path | None) -> None:
    """Register ``arch``'s model config if it has one (``config``, or the registry's, fetched if
    need be), then make sure open_clip knows ``arch``.

    Raises:
        ValueError: unknown architecture, or a registry architecture without the tag asked for.
        DownloadError: the registry's config is not in the cache and cannot be fetched.
    """
    import open_clip

    from .. import pretrained as registry

    entry = registry.CLIP_MODELS.get(f"{arch}/{pretrained}") if isinstance(pretrained, str) else None
    if config is None and entry is not None and "config" in entry["files"]:
        # a custom architecture whose model config ships beside its weights (the bundled models)
        config = registry.resolve(f"{arch}/{pretrained}", cache_dir=cache_dir,
                                  allow_download=download)["config"]
    if config is not None:
        register_clip_config(config)
    if arch not in open_clip.list_models():
        if isinstance(pretrained, str) and any(n.startswith(f"{arch}/") for n in registry.CLIP_MODELS) \
                and not _is_weights_path(pretrained):  # a bundled architecture, a tag it lacks
            raise ValueError(_unknown_tag_message(arch, pretrained))
        raise ValueError(f"unknown CLIP architecture {arch!r}; available: "
                         f"{', '.join(sorted(open_clip.list_models()))}")


def _find_weights(arch: str, pretrained: str | Path | None, *, cache_dir: str | Path | None,
                  download: bool) -> tuple[Path | None, bool, str, dict]:
    """Where ``pretrained``'s weights are, and how to build the model for them.

    Returns:
        The weights file (None for random weights), whether they want QuickGELU, the model's
        name (``ARCH/TAG`` or ``ARCH/FILE``), and the mean/std to force on open_clip's model.
    Raises:
        FileNotFoundError: no such weights file. ValueError: a tag the registry lacks.
        DownloadError: the weights are not in the cache and cannot be fetched.
    """
    import open_clip

    from .. import pretrained as registry

    if pretrained is None:
        log.warning("CLIP %s has random weights (no pretrained weights given)", arch)
        return None, False, arch, {}
    path = Path(pretrained)
    tag = f"{arch}/{pretrained}"
    if not (isinstance(pretrained, str) and tag in registry.CLIP_MODELS) and _is_weights_path(path):
        if not path.is_file():
            raise FileNotFoundError(f"CLIP weights not found: {path}")
        return path, False, f"{arch}/{path.name}", {}
    if tag not in registry.CLIP_MODELS:
        raise ValueError(_unknown_tag_message(arch, str(pretrained)))
    entry = registry.CLIP_MODELS[tag]
    # mean/std: the registry's, else what open_clip records for this tag, else its default
    tag_cfg = open_clip.get_pretrained_cfg(arch, str(pretrained))
    preprocess = {k: entry.get(k, tag_cfg.get(k)) for k in ("mean", "std")
                  if entry.get(k, tag_cfg.get(k)) is not None}
    weights = registry.resolve(tag, cache_dir=cache_dir, allow_download=download)["weights"]
    return weights, entry.get("quick_gelu", False), tag, preprocess


def _load_weights(model: nn.Module, arch: str, weights: str | Path) -> str:
    """Load ``weights`` into ``model`` (strictly); returns their ``source`` for embedding caches."""
    st = Path(weights).stat()  # weights replaced in place (retrained, say) get a new cache
    source = f"{arch}:{Path(weights).resolve()}:{st.st_size}:{st.st_mtime_ns}"
    sd = read_state_dict(weights)
    if next(iter(sd)).startswith("module."):  # open_clip training checkpoints (DDP)
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    scale = sd.get("logit_scale")
    if scale is not None and scale.numel() == 1 and scale.ndim != model.logit_scale.ndim:
        sd["logit_scale"] = scale.reshape(model.logit_scale.shape)  # 0-d vs 1-d across versions
    load_strict(model, sd, weights, what=f"CLIP {arch}")
    return source


def _input_size(arch: str, size: int | Sequence[int]) -> int:
    """The side of the square input that open_clip's preprocess config gives."""
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise ValueError(f"CLIP {arch}: non-square input {size} is not supported")
        size = size[0]
    return int(size)


def _is_weights_path(pretrained: str | Path) -> bool:
    """Whether ``pretrained`` names a file rather than a registry tag."""
    path = Path(pretrained)
    return path.suffix in _WEIGHT_SUFFIXES or path.is_file() or len(path.parts) > 1


@contextlib.contextmanager
def _quiet_random_init(weights_follow: bool):
    # open_clip warns on the root logger that the model "initialized randomly" whenever it loads
    # no weights itself; ours are loaded right after, so the warning would be false.
    def drop(record: logging.LogRecord) -> bool:
        return not (weights_follow and "initialized randomly" in record.getMessage())

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _unknown_tag_message(arch: str, tag: str) -> str:
    import open_clip

    from ..pretrained import CLIP_MODELS

    ours = [n.split("/", 1)[1] for n in CLIP_MODELS if n.startswith(f"{arch}/")]
    theirs = open_clip.list_pretrained_tags_by_model(arch)
    msg = f"no registry weights {arch}/{tag}"
    msg += f"; vqclip's registry has: {', '.join(ours) or 'none for this architecture'}"
    if tag in theirs:
        msg += (f". open_clip knows {arch}/{tag}: download its weights file (see "
                f"open_clip.get_pretrained_cfg({arch!r}, {tag!r})) and pass its path instead")
    return msg

