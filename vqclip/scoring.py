"""Zero-shot scoring with the CLIP that guides generation: classify, rank, search and describe.

A :class:`Scorer` wraps a loaded :class:`vqclip.models.clip.CLIP`. Built from a Generator's CLIP
(``Scorer(gen.clip)`` or ``gen.scorer``), one load serves both. Images are prepared with
open_clip's own evaluation transform for the model (resize, centre crop, normalize) and encoded
in batches without gradients.

Scores:
    rank and search: the cosine similarity of image and prompt. A weighted prompt
    (``"a red circle:1|a square:-0.5"``, the syntax of generate) scores
    ``sum(w * cos) / sum(|w|)``; stops are ignored.
    classify and describe: CLIP's softmax over the labels, ``softmax(logit_scale * cos)``, where
    each label's text embedding is the mean over the prompt templates (the CLIP paper's ensemble).

Image files met by search (and by rank/classify when given paths) go through an on-disk cache of
embeddings per model, keyed by the file's content hash (see :mod:`vqclip.embedding_cache`).

Shape:
    ``encode_images``: N images -> ``(M, D)`` unit vectors for the M that could be read.
    ``encode_texts``: T texts -> ``(T, D)`` unit vectors.

Example:
    >>> scorer = Scorer.load(preset="shapes")  # doctest: +SKIP
    >>> scorer.classify(["x.png"], ["red circle", "blue square"])[0].top
    'red circle'
"""

from __future__ import annotations

import hashlib
import heapq
import io
import itertools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, Union

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from .embedding_cache import EmbeddingCache, stat_key
from .images import IMAGE_SUFFIXES, image_files, iter_image_files, to_pil, to_rgb
from .prompts import parse_text_prompts

__all__ = ["BaseScorer", "Classification", "EmbeddingCache", "IMAGE_SUFFIXES", "Match", "Scorer", "check_labels",
           "check_prompt", "check_templates", "image_files", "iter_image_files"]

log = logging.getLogger(__name__)

ImageLike = Union[str, Path, Image.Image, torch.Tensor]


@dataclass
class Match:
    """One image's score; ``index`` is its position among the inputs (or in the folder listing)."""

    index: int
    score: float
    path: str | None = None


@dataclass
class Classification:
    """One image's probabilities over the labels, and the most likely label."""

    index: int
    top: str
    probs: dict[str, float]
    path: str | None = None


class BaseScorer:
    """What every scorer does with its :meth:`score` and :meth:`classify`: rank, search and
    describe. :class:`Scorer` scores with one CLIP, :class:`vqclip.ensemble.EnsembleScorer`
    with several."""

    name: str

    def score(self, images: Iterable[ImageLike] | torch.Tensor, prompt: str,
              progress: bool = False) -> tuple[torch.Tensor, list[int]]:
        raise NotImplementedError

    def classify(self, images: Iterable[ImageLike] | torch.Tensor, labels: Sequence[str],
                 templates: Sequence[str] | None = None, progress: bool = False
                 ) -> list[Classification]:
        raise NotImplementedError

    def rank(self, images: Iterable[ImageLike] | torch.Tensor, prompt: str,
             progress: bool = False) -> list[Match]:
        """Score images against a prompt (weighted syntax allowed), best first."""
        items = _as_items(images)
        scores, kept = self.score(items, prompt, progress)
        order = scores.argsort(descending=True, stable=True).tolist()
        return [Match(kept[j], scores[j].item(), _path(items[kept[j]])) for j in order]

    def search(self, folder: str | Path, query: str, top_k: int | None = 10,
               progress: bool = False, min_score: float | None = None) -> list[Match]:
        """The ``top_k`` images under ``folder`` that best match ``query`` (see :func:`image_files`
        for which files count), best first; with ``min_score``, those that score at least that
        (at most ``top_k`` of them, if given), read from the folder as a stream (:meth:`filter`).
        """
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if min_score is None:
            return self.rank(image_files(folder), query, progress)[:top_k]
        if not -1 <= min_score <= 1:
            raise ValueError(f"min_score is a cosine similarity, in [-1, 1]; got {min_score}")
        matches = self.filter(iter_image_files(folder), query, min_score, progress=progress)
        if top_k is not None:
            return heapq.nlargest(top_k, matches, key=lambda m: m.score)  # ties: folder order
        return sorted(matches, key=lambda m: -m.score)

    def filter(self, images: Iterable[str | Path], prompt: str, min_score: float,
               chunk_size: int = 4096, progress: bool = False) -> Iterator[Match]:
        """The images that score at least ``min_score`` against ``prompt``, in input order, as a
        stream: ``images`` is read ``chunk_size`` at a time, so memory holds one chunk of
        embeddings however many images there are (cached ones are read, not encoded).
        """
        check_prompt(prompt)
        images, offset = iter(images), 0
        with tqdm(desc="search", unit="img", disable=not progress, leave=False) as bar:
            while chunk := list(itertools.islice(images, chunk_size)):
                scores, kept = self.score(chunk, prompt)
                yield from (Match(offset + j, s, _path(chunk[j]))
                            for j, s in zip(kept, scores.tolist(), strict=True) if s >= min_score)
                offset += len(chunk)
                bar.update(len(chunk))

    def describe(self, image: ImageLike, texts: Sequence[str], top_k: int | None = 5
                 ) -> list[tuple[str, float]]:
        """Image to text: the candidate ``texts`` that best describe ``image``, with their
        probabilities, best first."""
        result = self.classify([image], texts)
        if not result:
            raise ValueError(f"cannot read image {image}")
        return sorted(result[0].probs.items(), key=lambda kv: -kv[1])[:top_k]


class Scorer(BaseScorer):
    """Zero-shot scoring on a loaded CLIP.

    Args:
        clip: a :class:`vqclip.models.clip.CLIP`, e.g. a Generator's ``clip``.
        batch_size: images per forward pass.
        cache: keep image-file embeddings on disk (only for models with known weights).
        cache_dir: the root of the cache (default: the download cache); embeddings go under
            ``embeddings/``.
        workers: threads that decode image files.
    """

    def __init__(self, clip, *, batch_size: int = 64, cache: bool = True,
                 cache_dir: str | Path | None = None, workers: int = 2):
        import open_clip

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.clip, self.batch_size, self.workers = clip, batch_size, max(1, workers)
        pp = open_clip.get_model_preprocess_cfg(clip.model)
        self.transform = open_clip.image_transform(
            clip.input_size, is_train=False, mean=clip.mean, std=clip.std,
            resize_mode=pp.get("resize_mode"), interpolation=pp.get("interpolation"))
        self._cache_dir, self._cache = cache_dir, None
        self.use_cache = cache and clip.source is not None

    @property
    def name(self) -> str:
        """The model's name, as results record who scored them."""
        return self.clip.name

    @property
    def cache(self) -> "EmbeddingCache | None":
        """The on-disk cache of image-file embeddings, opened on first use; None if off."""
        if self._cache is None and self.use_cache:
            self._cache = EmbeddingCache.for_model(self.clip.source, self.clip.name, self._cache_dir)
        return self._cache

    @classmethod
    def load(cls, config=None, *, preset: str | None = None, device: str = "auto",
             download: bool = True, overrides: Sequence[str] = (), cache: bool = True,
             cache_dir: str | Path | None = None, batch_size: int = 64, **models: Any) -> "Scorer":
        """Load only the CLIP that a generation config names (``preset="imagenet"`` by default),
        or its ensemble (``models.ensemble``; then an :class:`vqclip.ensemble.EnsembleScorer`).

        Args:
            models: ``clip``, ``clip_pretrained``, ``clip_config``, ``clip_ensemble`` and
                ``clip_weight`` over the preset's.
        """
        from .config import load_config
        from .device import resolve_device
        from .ensemble import EnsembleScorer, guide_weights, member_name
        from .models.clip import load_clip
        from .pretrained import CLIP_MODELS, require

        if batch_size < 1:  # before a model is loaded, or downloaded
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        known = ("clip", "clip_pretrained", "clip_config", "clip_ensemble", "clip_weight")
        unknown = sorted(set(models) - set(known))
        if unknown:
            raise ValueError(f"unknown setting {unknown[0]!r} for a Scorer; known: "
                             f"{', '.join(known)}")
        m = load_config(config, preset=preset, overrides=overrides, **models).models
        specs = [(m.clip, m.clip_pretrained, m.clip_config),
                 *((e.arch, e.pretrained, e.config) for e in m.ensemble)]
        names = [member_name(arch, tag) for arch, tag, _ in specs]
        require([name for name in names if name in CLIP_MODELS], allow_download=download)
        scorers = [cls(load_clip(arch, tag, device=resolve_device(device), download=download,
                                 config=json), cache=cache, cache_dir=cache_dir,
                       batch_size=batch_size) for arch, tag, json in specs]
        return scorers[0] if len(scorers) == 1 else EnsembleScorer(scorers, guide_weights(m))

    # ---------------------------------------------------------------------------------- encoders

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """``(T, D)`` unit text embeddings."""
        return F.normalize(self.clip.encode_text(list(texts)), dim=-1)

    def encode_images(self, images: Iterable[ImageLike] | torch.Tensor, progress: bool = False
                      ) -> tuple[torch.Tensor, list[int]]:
        """Embed images: paths, PIL images, or float tensors ``(3, H, W)``/``(N, 3, H, W)`` in [0, 1].

        Files that cannot be read are skipped with a warning. Files go through the cache: one
        unchanged since it was last seen, or with content seen before, is not encoded again.

        Returns:
            ``(M, D)`` unit embeddings on the CPU, and the input index of each of the M rows.
        """
        items = _as_items(images)
        paths = {i: Path(x) for i, x in enumerate(items) if isinstance(x, (str, Path))}
        cache = self.cache if paths else None
        order = list(paths)  # unchanged files seen before:
        embeds = {order[j]: e for j, e in cache.lookup(list(paths.values())).items()} if cache else {}
        todo = [i for i in range(len(items)) if i not in embeds]
        with tqdm(total=len(todo), disable=not progress or not todo, desc="encode", unit="img",
                  leave=False) as bar, ThreadPoolExecutor(self.workers) as pool:
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start:start + self.batch_size]
                prepared = dict(zip(chunk, pool.map(self._prepare, [items[i] for i in chunk]),
                                    strict=True))
                ready = {i: p for i, p in prepared.items() if p is not None}  # i -> (pixels, key, stat)
                known = cache.get({key for _, key, _ in ready.values()}) if cache else {}
                new = [i for i, (_, key, _) in ready.items() if key not in known]
                if new:
                    out = self._encode([ready[i][0] for i in new])
                    known.update({ready[i][1]: e for i, e in zip(new, out, strict=True)})
                    embeds.update(zip(new, out, strict=True))
                embeds.update({i: known[key] for i, (_, key, _) in ready.items() if i not in embeds})
                if cache:  # batch by batch: an interrupted run keeps what it encoded
                    cache.put({ready[i][1]: embeds[i] for i in new if i in paths},
                              [(paths[i], st, key) for i, (_, key, st) in ready.items() if i in paths])
                bar.update(len(chunk))
        kept = sorted(embeds)
        dim = self.clip.model.visual.output_dim
        return (torch.stack([embeds[i] for i in kept]) if kept else torch.empty(0, dim)), kept

    def embed_files(self, paths: Sequence[str | Path]) -> tuple[torch.Tensor, list[tuple[int, str, str]]]:
        """Embed image files without the cache (what an indexing worker does; see
        :mod:`vqclip.index`): ``(M, D)`` unit embeddings of the M readable files, and for each
        its position in ``paths``, its content's sha256 and its stat key (the cache's)."""
        with ThreadPoolExecutor(self.workers) as pool:
            prepared = [(i, p) for i, p in enumerate(pool.map(self._prepare, paths)) if p is not None]
        vectors = [self._encode([p[0] for _, p in prepared[start:start + self.batch_size]])
                   for start in range(0, len(prepared), self.batch_size)]
        dim = self.clip.model.visual.output_dim
        return (torch.cat(vectors) if vectors else torch.empty(0, dim),
                [(i, key, stat_key(st)) for i, (_, key, st) in prepared])

    @torch.no_grad()
    def _encode(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack(pixels).to(self.clip.device)
        return F.normalize(self.clip.model.encode_image(x).float(), dim=-1).cpu()

    def _prepare(self, item: ImageLike):
        """One image as CLIP's input ``(3, S, S)``, normalized, with its file's content hash and
        stat (None for images in memory); None, and a warning, if it cannot be read.

        A file is read once: the hash and the pixels come from the same bytes, so the cache
        never files one content's embedding under another's hash.
        """
        if isinstance(item, torch.Tensor):
            return self.transform(to_pil(item)), None, None
        if isinstance(item, Image.Image):
            return self.transform(to_rgb(item)), None, None
        try:
            st = os.stat(item)  # before reading: a later change shows as a newer stat next time
            data = Path(item).read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                im.draft("RGB", (self.clip.input_size, self.clip.input_size))  # JPEG: decode smaller
                pixels = self.transform(to_rgb(ImageOps.exif_transpose(im)))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            log.warning("skipped %s: not a readable image (%s)", item, e)
            return None
        return pixels, hashlib.sha256(data).hexdigest(), st

    # ---------------------------------------------------------------------------------- scoring

    @torch.no_grad()
    def prompt_embedding(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit embeddings ``(P, D)`` of a weighted prompt's parts, and weights ``(P,)`` that sum
        to 1 in absolute value."""
        parts = check_prompt(prompt)
        weights = torch.tensor([p.weight for p in parts])
        return self.encode_texts([p.value for p in parts]).cpu(), weights / weights.abs().sum()

    def score(self, images: Iterable[ImageLike] | torch.Tensor, prompt: str,
              progress: bool = False) -> tuple[torch.Tensor, list[int]]:
        """Each readable image's score against a prompt (weighted syntax allowed), in input order:
        ``(M,)``, and the input index of each."""
        texts, weights = self.prompt_embedding(prompt)
        embeds, kept = self.encode_images(images, progress)
        return (embeds @ texts.T) @ weights, kept

    @torch.no_grad()
    def label_embeddings(self, labels: Sequence[str], templates: Sequence[str] | None = None
                         ) -> torch.Tensor:
        """``(L, D)`` unit embeddings, each the normalized mean over the templates (``"{}"``)."""
        labels, templates = check_labels(labels), check_templates(templates)
        texts = [t.replace("{}", label) for label in labels for t in templates]
        embeds = self.encode_texts(texts).view(len(labels), len(templates), -1).mean(1)
        return F.normalize(embeds, dim=-1).cpu()

    def probabilities(self, image_embeds: torch.Tensor, label_embeds: torch.Tensor) -> torch.Tensor:
        """CLIP's softmax over labels: ``(M, D), (L, D) -> (M, L)``."""
        scale = self.clip.model.logit_scale.detach().exp().clamp(max=100).cpu().float()
        return (scale * image_embeds @ label_embeds.T).softmax(-1)

    def classify(self, images: Iterable[ImageLike] | torch.Tensor, labels: Sequence[str],
                 templates: Sequence[str] | None = None, progress: bool = False
                 ) -> list[Classification]:
        """Zero-shot classification: each image's probabilities over ``labels``.

        Args:
            templates: prompt templates with ``{}`` for the label, e.g. ``["a photo of a {}."]``;
                their embeddings are averaged per label. Default: the label itself.
        """
        labels = check_labels(labels)
        label_embeds = self.label_embeddings(labels, templates)
        items = _as_items(images)
        embeds, kept = self.encode_images(items, progress)
        probs = self.probabilities(embeds, label_embeds)
        return [Classification(i, labels[int(p.argmax())], dict(zip(labels, p.tolist(), strict=True)),
                               _path(items[i])) for i, p in zip(kept, probs, strict=True)]


# ------------------------------------------------------------------------------------ helpers


def _as_items(images: Iterable[ImageLike] | torch.Tensor) -> list[ImageLike]:
    if isinstance(images, torch.Tensor):
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"image tensors must be float (3, H, W) or (N, 3, H, W) in [0, 1], got "
                             f"{images.dtype} {tuple(images.shape)}")
        return list(images)
    if isinstance(images, (str, Path, Image.Image)):
        return [images]
    items = list(images)
    if not items:
        raise ValueError("no images given")
    return items


def _path(item: ImageLike) -> str | None:
    return str(item) if isinstance(item, (str, Path)) else None


def check_prompt(prompt: str):
    """The parts of a weighted prompt to score against; ValueError if there are none."""
    parts = parse_text_prompts(prompt)
    if not parts:
        raise ValueError("empty prompt: give text to score against")
    return parts


def check_labels(labels: Sequence[str]) -> list[str]:
    if isinstance(labels, str):
        raise ValueError("labels must be a list of strings, not one string")
    labels = [str(label).strip() for label in labels]
    if len(labels) < 2 or not all(labels):
        raise ValueError(f"give at least two non-empty labels, got {labels}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels repeat: {labels}")
    return labels


def check_templates(templates: Sequence[str] | None) -> list[str]:
    if templates is None:
        return ["{}"]
    if isinstance(templates, str):
        templates = [templates]
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(f"each template needs {{}} where the label goes, got {bad or templates!r}")
    return list(templates)
