"""vqclip: text-to-image generation guided by CLIP (VQGAN+CLIP), and zero-shot scoring.

Importing the package loads nothing heavy; the names below import their modules on first use.
"""

from importlib import import_module

__all__ = ["CLIP", "EnsembleScorer", "GenerateConfig", "GenerationResult", "Generator", "Scorer",
           "VQGAN", "download",
           "generate", "list_models", "load_clip", "load_config", "load_vqgan", "resolve_device"]
__version__ = "0.1.0"

_LAZY = {
    "CLIP": "vqclip.models.clip", "load_clip": "vqclip.models.clip",
    "VQGAN": "vqclip.models.vqgan", "load_vqgan": "vqclip.models.vqgan",
    "download": "vqclip.pretrained", "list_models": "vqclip.pretrained",
    "resolve_device": "vqclip.device",
    "GenerateConfig": "vqclip.config", "load_config": "vqclip.config",
    "Generator": "vqclip.generator", "GenerationResult": "vqclip.outputs",
    "generate": "vqclip.generator",
    "Scorer": "vqclip.scoring", "EnsembleScorer": "vqclip.ensemble",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vqclip' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
