"""``vqclip index --ray``: a folder's shards embedded by Ray Data actors (the ``ray`` extra).

Each shard still to do is one row of a Ray dataset; ``map_batches`` runs it on an actor pool
whose actors load the models once (:meth:`vqclip.scoring.Scorer.load` with the command's
arguments) and embed the shard's files without a cache. The rows stream back to this process,
the only one that writes the caches: a shard's embeddings and its id are stored in one
transaction once all its rows are in, so an index killed halfway resumes at the shards it had
not stored. Ray Data restarts an actor that dies and runs its shard again.

The actors read the files by path: on a cluster of several machines, the folder must be on a
file system they share, at the same path.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .batch_ray import actor_options, connect
from .index import IndexReport, Shard
from .scoring import Scorer

__all__ = ["index_on_ray"]

log = logging.getLogger("vqclip")


class _Embedder:
    """One actor: the models, loaded once; a batch of shards in, one row per file and model out
    (``sha`` empty for a file that could not be read)."""

    def __init__(self, load: dict[str, Any], threads: int | None):
        import torch

        from .index import members

        if threads:
            torch.set_num_threads(threads)
        self.scorers = members(Scorer.load(**load, cache=False))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: dict[str, list] = {k: [] for k in ("shard", "rows", "member", "path", "stat", "sha",
                                                 "vector")}
        for shard, paths in zip(batch["shard"], batch["paths"], strict=True):
            paths = [str(p) for p in paths]
            for m, scorer in enumerate(self.scorers):
                vectors, files = scorer.embed_files(paths)
                read = {i: (sha, st, v) for (i, sha, st), v in zip(files, vectors, strict=True)}
                for i, path in enumerate(paths):
                    sha, st, v = read.get(i, ("", "", None))
                    rows["vector"].append(b"" if v is None else v.numpy().tobytes())
                    rows["shard"].append(shard)
                    rows["rows"].append(len(paths) * len(self.scorers))
                    rows["member"].append(m)
                    rows["path"].append(path)
                    rows["stat"].append(st)
                    rows["sha"].append(sha)
        return {k: np.array(v, dtype=object if k == "vector" else None) for k, v in rows.items()}


def index_on_ray(scorers: list[Scorer], todo: list[Shard], report: IndexReport, *, address: str,
                 workers: int | None, load: dict[str, Any], progress: bool) -> None:
    """Embed the ``todo`` shards on Ray Data actors into the caches of ``scorers``, which the
    actors load as ``Scorer.load(**load)`` does."""
    import torch

    for shard in (s for s in todo if not s.todo):  # nothing to read: mark them done
        for s in scorers:
            s.cache.put({}, (), [shard.id])
    todo = [s for s in todo if s.todo]
    if not todo:
        return
    ray = connect(address)
    try:
        n, options, threads = actor_options(ray, workers)
        ray.data.DataContext.get_current().enable_progress_bars = False
        ds = ray.data.from_items([{"shard": s.id, "paths": [str(p) for p in s.todo]} for s in todo])
        ds = ds.map_batches(_Embedder, batch_size=1, compute=ray.data.ActorPoolStrategy(
            size=min(n, len(todo))), fn_constructor_kwargs=dict(load=load, threads=threads),
            **options)
        pending: dict[str, list[tuple]] = {}
        with tqdm(total=sum(len(s.todo) for s in todo), desc="index", unit="img",
                  disable=not progress) as bar:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for row in zip(*(batch[k] for k in ("shard", "rows", "member", "path", "stat",
                                                    "sha", "vector")), strict=True):
                    got = pending.setdefault(row[0], [])
                    got.append(row[2:])
                    if len(got) == row[1]:
                        _store(scorers, row[0], pending.pop(row[0]), report, torch)
                        bar.update(row[1] // len(scorers))
    finally:
        ray.shutdown()


def _store(scorers: list[Scorer], shard: str, rows: list[tuple], report: IndexReport,
           torch) -> None:
    """A finished shard's rows into each model's cache, with the shard's id."""
    for m, s in enumerate(scorers):
        mine = [r for r in rows if r[0] == m and r[3]]
        s.cache.put({sha: torch.frombuffer(bytearray(v), dtype=torch.float32)
                     for _, _, _, sha, v in mine},
                    [(path, st, sha) for _, path, st, sha, _ in mine], [shard])
    files = {r[1] for r in rows}
    readable = set.intersection(*({r[1] for r in rows if r[0] == m and r[3]}
                                  for m in range(len(scorers))))
    for path in sorted(files - readable):  # the actors' own warnings stay in their logs
        log.warning("skipped %s: not a readable image", path)
    report.embedded += len(readable)
    report.unreadable += len(files) - len(readable)
