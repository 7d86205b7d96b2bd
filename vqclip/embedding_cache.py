"""The on-disk cache of image embeddings that :class:`vqclip.scoring.Scorer` keeps per model.

One SQLite file per model's weights, under ``<cache>/embeddings/``: embeddings keyed by the sha256
of each file's bytes, and each file's hash keyed by its path and stat, so that an unchanged file is
neither read nor encoded again and a moved or copied one keeps its embedding.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sqlite3
from pathlib import Path
from typing import Sequence

import torch

from .pretrained import get_cache_dir

__all__ = ["EmbeddingCache", "stat_key"]

log = logging.getLogger(__name__)


class EmbeddingCache:
    """Image embeddings of one model on disk (SQLite), keyed by the sha256 of each file's bytes.

    Each file's hash is recorded with its size, modification and change times and inode, so an
    unchanged file is neither read nor encoded again; a changed one is read, and encoded if its
    content is new. A moved or copied file keeps its embedding. The cache is an aid, never an
    obstacle: if it cannot be opened or written (locked, read-only, disk full), vqclip warns
    once and goes on without it; a damaged file is replaced.
    """

    def __init__(self, path: str | Path):
        self.path, self._db = Path(path), None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = self._open()
        except sqlite3.DatabaseError as e:
            if "not a database" not in str(e) and "malformed" not in str(e):
                self._fail(e)
                return
            log.warning("embedding cache %s is damaged (%s); starting a new one", self.path, e)
            try:
                self.path.unlink(missing_ok=True)
                self._db = self._open()
            except (sqlite3.Error, OSError) as again:
                self._fail(again)
        except OSError as e:
            self._fail(e)

    SCHEMA = 1  # PRAGMA user_version; a file of another version is rebuilt

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
        with db:
            if db.execute("PRAGMA user_version").fetchone()[0] != self.SCHEMA:
                db.execute("DROP TABLE IF EXISTS files")
                db.execute("DROP TABLE IF EXISTS embeds")
                db.execute(f"PRAGMA user_version = {self.SCHEMA}")
            db.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, stat TEXT, "
                       "sha256 TEXT)")
            db.execute("CREATE TABLE IF NOT EXISTS embeds (sha256 TEXT PRIMARY KEY, vector BLOB)")
            # the shards of a folder that vqclip index has finished (see vqclip.index)
            db.execute("CREATE TABLE IF NOT EXISTS shards (id TEXT PRIMARY KEY)")
        return db

    def _fail(self, error: Exception) -> None:
        log.warning("embedding cache %s is off for this run: %s", self.path, error)
        if self._db is not None:
            self._db.close()
        self._db = None

    def _guard(self, fn, default=None):
        """``fn()``, or ``default`` once the cache is off; a failure turns it off."""
        if self._db is None:
            return default
        try:
            return fn()
        except (sqlite3.Error, OSError) as e:
            self._fail(e)
            return default

    @classmethod
    def for_model(cls, source: str, name: str, cache_dir: str | Path | None = None
                  ) -> "EmbeddingCache":
        """The cache file of the model whose weights ``source`` describes."""
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", name)[:60]
        digest = hashlib.sha256(source.encode()).hexdigest()[:12]
        return cls(get_cache_dir(cache_dir) / "embeddings" / f"{slug}-{digest}.sqlite")

    def lookup(self, paths: Sequence[str | Path]) -> dict[int, torch.Tensor]:
        """The stored embeddings of the files among ``paths`` that are unchanged since they were
        recorded, by position in ``paths``. One query per 500 files, so a warm search of a large
        folder costs a stat and a row per file."""
        if self._db is None:
            return {}
        wanted: dict[str, list[tuple[int, str]]] = {}  # absolute path -> (position, stat key)
        for i, path in enumerate(paths):
            try:
                wanted.setdefault(str(Path(path).absolute()), []).append(
                    (i, stat_key(os.stat(path))))
            except OSError:
                continue  # the reader skips it with a warning
        names, found = list(wanted), {}
        for start in range(0, len(names), 500):  # SQLite limits the number of parameters
            chunk = names[start:start + 500]
            rows = self._guard(lambda c=chunk: self._db.execute(
                "SELECT f.path, f.stat, e.vector FROM files f JOIN embeds e ON f.sha256 = e.sha256 "
                f"WHERE f.path IN ({','.join('?' * len(c))})", c).fetchall(), [])
            for path, stat, vector in rows:
                for i, now in wanted[path]:
                    if now == stat:
                        found[i] = torch.frombuffer(bytearray(vector), dtype=torch.float32)
        return found

    def get(self, keys: set[str]) -> dict[str, torch.Tensor]:
        """The stored embeddings among ``keys`` (content hashes)."""
        keys, out = sorted(k for k in keys if k), {}
        for start in range(0, len(keys), 500):  # SQLite limits the number of parameters
            chunk = keys[start:start + 500]
            rows = self._guard(lambda c=chunk: self._db.execute(
                f"SELECT sha256, vector FROM embeds WHERE sha256 IN ({','.join('?' * len(c))})",
                c).fetchall(), [])
            out.update({k: torch.frombuffer(bytearray(v), dtype=torch.float32) for k, v in rows})
        return out

    def finished(self, shards: Sequence[str]) -> set[str]:
        """The shards among these that are recorded as indexed."""
        found = set()
        for start in range(0, len(shards), 500):
            chunk = list(shards[start:start + 500])
            found.update(row[0] for row in self._guard(lambda c=chunk: self._db.execute(
                f"SELECT id FROM shards WHERE id IN ({','.join('?' * len(c))})", c).fetchall(), []))
        return found

    def put(self, embeds: dict[str, torch.Tensor],
            files: list[tuple[Path, os.stat_result | str, str]] = (),
            shards: Sequence[str] = ()) -> None:
        """Store embeddings by content hash, and which content each file had when it was read
        (its stat, or the :func:`stat_key` of it); and, in the same transaction, which shards
        are finished."""
        def write():
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO embeds VALUES (?, ?)", [
                    (k, v.float().contiguous().numpy().tobytes()) for k, v in embeds.items() if k])
                self._db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?)", [
                    (str(Path(p).absolute()), st if isinstance(st, str) else stat_key(st), k)
                    for p, st, k in files if k])
                self._db.executemany("INSERT OR IGNORE INTO shards VALUES (?)", [(i,) for i in shards])
        self._guard(write)


def stat_key(st: os.stat_result) -> str:
    """What identifies a file's version: its size, modification and change times, and inode."""
    # size, modification and change time, inode: an edit that keeps the size and resets the
    # modification time (cp -p, exiftool -P) still changes the change time
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"
