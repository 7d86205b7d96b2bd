"""``vqclip index``: embed a folder of images into the cache that ``vqclip search`` reads, here or
on Ray (:mod:`vqclip.index_ray`).

The unit of work is a shard: ``shard_size`` consecutive files of the folder's sorted listing. A
shard's id is a hash of its files' paths and stat keys, and is recorded in each model's cache
(:class:`vqclip.embedding_cache.EmbeddingCache`) once its embeddings are stored. An index that
was interrupted, or is run again after files were added, changed or removed, works only on the
shards whose id is not recorded, and in them embeds only the files that the cache does not
know: an unchanged file is never read twice, whichever shard it falls in now.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .embedding_cache import stat_key
from .images import image_files
from .scoring import BaseScorer, Scorer

__all__ = ["IndexReport", "Shard", "index_folder", "members", "plan_shards"]


@dataclass
class IndexReport:
    """What an index run found and did. ``embedded`` counts files, not files times models."""

    files: int = 0
    shards: int = 0
    finished_before: int = 0  # shards already indexed when the run began
    embedded: int = 0
    unreadable: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class Shard:
    """``paths``: the shard's files; ``todo``: those some model's cache lacks."""

    id: str
    paths: list[Path]
    todo: list[Path]


def members(scorer: BaseScorer) -> list[Scorer]:
    """The single-model scorers behind ``scorer`` (an ensemble's members, or itself)."""
    return list(getattr(scorer, "scorers", [scorer]))


def plan_shards(files: list[Path], size: int) -> list[tuple[str, list[Path]]]:
    """``files`` (sorted) cut into shards of ``size``, each with its id."""
    if size < 1:
        raise ValueError(f"shard size must be >= 1, got {size}")
    out = []
    for start in range(0, len(files), size):
        paths = files[start:start + size]
        digest = hashlib.sha256()
        for path in paths:
            try:
                st = stat_key(os.stat(path))
            except OSError:
                st = "-"
            digest.update(f"{Path(path).absolute()}\t{st}\n".encode())
        out.append((digest.hexdigest()[:24], paths))
    return out


def index_folder(scorer: BaseScorer, folder: str | Path, *, shard_size: int = 1000,
                 ray: str | None = None, workers: int | None = None,
                 load: dict[str, Any] | None = None, progress: bool = False) -> IndexReport:
    """Embed every image under ``folder`` (see :func:`vqclip.images.image_files`) into the
    caches of ``scorer``'s models, shard by shard, skipping the shards already indexed.

    Args:
        ray: None to embed here; ``"local"``, ``"auto"`` or an address for Ray Data actors.
        workers: Ray actors (default: one per GPU of the cluster, else one).
        load: on Ray, the :meth:`Scorer.load` arguments each actor loads its models with.

    Raises:
        ValueError: a model without a cache (weights of unknown source, or the cache off).
    """
    start = time.perf_counter()
    scorers = members(scorer)
    if not all(s.cache for s in scorers):
        raise ValueError("nothing to index into: the embedding cache is off (--no-cache), or a "
                         "model's weights have no known source")
    files = image_files(folder)
    planned = plan_shards(files, shard_size)
    done = set.intersection(*(s.cache.finished([i for i, _ in planned]) for s in scorers))
    todo = [_shard(scorers, i, paths) for i, paths in planned if i not in done]
    report = IndexReport(files=len(files), shards=len(planned), finished_before=len(done))
    if ray is None:
        _index_here(scorers, todo, report, progress)
    else:
        from .index_ray import index_on_ray

        index_on_ray(scorers, todo, report, address=ray, workers=workers, load=load or {},
                     progress=progress)
    report.seconds = time.perf_counter() - start
    return report


def _shard(scorers: list[Scorer], id: str, paths: list[Path]) -> Shard:
    known = [s.cache.lookup(paths) for s in scorers]
    return Shard(id, paths, [p for j, p in enumerate(paths) if not all(j in k for k in known)])


def _index_here(scorers: list[Scorer], todo: list[Shard], report: IndexReport,
                progress: bool) -> None:
    total = sum(len(s.todo) for s in todo)
    with tqdm(total=total, desc="index", unit="img", disable=not progress or not total) as bar:
        for shard in todo:
            kept = set(range(len(shard.todo)))
            for s in scorers:  # through the cache: each model stores what it encodes
                kept &= set(s.encode_images(shard.todo)[1]) if shard.todo else set()
                s.cache.put({}, (), [shard.id])
            report.embedded += len(kept)
            report.unreadable += len(shard.todo) - len(kept)
            bar.update(len(shard.todo))
