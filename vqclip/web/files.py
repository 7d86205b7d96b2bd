"""The files the web app may show: what lies inside its folders, and the runs in the output folder
with the settings their PNGs carry.

Every path the app hands to the page goes through :func:`inside` first: a path that leaves the
folder by ``..``, by being absolute elsewhere or by a symlink is refused, whatever the web
framework would allow.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ..images import iter_image_files, read_png_text

__all__ = ["RunEntry", "form_settings", "inside", "list_runs", "read_record"]

_FRAME = re.compile(r"^frame-(\d+)\.png$")
_CANDIDATE = re.compile(r"^(.*)-\d+$")
VIDEO_SUFFIXES = (".mp4", ".gif", ".webm")


def inside(path: str | Path, *roots: str | Path) -> Path | None:
    """``path`` resolved (symlinks followed), if it is a file within one of ``roots``; else None."""
    try:
        real = Path(path).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        return None
    for root in roots:
        if real.is_file() and real.is_relative_to(Path(root).resolve()):
            return real
    return None


def read_record(png: str | Path) -> dict[str, Any] | None:
    """A vqclip PNG's record (its text chunks, ``config`` parsed), or None for another image."""
    try:
        text = read_png_text(png)
    except (OSError, ValueError, SyntaxError):
        return None
    if "config" not in text:
        return None
    record: dict[str, Any] = dict(text)
    try:
        record["config"] = OmegaConf.to_container(OmegaConf.create(text["config"]))
    except Exception:  # noqa: BLE001 - any unreadable record: not one of ours
        return None
    if not isinstance(record["config"], dict):
        return None
    return record


@dataclass
class RunEntry:
    """One run in the output folder: its image (an animation's: the last frame), its record and
    its video, if it has one."""

    image: Path
    record: dict[str, Any]
    video: Path | None
    mtime: float

    @property
    def kind(self) -> str:
        return "animation" if "frame" in self.record else "generation"

    @property
    def caption(self) -> str:
        seed = self.record.get("seed", "?")
        return f"{self.record.get('prompt', '')} · seed {seed}"


def list_runs(root: str | Path, limit: int = 60) -> list[RunEntry]:
    """The runs under ``root``, newest first: each generation's PNGs, and each animation once (its
    last frame), read from their PNG records; files outside ``root`` (symlinks) are left out."""
    root = Path(root)
    if not root.is_dir():
        return []
    last_frames: dict[Path, Path] = {}
    pngs = []
    for path in iter_image_files(root):
        if path.suffix.lower() != ".png" or inside(path, root) is None:
            continue
        if _FRAME.match(path.name):
            last_frames[path.parent] = path  # sorted: the last one wins
        else:
            pngs.append(path)
    pngs += last_frames.values()
    pngs.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    entries = []
    for png in pngs:
        record = read_record(png)
        if record is not None:
            entries.append(RunEntry(png, record, _video_of(png, root), png.stat().st_mtime))
        if len(entries) == limit:
            break
    return entries


def _video_of(png: Path, root: Path) -> Path | None:
    """A generation's video beside it (``out.mp4`` for ``out.png`` or ``out-2.png``), or an
    animation's in its folder."""
    stem = png.stem
    if _FRAME.match(png.name):
        names = ["animation"]
    else:
        m = _CANDIDATE.match(stem)
        names = [stem, *([m[1]] if m else [])]
    for name in names:
        for suffix in VIDEO_SUFFIXES:
            found = inside(png.with_name(name + suffix), root)
            if found:
                return found
    return None


def form_settings(record: dict[str, Any]) -> dict[str, Any]:
    """The form's fields from a run's record: what to type again to make it again."""
    c = record.get("config", {})
    out = {"prompt": c.get("prompts", {}).get("text", record.get("prompt", "")),
           "seed": int(record.get("seed", c.get("seed") or 0)),
           "steps": c.get("optim", {}).get("steps"), "cutn": c.get("cutouts", {}).get("cutn"),
           "candidates": c.get("candidates", 1)}
    size = c.get("size") or [None, None]
    out["width"], out["height"] = size[0], size[-1]
    if "frame" in record:  # an animation: its settings, and the seed of the whole animation
        out.update({k: v for k, v in c.get("animation", {}).items()
                    if k in ("frames", "first_steps", "steps_per_frame", "zoom", "angle",
                             "translate_x", "translate_y", "fps")})
        out["seed"] = int(c.get("seed") or 0)
    return out
