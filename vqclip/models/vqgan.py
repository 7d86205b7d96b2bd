"""Inference-only VQGAN built from taming-transformers' building blocks.

``taming.models.vqgan.VQModel`` is a Lightning module that builds its training loss in
``__init__`` (LPIPS downloads VGG weights; the discriminator is dead weight for inference) and
imports ``pytorch_lightning`` APIs that no longer exist. :class:`VQGAN` uses only
``taming.modules`` (Encoder, Decoder, VectorQuantizer2, GumbelQuantize) under the same attribute
names, so the official checkpoints load strictly, key for key.

Shape:
    image ``(B, 3, H, W)`` in [0, 1] <-> latents ``(B, D, H/f, W/f)`` with ``D = embed_dim``
    and ``f = downsample_factor``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoints import (
    load_strict,
    read_safetensors_metadata,
    read_state_dict,
    save_safetensors,
)
from ..device import resolve_device

__all__ = ["VQGAN", "VQGANConfig", "clamp_with_grad", "converted_path", "load_vqgan",
           "read_vqgan_config"]

log = logging.getLogger(__name__)

# Official YAMLs name a Lightning class; we read it as data to pick the quantizer, never import it.
_TARGETS = {"taming.models.vqgan.VQModel": "vq", "taming.models.vqgan.GumbelVQ": "gumbel"}


@dataclass
class VQGANConfig:
    """The architecture of a taming VQGAN: the ``model.params`` of its YAML."""

    kind: str  # "vq" or "gumbel"
    embed_dim: int
    n_embed: int
    ddconfig: dict[str, Any] = field(default_factory=dict)
    kl_weight: float = 1e-8  # gumbel only; kept so a converted file round-trips

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str | Path = "config") -> "VQGANConfig":
        try:
            cfg = cls(**json.loads(text))
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{source}: not a VQGAN config ({e})") from None
        return cfg.check(source)

    def check(self, source: str | Path = "config") -> "VQGANConfig":
        """Validate against what taming's modules accept, within sane bounds.

        The bounds keep a tiny hostile config from asking for hours of compute or terabytes of
        memory; every released VQGAN is far inside them.

        Raises:
            ValueError: naming the offending field.
        """
        dd = self.ddconfig
        problems = []
        if self.kind not in ("vq", "gumbel"):
            problems.append(f"kind {self.kind!r}")
        unknown = sorted(set(dd) - _DDCONFIG_KEYS)
        missing = sorted(_DDCONFIG_REQUIRED - set(dd))
        if unknown:
            problems.append(f"unknown ddconfig keys {unknown}")
        if missing:
            problems.append(f"ddconfig lacks {missing}")
        for name, value, top in [("embed_dim", self.embed_dim, 4096), ("n_embed", self.n_embed, 2 ** 20),
                                 *[(f"ddconfig.{k}", dd.get(k), top) for k, top in _DDCONFIG_BOUNDS.items()]]:
            if value is not None and not (type(value) is int and 0 < value <= top):
                problems.append(f"{name}={value!r} (an integer in 1..{top})")
        mult = dd.get("ch_mult", [])
        if not (isinstance(mult, (list, tuple)) and 0 < len(mult) <= 8
                and all(type(m) is int and 0 < m <= 16 for m in mult)):
            problems.append(f"ddconfig.ch_mult={mult!r} (1 to 8 integers in 1..16)")
        if self.kind == "gumbel" and dd.get("z_channels") != self.embed_dim:
            # GumbelVQ projects quant_conv's embed_dim output with a conv built for z_channels
            problems.append(f"a GumbelVQ needs ddconfig.z_channels == embed_dim, "
                            f"got {dd.get('z_channels')} and {self.embed_dim}")
        if problems:
            raise ValueError(f"{source}: bad VQGAN config: " + "; ".join(problems))
        return self


# What taming's Encoder/Decoder take (they ignore unknown keys silently, so we do not).
_DDCONFIG_REQUIRED = {"ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions",
                      "in_channels", "resolution", "z_channels"}
_DDCONFIG_KEYS = _DDCONFIG_REQUIRED | {"double_z", "dropout", "resamp_with_conv", "give_pre_end"}
_DDCONFIG_BOUNDS = {"ch": 1024, "out_ch": 16, "in_channels": 16, "num_res_blocks": 16,
                    "resolution": 8192, "z_channels": 4096}


def read_vqgan_config(path: str | Path) -> VQGANConfig:
    """Read a taming-format YAML (``model: {target, params}``) as data.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a target other than VQModel/GumbelVQ, or missing/unsupported params.
    """
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VQGAN config not found: {path}")
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable YAML file ({e})") from None
    model = cfg.get("model", cfg) if isinstance(cfg, dict) else None
    if not isinstance(model, dict) or "params" not in model:
        raise ValueError(f"{path}: expected a taming config with model.target and model.params")
    target = model.get("target", "taming.models.vqgan.VQModel")
    if target not in _TARGETS:
        raise ValueError(f"{path}: unsupported model.target {target!r}; "
                         f"supported: {', '.join(sorted(_TARGETS))}")
    params = model["params"]
    if params.get("remap") is not None:
        raise ValueError(f"{path}: codebook remapping (params.remap) is not supported")
    missing = [k for k in ("embed_dim", "n_embed", "ddconfig") if k not in params]
    if missing:
        raise ValueError(f"{path}: model.params lacks {', '.join(missing)}")
    if not isinstance(params["ddconfig"], dict):
        raise ValueError(f"{path}: model.params.ddconfig must be a mapping")
    cfg = VQGANConfig(kind=_TARGETS[target], embed_dim=params["embed_dim"],
                      n_embed=params["n_embed"], ddconfig=dict(params["ddconfig"]),
                      kl_weight=float(params.get("kl_weight", 1e-8)))
    return cfg.check(path)


class _ClampWithGrad(torch.autograd.Function):
    # A clamp whose gradient still flows where it points back into [min, max]: a plain clamp
    # would zero it for saturated pixels and leave them stuck (crowsonkb's VQGAN+CLIP notebook).
    @staticmethod
    def forward(ctx, x, lo, hi):
        ctx.lo, ctx.hi = lo, hi
        ctx.save_for_backward(x)
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        inward = grad * (grad * (x - x.clamp(ctx.lo, ctx.hi)) >= 0)
        return inward, None, None


def clamp_with_grad(x: torch.Tensor, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """Clamp to [lo, hi], passing gradients that move a value inward (or keep it inside)."""
    return _ClampWithGrad.apply(x, lo, hi)


class VQGAN(nn.Module):
    """Encoder, quantizer and decoder of a taming VQGAN, for inference and latent optimization.

    Attribute names match taming's ``VQModel``/``GumbelVQ`` so state dicts load strictly.
    """

    def __init__(self, config: VQGANConfig):
        super().__init__()
        from taming.modules.diffusionmodules import model as taming_model
        from taming.modules.diffusionmodules.model import Decoder, Encoder
        from taming.modules.vqvae.quantize import GumbelQuantize, VectorQuantizer2

        # taming's blocks call the module's nonlinearity(x) = x * sigmoid(x), the swish: three
        # passes over every activation forward and three backward, a sixth of the decoder's
        # time on a CPU. F.silu is the same function, fused.
        taming_model.nonlinearity = torch.nn.functional.silu

        self.config = config
        dd = config.ddconfig
        with contextlib.redirect_stdout(io.StringIO()):  # taming's Decoder prints the z shape
            self.encoder = Encoder(**dd)
            self.decoder = Decoder(**dd)
        if config.kind == "gumbel":
            self.quantize = GumbelQuantize(dd["z_channels"], config.embed_dim,
                                           n_embed=config.n_embed, kl_weight=config.kl_weight)
        else:
            self.quantize = VectorQuantizer2(config.n_embed, config.embed_dim, beta=0.25)
        self.quant_conv = nn.Conv2d(dd["z_channels"], config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, dd["z_channels"], 1)

    @property
    def codebook(self) -> torch.Tensor:
        """The code vectors, ``(n_embed, embed_dim)``."""
        if self.config.kind == "gumbel":
            return self.quantize.embed.weight
        return self.quantize.embedding.weight

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along each side (16 for the f16 models)."""
        return 2 ** (len(self.config.ddconfig["ch_mult"]) - 1)

    def round_side(self, side: int) -> int:
        """The nearest image side this VQGAN makes (a multiple of its factor), with a notice."""
        f = self.downsample_factor
        rounded = max(f, int(side / f + 0.5) * f)  # half up: 33 -> 34 for f = 2
        if rounded != side:
            log.info("size %d rounded to %d: a multiple of this VQGAN's factor %d", side, rounded, f)
        return rounded

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Encode an image in [0, 1], ``(B, 3, H, W)``, to latents ``(B, D, H/f, W/f)``.

        For a VQ model these are the continuous pre-quantization latents. A Gumbel model has
        none in code space, so it returns the code vectors of its most likely codes.
        """
        h = self.quant_conv(self.encoder(image * 2 - 1))
        if self.config.kind == "gumbel":
            indices = self.quantize.proj(h).argmax(1)  # (B, h, w)
            return self.codebook[indices].permute(0, 3, 1, 2)
        return h

    def quantize_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Snap each latent vector to its nearest code; the gradient passes straight through.

        Shape: ``(B, D, h, w) -> (B, D, h, w)``.
        """
        codebook = self.codebook
        flat = z.movedim(1, -1)  # (B, h, w, D)
        d = (flat.pow(2).sum(-1, keepdim=True) + codebook.pow(2).sum(-1)
             - 2 * flat @ codebook.T)  # (B, h, w, n_embed)
        z_q = codebook[d.argmin(-1)].movedim(-1, 1)
        return z + (z_q - z).detach()

    def decode(self, z: torch.Tensor, checkpoint: bool = False) -> torch.Tensor:
        """Decode latents ``(B, D, h, w)`` to an image ``(B, 3, h*f, w*f)`` in [0, 1].

        The clamp to [0, 1] passes gradients that point inward (:func:`clamp_with_grad`).
        ``checkpoint``: keep only each block's input for the backward and recompute the rest
        (:func:`torch.utils.checkpoint.checkpoint`): less memory, one more decoder forward.
        The decoder runs channels-last, whatever layout z has: forward and backward at 256x256
        took 1.15 s against 1.87 channels-first in bf16, 2.06 against 3.58 in fp32, on a 2-core
        AVX512-BF16 EPYC.
        """
        h = self.post_quant_conv(z.contiguous(memory_format=torch.channels_last))
        x = _checkpointed_decoder(self.decoder, h) if checkpoint else self.decoder(h)  # [-1, 1]
        return clamp_with_grad(x.add(1).div(2), 0.0, 1.0)


def _checkpointed_decoder(dec: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """taming's ``Decoder.forward`` (no timestep embedding), each block under a checkpoint."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    from taming.modules.diffusionmodules.model import nonlinearity

    ck = partial(checkpoint, use_reentrant=False, preserve_rng_state=False)  # no randomness
    h = dec.conv_in(h)
    h = dec.mid.attn_1(ck(dec.mid.block_1, h, None))
    h = ck(dec.mid.block_2, h, None)
    for i in reversed(range(dec.num_resolutions)):
        level = dec.up[i]
        for j, block in enumerate(level.block):
            h = ck(block, h, None)
            if len(level.attn) > 0:
                h = ck(level.attn[j], h)
        if i != 0:
            h = ck(level.upsample, h)
    if dec.give_pre_end:
        return h
    return dec.conv_out(nonlinearity(dec.norm_out(h)))


def _model_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Official checkpoints carry the training loss (LPIPS, discriminator) under "loss.";
    # the inference model has no such part, so those keys are dropped and nothing else.
    return {k: v for k, v in sd.items() if not k.startswith("loss.")}


def converted_path(ckpt: Path, cache_dir: Path, config: VQGANConfig) -> Path:
    """Where the safetensors conversion of ``ckpt`` (read with ``config``) lives in the cache.

    The key is the file's size and its last MiB, which in a torch zip archive holds the central
    directory with the CRC-32 of every tensor record: a content fingerprint that costs one read
    instead of hashing a gigabyte. Copies of one file share a conversion; edits do not.
    """
    size = ckpt.stat().st_size
    with open(ckpt, "rb") as f:
        f.seek(max(0, size - (1 << 20)))
        tail = f.read()
    key = hashlib.sha256(f"{size}|{config.to_json()}|".encode() + tail).hexdigest()
    # the folder names the model: every official release is called last.ckpt
    return cache_dir / "converted" / f"{ckpt.parent.name}--{ckpt.stem}-{key[:16]}.safetensors"


def load_vqgan(name_or_path: str | Path, config: str | Path | None = None, *,
               device: str | torch.device = "cpu", cache_dir: str | Path | None = None,
               convert: bool = True, download: bool = True) -> VQGAN:
    """Load a VQGAN for inference: a registry name, a taming ``.ckpt`` or a ``.safetensors``.

    Args:
        name_or_path: a name from ``vqclip models`` (e.g. ``"imagenet_f16_16384"``) or a path.
        config: the taming YAML. Optional for registry names, for ``.safetensors`` files written
            by vqclip (the config is in their header) and when ``<ckpt stem>.yaml`` sits beside.
        device: where to put the model; weights are read on the CPU first.
        cache_dir: the download/conversion cache (default: ``$VQCLIP_CACHE`` or ~/.cache/vqclip).
        convert: store a safetensors copy of a ``.ckpt`` in the cache once, and read that later.
        download: fetch a registry model that is not present yet.
    Returns:
        A frozen :class:`VQGAN` in eval mode.
    Raises:
        FileNotFoundError, ValueError, CheckpointError, DownloadError (see messages).

    Example:
        >>> vqgan = load_vqgan("imagenet_f16_16384", device="cuda")  # doctest: +SKIP
    """
    from .. import pretrained

    device = resolve_device(device)
    cache = pretrained.get_cache_dir(cache_dir)
    if isinstance(name_or_path, str) and name_or_path in pretrained.VQGAN_MODELS:
        files = pretrained.resolve(name_or_path, cache_dir=cache, allow_download=download)
        path, config = files["ckpt"], config or files["config"]
    else:
        path = Path(name_or_path)
        if not path.is_file():
            if path.suffix in (".ckpt", ".safetensors", ".pt", ".pth") or len(path.parts) > 1:
                raise FileNotFoundError(f"VQGAN checkpoint not found: {path}")
            raise ValueError(f"unknown VQGAN {str(name_or_path)!r}; available: "
                             f"{', '.join(pretrained.VQGAN_MODELS)} (or a .ckpt/.safetensors path)")

    target = None
    if path.suffix == ".safetensors":
        cfg = read_vqgan_config(config) if config else _embedded_config(path)
        sd = read_state_dict(path)
    else:
        if config is None:
            config = path.with_suffix(".yaml")
            if not config.is_file():
                raise ValueError(f"{path}: no config given and no {config.name} beside it; "
                                 "pass the taming YAML as config")
        cfg = read_vqgan_config(config)
        target = converted_path(path, cache, cfg) if convert else None
        if target is not None and target.is_file():
            log.info("reading %s (converted from %s)", target, path)
            sd, target = read_state_dict(target), None
        else:
            sd = read_state_dict(path)

    with torch.device("meta"):  # no memory, no random init: every weight is replaced next
        model = VQGAN(cfg)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in _model_state(sd).items()}
    load_strict(model, sd, path, what="this VQGAN config", assign=True)
    if target is not None:  # only weights that loaded strictly are worth keeping
        _try_convert(model.state_dict(), cfg, target)
    return model.eval().requires_grad_(False).to(device)


def _embedded_config(path: Path) -> VQGANConfig:
    meta = read_safetensors_metadata(path)
    if "vqclip.vqgan_config" not in meta:
        raise ValueError(f"{path}: no VQGAN config in this file's header; pass the taming YAML")
    return VQGANConfig.from_json(meta["vqclip.vqgan_config"], source=path)


def _try_convert(sd: dict[str, torch.Tensor], cfg: VQGANConfig, target: Path) -> None:
    try:
        save_safetensors(sd, target, metadata={"vqclip.vqgan_config": cfg.to_json()})
        log.info("converted to safetensors once: %s", target)
    except OSError as e:  # a read-only cache must not stop loading
        log.warning("could not write the safetensors conversion %s: %s", target, e)
