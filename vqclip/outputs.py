"""What a generation produced, and its files: the result, the names its files get, and the checks
that they can be written before any work starts.

Files of a run saved as ``out.png``:
    one candidate: ``out.png`` (its record in PNG text chunks) and ``out.yaml`` (the same record);
    K > 1 candidates: ``out-0.png`` ... ``out-(K-1).png``, each with its ``.yaml``, and
    ``out-ranking.json``, the candidates best first; ``out.state.safetensors``, what a run
    needs to go on (``output.save_state``; :mod:`vqclip.resume`).

A video (``output.video``) gets a frame every ``output.save_every`` steps and one of the final
images, each the candidates side by side (:func:`video_frame`); the loop writes it as it goes.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from . import __version__
from .images import atomic_path, save_png

__all__ = ["GenerationResult", "candidate_paths", "check_outputs", "claim_run_folder", "ranking_path", "state_path", "video_frame"]


@dataclass
class GenerationResult:
    """What a run produced.

    Attributes:
        images: one PIL image per candidate.
        tensor: the same, ``(K, 3, H, W)`` in [0, 1] on the CPU.
        losses: ``(steps_done, K)``, each candidate's loss at every step (before that step's update).
        seeds: candidate k's seed.
        config: the resolved config (seed and rounded size filled in).
        timings: seconds for ``setup`` (prompts, init), ``steps``, ``per_step``, ``rank`` (scoring
            the results) and ``total``.
        files: what was written (PNGs, sidecars, ranking, video).
        scores: each candidate's CLIP score against the text prompt (see
            :meth:`vqclip.scoring.Scorer.rank`), by ``ranked_by``; None without a text prompt.
    """

    images: list[Image.Image]
    tensor: torch.Tensor
    losses: torch.Tensor
    seeds: list[int]
    config: DictConfig
    timings: dict[str, float]
    steps_done: int
    interrupted: bool = False
    files: list[Path] = field(default_factory=list)
    scores: list[float] | None = None
    ranked_by: str | None = None

    @property
    def order(self) -> list[int]:
        """Candidate indices, best score first (in candidate order without scores)."""
        if self.scores is None:
            return list(range(len(self.images)))
        return sorted(range(len(self.scores)), key=lambda k: -self.scores[k])

    @property
    def best(self) -> int:
        """The best candidate: ranked first, or where nothing ranked (no text prompt, Ctrl-C)
        the one with the lowest last loss."""
        if self.scores is not None or not len(self.losses):
            return self.order[0]
        return int(self.losses[-1].argmin())

    def info(self, k: int = 0) -> dict[str, Any]:
        """Candidate k's record: prompt, seed, models and the full resolved config."""
        c = self.config
        return {"prompt": c.prompts.text, "seed": self.seeds[k], "candidate": k,
                "vqgan": c.models.vqgan, "clip": f"{c.models.clip}/{c.models.clip_pretrained}",
                "steps_done": self.steps_done, "interrupted": self.interrupted,
                **({"clip_score": round(self.scores[k], 6), "rank": self.order.index(k) + 1,
                    "ranked_by": self.ranked_by} if self.scores is not None else {}),
                "vqclip_version": __version__, "config": OmegaConf.to_container(c)}

    def save(self, path: str | Path) -> list[Path]:
        """Write each candidate as a PNG with its record in text chunks, plus a ``.yaml`` sidecar.

        Candidate k of K > 1 goes to ``<stem>-<k>.png``, and the ranking of the candidates to
        ``<stem>-ranking.json`` (best first); with ``output.best_only``, :attr:`best` alone goes
        to ``path``. Every file is written atomically.
        """
        written = []
        kept = range(len(self.images))
        paths = candidate_paths(path, len(self.images))
        if self.config.output.best_only and len(self.images) > 1:
            kept, paths = [self.best], [Path(path)]
        for k, path_k in zip(kept, paths, strict=True):
            path_k.parent.mkdir(parents=True, exist_ok=True)
            info = self.info(k)
            text = {key: OmegaConf.to_yaml(value) if isinstance(value, dict) else str(value)
                    for key, value in info.items()}
            written.append(save_png(self.images[k], path_k, text))
            sidecar = path_k.with_suffix(".yaml")
            with atomic_path(sidecar) as tmp:
                tmp.write_text(OmegaConf.to_yaml(info))
            written.append(sidecar)
        if len(paths) > 1:
            ranking = ranking_path(path)
            records = [{"rank": r + 1, "candidate": k, "path": str(paths[k]), "seed": self.seeds[k],
                        "score": None if self.scores is None else round(self.scores[k], 6)}
                       for r, k in enumerate(self.order)]
            with atomic_path(ranking) as tmp:
                tmp.write_text(json.dumps({"prompt": self.config.prompts.text,
                                           "ranked_by": self.ranked_by,
                                           "best": records[0]["path"] if self.scores else None,
                                           "candidates": records}, indent=2) + "\n")
            written.append(ranking)
        self.files.extend(written)
        return written


def claim_run_folder(prompt: str, root: str | Path = "outputs") -> Path:
    """Create a new folder under ``root`` named by date and a slug of the prompt.

    Created here, with ``exist_ok=False``, so that two runs started in the same second (one per
    GPU, say) never share one.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower().split("|")[0]).strip("-")[:40].strip("-")
    base = Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug or 'image'}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        folder = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise FileExistsError(f"could not make a new run folder beside {base}")


def candidate_paths(path: str | Path, k: int) -> list[Path]:
    """``path`` for one candidate; ``<stem>-0.png`` ... ``<stem>-(k-1).png`` for several."""
    path = Path(path)
    return [path] if k == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(k)]


def state_path(output: str | Path) -> Path:
    """Where the state of a run saved as ``output`` goes, to go on from (:mod:`vqclip.resume`):
    ``out.png`` -> ``out.state.safetensors``, one file for all the candidates."""
    output = Path(output)
    return output.with_name(f"{output.stem}.state.safetensors")


def ranking_path(path: str | Path) -> Path:
    """Where the ranking of several candidates saved as ``path`` goes."""
    path = Path(path)
    return path.with_name(f"{path.stem}-ranking.json")


def check_outputs(cfg: DictConfig) -> list[Path]:
    """Check, before any work, that a run's files can be written; returns them.

    Refuses existing files unless ``output.overwrite``, and folders in their place; creates the
    parent folders and tries writing in each.

    Raises:
        FileExistsError, IsADirectoryError, PermissionError (all OSError): see messages.
    """
    saved = 1 if cfg.output.best_only else cfg.candidates
    paths = candidate_paths(cfg.output.path, saved) if cfg.output.path else []
    planned = [*paths, *(p.with_suffix(".yaml") for p in paths)]
    if len(paths) > 1:
        planned.append(ranking_path(cfg.output.path))
    if paths and cfg.output.save_state:
        planned.append(state_path(cfg.output.path))
    if cfg.output.video:
        planned.append(Path(cfg.output.video))
    for p in planned:
        if p.is_dir():
            raise IsADirectoryError(f"{p} is a folder; give a file name for the output")
        if p.exists() and not cfg.output.overwrite:
            raise FileExistsError(f"{p} exists; choose another output or allow overwriting "
                                  "(--overwrite, output.overwrite=true)")
    for folder in {p.parent for p in planned}:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".vqclip-write-test-{os.getpid()}"
        try:
            probe.touch()
        except OSError as e:
            raise PermissionError(f"cannot write in {folder}: {e.strerror}") from None
        probe.unlink()
    return paths


def video_frame(images: torch.Tensor) -> np.ndarray:
    """A video frame: the candidates side by side in a grid, ``(H, W, 3)`` uint8, even sides.

    Args:
        images: ``(K, 3, H, W)`` in [0, 1], on any device.
    """
    from torchvision.utils import make_grid

    grid = make_grid(images.detach().float().cpu(), nrow=math.ceil(math.sqrt(len(images))),
                     padding=2 if len(images) > 1 else 0)
    grid = F.pad(grid, (0, grid.shape[2] % 2, 0, grid.shape[1] % 2))  # even sides for the encoder
    return grid.clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
