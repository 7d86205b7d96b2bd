"""What the web app's buttons do, on the library's own objects: generations and animations run by
:class:`vqclip.Generator` (one at a time per device), search and classification by its ranking
Scorer and that Scorer's cache. Each method takes the form's values and returns or yields what the
page shows; the framework's types stay in :mod:`vqclip.web.layout`.
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ..config import load_config
from ..ensemble import loaded_models
from ..generator import GenerationError, GenerationInterrupted, Generator
from ..animation import AnimationInterrupted
from ..images import load_image
from ..outputs import candidate_paths, claim_run_folder, video_frame
from ..resume import find_state, length_done, read_state
from .files import inside, list_runs
from .runs import Run

__all__ = ["Jobs", "UserError"]

log = logging.getLogger(__name__)


def _candidate_losses(info: dict[str, Any]) -> list[tuple[int, float]]:
    return list(enumerate(info["loss"].tolist()))


class UserError(ValueError):
    """A bad value in the form: shown on the page as one line."""


class Jobs:
    """The loaded models and the folders of one server.

    Args:
        gen: the generator loaded at start-up (its preset is the form's default).
        outputs: where runs are written, and what the gallery lists.
        search: more folders the Search tab may read (the outputs folder always).
    """

    def __init__(self, gen: Generator, outputs: str | Path, search: list[str | Path] = ()):
        self.gen = gen
        self.outputs = Path(outputs).resolve()
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.search_roots = [self.outputs, *(Path(s).resolve() for s in search)]
        self.preset = gen.config.get("preset")  # None: models given another way
        self._generators = {str(loaded_models(gen.config.models)): gen}
        self._runs: dict[str, Run] = {}  # the run of each browser session
        self._last: dict[tuple[str, str], tuple[Path, str | None]] = {}  # what Go on continues
        self._lock = threading.Lock()

    # -- generation ---------------------------------------------------------------------------

    def generator(self, preset: str | None) -> tuple[Generator, DictConfig]:
        """The generator for ``preset``'s models (the start-up one, or loaded once on first use)
        and the preset's settings."""
        if not preset or preset == self.preset:
            return self.gen, self.gen.config
        cfg = load_config(preset=preset, device=self.gen.config.device)
        key = str(loaded_models(cfg.models))
        with self._lock:
            if key not in self._generators:
                try:
                    self._generators[key] = Generator.load(cfg, download=False)
                except (ValueError, OSError) as e:  # not in the cache: this server is offline
                    raise UserError(f"cannot load the models of preset {preset!r}: {e}") from None
            return self._generators[key], cfg

    def settings(self, form: dict[str, Any], kind: str) -> tuple[Generator, dict[str, Any]]:
        """The generator and the library's keyword arguments for a form (``config``: the preset's
        settings); checked first, so that a bad value is one line on the page before any folder
        is made."""
        gen, base = self.generator(form.pop("preset", None))
        kwargs = {k: v for k, v in form.items() if v not in (None, "", [])}
        if kwargs.get("seed") is not None and int(kwargs["seed"]) < 0:
            del kwargs["seed"]  # -1: a random seed, recorded with the run
        for key in ("seed", "steps", "cutn", "candidates", "frames", "first_steps", "steps_per_frame",
                    "fps"):
            if key in kwargs:
                kwargs[key] = int(kwargs[key])
        width, height = kwargs.pop("width", None), kwargs.pop("height", None)
        if width and height:
            kwargs["size"] = [int(width), int(height)]
        if not str(kwargs.get("prompt", "")).strip() and not kwargs.get("image_prompts"):
            raise UserError("type a prompt (or give an image prompt)")
        try:
            check = {k: v for k, v in kwargs.items() if k not in ("init_image", "image_prompts")}
            gen.settings(config=base, **(dict(check, candidates=1) if kind == "animation" else check))
        except (ValueError, FileNotFoundError) as e:
            raise UserError(str(e)) from None
        return gen, dict(kwargs, config=base)

    def start(self, session: str, kind: str, form: dict[str, Any]) -> tuple[Run, Path]:
        """Start a generation or an animation in a new run folder; the session's Stop ends it."""
        preset = form.get("preset")
        gen, kwargs = self.settings(form, kind)
        folder = claim_run_folder(str(kwargs.get("prompt") or "image").split("^")[0], self.outputs)
        kwargs = self._keep_uploads(kwargs, folder)
        if kind == "animation":
            kwargs["output"] = str(folder)
            run = Run(lambda callback: gen.animate(callback=callback, **kwargs),
                      total=int(kwargs.get("frames") or kwargs["config"].animation.frames))
        else:
            kwargs.update(output=str(folder / "final.png"), video=str(folder / "final.mp4"),
                          best_only=False)
            run = Run(lambda callback: gen.generate(callback=callback, **kwargs),
                      total=int(kwargs.get("steps") or kwargs["config"].optim.steps),
                      losses=_candidate_losses)
        self.remember(session, kind, folder / "final.png" if kind == "generation" else folder,
                      preset)
        return self._begin(session, run), folder

    def remember(self, session: str, kind: str, path: Path, preset: str | None) -> None:
        """The run that the session's Go on continues: its PNG (any candidate's) or, for an
        animation, its folder; the session's newest run, or one loaded from the gallery."""
        with self._lock:
            self._last[session, kind] = (Path(path), preset)

    def go_on(self, session: str, kind: str, total: int | None) -> tuple[Run, Path]:
        """Go on with the session's remembered run to ``total`` steps (frames, for an animation)
        in all, in its own folder, bit for bit as if it had not stopped (:mod:`vqclip.resume`)."""
        path, preset = self._last.get((session, kind), (None, None))
        if path is None:
            raise UserError(f"no {kind} to go on with: make one, or load one from the gallery")
        try:
            header, tensors = read_state(find_state(path, kind), kind, kind == "generation")
        except (FileNotFoundError, ValueError) as e:
            raise UserError(str(e)) from None
        done = length_done(header, kind)
        unit = "frames" if kind == "animation" else "steps"
        if total is None or int(total) <= done:
            raise UserError(f"the run has {done} {unit}; set {unit.capitalize()} above that to go on")
        gen, _ = self.generator(preset)
        if kind == "animation":
            run = Run(lambda callback: gen.animate(callback=callback, resume=path, frames=int(total)),
                      total=int(total), done=done)
        else:
            before = [(step, k, float(loss)) for step, row in enumerate(tensors["losses"])
                      for k, loss in enumerate(row)]  # the curve so far
            run = Run(lambda callback: gen.generate(callback=callback, resume=path, steps=int(total)),
                      total=int(total), done=done, losses=_candidate_losses, before=before)
        return self._begin(session, run), path if kind == "animation" else path.parent

    def _begin(self, session: str, run: Run) -> Run:
        with self._lock:
            old = self._runs.get(session)
            if old is not None and old.running:
                old.stop()
            self._runs[session] = run
        return run

    def stop(self, session: str) -> bool:
        """Stop the session's run after its current step; False if none is running."""
        run = self._runs.get(session)
        if run is None or not run.running:
            return False
        run.stop()
        return True

    def finish(self, session: str, run: Run, folder: Path) -> Any:
        """Wait for ``run`` to end; its result (a stopped run's: what it made), or UserError."""
        run.join()
        with self._lock:
            if self._runs.get(session) is run:
                del self._runs[session]
        e = run.error
        if isinstance(e, (GenerationInterrupted, AnimationInterrupted)):
            return e.result
        if e is not None:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
            if isinstance(e, (ValueError, OSError, GenerationError)):  # NaN loss, out of memory
                raise UserError(str(e)) from None
            raise e
        return run.outcome

    @staticmethod
    def _keep_uploads(kwargs: dict[str, Any], folder: Path) -> dict[str, Any]:
        """Uploaded images are copied into the run's folder (``inputs/``), where its record points:
        the upload area is emptied when the server stops."""
        if not kwargs.get("init_image") and not kwargs.get("image_prompts"):
            return kwargs
        inputs = folder / "inputs"
        inputs.mkdir()

        def keep(path: str, name: str) -> str:
            load_image(path)  # the CLI's reader: refuses what is no image, or a decompression bomb
            kept = inputs / f"{name}{Path(path).suffix.lower()}"
            shutil.copyfile(path, kept)
            return str(kept)

        kwargs = dict(kwargs)
        try:
            if kwargs.get("init_image"):
                kwargs["init_image"] = keep(kwargs["init_image"], "init")
            if kwargs.get("image_prompts"):
                kwargs["image_prompts"] = [keep(p, f"image-prompt-{i}")
                                           for i, p in enumerate(kwargs["image_prompts"])]
        except (ValueError, FileNotFoundError) as e:
            shutil.rmtree(folder)
            raise UserError(str(e)) from None
        return kwargs

    # -- what the page shows ------------------------------------------------------------------

    @staticmethod
    def live_image(run: Run):
        """The newest images of a run, side by side (``H x W x 3`` uint8), or None."""
        update = run.progress.update
        return None if update is None else video_frame(update["image"])

    @staticmethod
    def status(run: Run, unit: str = "step") -> str:
        p = run.progress
        left = p.seconds_left
        text = f"{unit} {p.done}/{p.total}"
        if left is not None and p.done:
            text += f" · about {left:.0f} s left"
        return text + (" · stopping…" if run.stopping else "")

    @staticmethod
    def ranked(result) -> list[tuple[str, str, dict[str, Any]]]:
        """A generation's candidates best first: (image path, caption, record)."""
        paths = candidate_paths(result.config.output.path, len(result.images))
        rows = []
        for r, k in enumerate(result.order):
            score = f"score {result.scores[k]:.4f}" if result.scores is not None else "not ranked"
            rows.append((str(paths[k]), f"#{r + 1} · {score} · seed {result.seeds[k]}",
                         result.info(k)))
        return rows

    # -- gallery, search, classify ------------------------------------------------------------

    def runs(self, limit: int = 60):
        return list_runs(self.outputs, limit)

    def search(self, query: str, folder: str | None, top_k: int) -> list[tuple[str, float, str]]:
        """The images under ``folder`` (one of the search roots) best matching ``query``, best
        first: (path, score, path within the folder)."""
        if not query or not query.strip():
            raise UserError("type what to look for")
        root = Path(folder).resolve() if folder else self.outputs
        if root not in self.search_roots:
            raise UserError(f"{folder} is not one of this server's folders")
        try:
            matches = self.gen.ranker().search(root, query, top_k=int(top_k))
        except (ValueError, OSError) as e:
            raise UserError(str(e)) from None
        return [(str(path), m.score, str(Path(m.path).relative_to(root))) for m in matches
                if (path := inside(m.path, root)) is not None]

    def classify(self, image: str | None, labels: str) -> dict[str, float]:
        """An uploaded image's probabilities over comma-separated labels."""
        if not image:
            raise UserError("upload an image to classify")
        names = [s.strip() for s in (labels or "").split(",") if s.strip()]
        try:
            picture = load_image(image)
            result = self.gen.ranker().classify([picture], names)[0]
        except (ValueError, OSError) as e:
            raise UserError(str(e)) from None
        return {label: float(p) for label, p in result.probs.items()}
