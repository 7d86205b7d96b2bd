"""CLIP ensembles: several models that guide one run, and that score as one.

A run's guides are the main CLIP (``models.clip``, weight ``models.clip_weight``) and the members
of ``models.ensemble``. Each sees its own cutouts of the image at its own input size (drawn one
model after another from the candidate's stream), with its own embeddings of the prompts; the
loss is the weighted mean of the models' losses. Images that fool one model (adversarial
patterns rather than the thing asked for) rarely fool a differently built one.

Without ``models.rank_clip``, the candidates are ranked by the ensemble's score, the weighted
mean of each model's (:class:`EnsembleScorer`, which ``rank``, ``classify`` and ``search`` use
too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from .scoring import BaseScorer, Classification, ImageLike, Scorer, _as_items, check_labels

__all__ = ["EnsembleScorer", "Guide", "guide_weights", "loaded_models", "member_name",
           "models_text", "ranker"]


@dataclass
class Guide:
    """One CLIP of a run: its cutouts (``MakeCutouts`` at its input size), its prompt targets,
    and its share of the loss (the shares sum to 1)."""

    clip: object
    cutouts: object
    targets: list
    weight: float


def member_name(arch: str, pretrained: str | None) -> str:
    """``ARCH/TAG`` (or ``ARCH/path``) of an ensemble member, as the registry names models."""
    return arch if pretrained is None else f"{arch}/{pretrained}"


def guide_weights(models: DictConfig) -> list[float]:
    """The main CLIP's and each member's share of the loss, summing to 1 (exactly 1.0 for a
    lone model, so that a run without an ensemble is unchanged)."""
    weights = [models.clip_weight, *(m.weight for m in models.ensemble)]
    return [w / sum(weights) for w in weights]


def loaded_models(models: DictConfig) -> dict:
    """What of a ``models`` section a Generator loads: all of it but the guides' weights."""
    out = OmegaConf.to_container(models)
    out.pop("clip_weight")
    out["ensemble"] = [{k: v for k, v in e.items() if k != "weight"} for e in out["ensemble"]]
    return out


def models_text(models: DictConfig) -> str:
    """A generation's models in a few words: ``vqgan + clip`` and the ensemble's members."""
    members = "".join(f" + {member_name(e.arch, e.pretrained)}" for e in models.ensemble)
    return f"{models.vqgan} + {models.clip}{members}"


def ranker(gen, cfg: DictConfig) -> BaseScorer:
    """What ranks a run's candidates: ``gen.rank_clip``'s Scorer (which may be one of the guides),
    else the guide's own (``gen.scorer``), else an :class:`EnsembleScorer` of the guides with
    ``cfg``'s weights. Each model's Scorer is made once per generator."""
    made = gen._scorers
    if gen.rank_clip is gen.clip or (gen.rank_clip is None and len(gen.clips) == 1):
        return gen.scorer
    if gen.rank_clip is not None:
        if "rank" not in made:
            made["rank"] = Scorer(gen.rank_clip, cache=False)
        return made["rank"]
    for k, clip in enumerate(gen.clips[1:], 1):
        if k not in made:
            made[k] = Scorer(clip)
    return EnsembleScorer([gen.scorer, *(made[k] for k in range(1, len(gen.clips)))],
                          guide_weights(cfg.models))


class EnsembleScorer(BaseScorer):
    """Several :class:`Scorer` as one: a score is the weighted mean of theirs, and a
    classification's probabilities the weighted mean of each model's, over the images that every
    model could read. ``rank``, ``search`` and ``describe`` work as a Scorer's; what belongs to
    one model (its encoders, embeddings and cache) is each of ``scorers``'.

    Args:
        scorers: one per model.
        weights: each model's share; they are scaled to sum to 1.
    """

    def __init__(self, scorers: Sequence[Scorer], weights: Sequence[float]):
        if len(scorers) != len(weights) or not scorers or min(weights) <= 0:
            raise ValueError("an ensemble needs one weight > 0 per model")
        self.scorers = list(scorers)
        self.weights = [w / sum(weights) for w in weights]

    @property
    def name(self) -> str:
        return "ensemble of " + ", ".join(f"{s.name} ({w:.3g})"
                                          for s, w in zip(self.scorers, self.weights, strict=True))

    def score(self, images: Iterable[ImageLike] | torch.Tensor, prompt: str,
              progress: bool = False) -> tuple[torch.Tensor, list[int]]:
        items = _as_items(images)
        runs = []  # each model's scores by input index
        for scorer in self.scorers:
            scores, kept = scorer.score(items, prompt, progress)
            runs.append(dict(zip(kept, scores.tolist(), strict=True)))
        kept = sorted(set.intersection(*(set(run) for run in runs)))
        return torch.tensor([sum(w * run[i] for w, run in zip(self.weights, runs, strict=True))
                             for i in kept]), kept

    def classify(self, images: Iterable[ImageLike] | torch.Tensor, labels: Sequence[str],
                 templates: Sequence[str] | None = None, progress: bool = False
                 ) -> list[Classification]:
        labels, items = check_labels(labels), _as_items(images)
        runs = [{c.index: c for c in s.classify(items, labels, templates, progress)}
                for s in self.scorers]
        out = []
        for i in sorted(set.intersection(*(set(run) for run in runs))):
            probs = {label: sum(w * run[i].probs[label] for w, run in
                                zip(self.weights, runs, strict=True)) for label in labels}
            out.append(Classification(i, max(probs, key=probs.get), probs, runs[0][i].path))
        return out
