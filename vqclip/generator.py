"""The VQGAN+CLIP loop: optimize VQGAN latents so that CLIP sees the prompts in the decoded image.

Each step, for a batch of K candidates at once:
    1. snap the latents z to their nearest codes, passing the gradient straight through;
    2. decode to an image, clamped to [0, 1] with gradients that point inward;
    3. cut ``cutn`` random crops per candidate, resize them to CLIP's input, augment them;
    4. embed them with CLIP (which normalizes with its mean/std);
    5. sum each prompt's weighted spherical distance (plus the optional init and TV terms);
    6. backpropagate into z, take an optimizer step, clamp z to the codebook's per-channel range;
    7. every ``denoise_every`` steps (if set), median-filter the image and encode it back into z.

Candidate k draws its initial codes and its cutouts from its own stream seeded ``seed + k``,
and its loss depends on nothing else, so it follows the run a single generation with that seed
would, up to floating-point rounding in the batched forward.

What a run returns and writes (:class:`GenerationResult`, the output files' names and the check
that they can be written) is in :mod:`vqclip.outputs`.

Example:
    >>> gen = Generator.load(preset="imagenet", device="auto")  # doctest: +SKIP
    >>> result = gen.generate("a lighthouse at dusk:1|blurry:-0.3", steps=100, seed=1)
    >>> result.images[0].save("lighthouse.png")
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
from typing import Any, Callable, Sequence

import torch
from kornia.filters import median_blur
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from .config import GenerateConfig, load_config, require_target
from .cutouts import MakeCutouts, SeedStreams
from .device import AUTOCAST_DTYPES, autocast, check_precision, resolve_precision
from .errors import GenerationError, GenerationInterrupted, check_finite, memory_errors
from .images import to_pil
from .losses import init_loss, prompt_loss, tv_loss
from .models.low_precision import LowPrecisionCopies
from .outputs import GenerationResult, check_outputs, state_path, video_frame
from .ensemble import Guide, guide_weights, loaded_models, member_name, models_text, ranker
from .prompts import build_targets, init_latents
from .resume import LoopState, load_resumed
from .video import VideoWriter, choose_fps, ctrl_c_held

__all__ = ["GenerationError", "GenerationInterrupted", "Generator", "check_precision", "generate",
           "resolve_precision"]

log = logging.getLogger(__name__)

Callback = Callable[[int, dict[str, Any]], None]
LOSS_EVERY = 10  # steps between reads of the loss (a wait for the device) and NaN checks


def make_optimizer(name: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """One of ``config.OPTIMIZERS`` over ``params``."""
    make = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "radam": torch.optim.RAdam,
            "rmsprop": torch.optim.RMSprop,
            "sgd": lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9)}
    return make[name](params, lr=lr)


class Generator:
    """A loaded VQGAN and CLIP, reusable for many generations.

    Args:
        vqgan, clip: loaded models, on the same device.
        config: the defaults for :meth:`generate` (its ``models`` section must name these models).
        rank_clip: another CLIP that ranks the results (``models.rank_clip``); default: the
            guiding CLIPs.
        ensemble: more CLIPs that guide with ``clip`` (``models.ensemble``, in its order).
    """

    def __init__(self, vqgan, clip, config: DictConfig | None = None, rank_clip=None,
                 ensemble: Sequence = ()):
        self.vqgan, self.clip, self.rank_clip = vqgan, clip, rank_clip
        self.clips = [clip, *ensemble]  # the guides' models
        self.config = config if config is not None else OmegaConf.structured(GenerateConfig)
        if len(self.config.models.ensemble) != len(ensemble):
            raise ValueError(f"the config names {len(self.config.models.ensemble)} ensemble "
                             f"members; {len(ensemble)} models were given")
        self.device = clip.device
        self._low_precision = LowPrecisionCopies()
        self._scorers: dict = {}

    @functools.cached_property
    def scorer(self):
        """A :class:`vqclip.scoring.Scorer` on this generator's own CLIP: no second load."""
        from .scoring import Scorer

        return Scorer(self.clip)

    def ranker(self, cfg: DictConfig | None = None):
        """The Scorer that ranks results: on ``rank_clip`` if given, else on the guiding CLIPs
        (:attr:`scorer`, or an ensemble's with the weights in ``cfg``; default this config's)."""
        return ranker(self, cfg or self.config)

    @classmethod
    def load(cls, config: DictConfig | dict | None = None, *, preset: str | None = None,
             download: bool = True, **kwargs: Any) -> "Generator":
        """Load the models a config names (``preset="imagenet"`` by default).

        Args:
            config, preset, **kwargs: as for :func:`vqclip.config.load_config`; they become the
                defaults of every :meth:`generate` call.
            download: fetch registry weights that are not in the cache yet.
        Raises:
            ValueError, FileNotFoundError, vqclip.pretrained.DownloadError: see messages.
        """
        from .device import resolve_device
        from .models.clip import load_clip
        from .models.vqgan import load_vqgan
        from .pretrained import require

        cfg = load_config(config, preset=preset, **kwargs)
        m = cfg.models
        device = resolve_device(cfg.device)
        require([m.vqgan, f"{m.clip}/{m.clip_pretrained}", *([m.rank_clip] if m.rank_clip else []),
                 *(member_name(e.arch, e.pretrained) for e in m.ensemble)], allow_download=download)
        vqgan = load_vqgan(m.vqgan, m.vqgan_config, device=device, download=download)
        clip = load_clip(m.clip, m.clip_pretrained, device=device, download=download,
                         config=m.clip_config)
        ensemble = [load_clip(e.arch, e.pretrained, device=device, download=download,
                              config=e.config) for e in m.ensemble]
        rank_clip = None
        if m.rank_clip:  # one of the guides, or another model
            guides = {member_name(e.arch, e.pretrained): c for e, c in zip(m.ensemble, ensemble)}
            rank_clip = {f"{m.clip}/{m.clip_pretrained}": clip, **guides}.get(m.rank_clip) or \
                load_clip(*m.rank_clip.split("/", 1), device=device, download=download)
        cfg.device = str(device)
        return cls(vqgan, clip, cfg, rank_clip, ensemble)

    def generate(self, prompt: str | None = None, *, config: DictConfig | dict | None = None,
                 callback: Callback | None = None, progress: bool = False,
                 overrides: list[str] = (), resume: str | os.PathLike | None = None,
                 **kwargs: Any) -> GenerationResult:
        """Run the loop.

        Args:
            prompt: the text prompt (``"a:1|b:-0.5"``); by default the config's.
            config: a full config; by default this generator's, with ``kwargs`` over it.
            callback: called as ``callback(step, {"image", "loss", "z"})`` before each update, with
                the decoded images ``(K, 3, H, W)``, the losses ``(K,)`` and the latents.
            progress: show a tqdm bar with the loss.
            overrides, **kwargs: ``"key=value"`` strings and flat settings (``prompt``, ``steps``,
                ``seed``, ``size``, ``cutn``, ...; see ``vqclip.config.FLAT_KEYS``).
            resume: a generation's PNG (or its ``.state.safetensors``) to go on from, bit for bit
                (:mod:`vqclip.resume`): its settings, which those given must match, except
                ``steps`` (the total to reach), the device and the outputs (by default the run's
                own files, replaced).
        Returns:
            A :class:`GenerationResult`. If ``output.path``/``output.video`` are set, they are written.
        Raises:
            ValueError, FileNotFoundError: bad settings or inputs. FileExistsError: an output exists
            (set ``overwrite``). GenerationError: NaN loss or out of memory.
            GenerationInterrupted: Ctrl-C; ``.result`` has what was made, saved as configured.
        """
        state = None
        if resume is None:
            cfg = self.settings(prompt, config, overrides, **kwargs)
        else:
            path, cfg, header, tensors = load_resumed(
                resume, "generation", lambda saved: self.settings(
                    prompt, config if config is not None else saved, overrides, **kwargs))
            state = LoopState.load(header, tensors, self.device)
        return memory_errors(cfg, lambda: self._run(cfg, callback, progress, state))

    def animate(self, prompt: str | None = None, **kwargs: Any):
        """Make an animation (:func:`vqclip.animation.animate`, which documents the arguments)."""
        from .animation import animate

        return animate(self, prompt, **kwargs)

    def settings(self, prompt: str | None = None, config: DictConfig | dict | None = None,
                 overrides: list[str] = (), **kwargs: Any) -> DictConfig:
        """A run's config: ``config`` (default: this generator's) with ``kwargs`` and
        ``overrides`` over it, checked against the models and the device held here."""
        if prompt is not None:
            kwargs["prompt"] = prompt
        device = kwargs.pop("device", None)
        if device is not None and device != "auto" and torch.device(device) != self.device:
            raise ValueError(f"this Generator runs on {self.device}; load another for {device}")
        cfg = load_config(config if config is not None else self.config, overrides=overrides,
                          **kwargs)
        if loaded_models(cfg.models) != loaded_models(self.config.models):
            raise ValueError(f"this Generator holds {models_text(self.config.models)}; load "
                             f"another for {models_text(cfg.models)}")
        cfg.device = str(self.device)
        return cfg

    def _run(self, cfg: DictConfig, callback: Callback | None, progress: bool,
             resume: tuple[LoopState, list] | None = None) -> GenerationResult:
        t0 = time.perf_counter()
        self._settle(cfg)
        K, steps = cfg.candidates, cfg.optim.steps
        seeds = [cfg.seed + k for k in range(K)]
        start = resume[0].step if resume else 0
        streams, guides, z = self._prepare(cfg, seeds, resume[0].z if resume else None)
        video = None
        if cfg.output.video:
            frames = len(range(start, steps, cfg.output.save_every)) + 1
            video = VideoWriter(cfg.output.video, fps=choose_fps(frames))
        t1 = time.perf_counter()
        with video or contextlib.nullcontext():
            final, losses, interrupted, end = self._loop(cfg, z, guides, streams, video, callback,
                                                         progress, resume)
        t2 = time.perf_counter()
        scores = None
        if cfg.prompts.text.strip() and not interrupted:  # image/noise prompts: no text to rank by
            try:
                rank_by = self.ranker(cfg)
                scores = rank_by.score(final, cfg.prompts.text)[0].tolist()  # tensors: none skipped
            except KeyboardInterrupt:  # the images are made: keep them, unranked
                interrupted = True
            except RuntimeError as e:  # out of memory in a large rank CLIP, say
                log.warning("the images are saved unranked: ranking failed (%s)", e)
        t3 = time.perf_counter()

        result = GenerationResult(
            images=[to_pil(im) for im in final], tensor=final.cpu(),
            losses=torch.stack(losses).cpu() if losses else torch.empty(0, K), seeds=seeds, config=cfg,
            timings={"setup": t1 - t0, "steps": t2 - t1, "per_step": (t2 - t1) / max(1, len(losses) - start),
                     "rank": t3 - t2, "total": t3 - t0}, steps_done=len(losses), interrupted=interrupted,
            scores=scores, ranked_by=rank_by.name if scores is not None else None)
        if video is not None and video.count:
            result.files.append(video.path)
        if cfg.output.path:
            result.save(cfg.output.path)
            if cfg.output.save_state:
                result.files.append(end.save(state_path(cfg.output.path), cfg, losses,
                                             self.vqgan.downsample_factor))
            else:  # none that belongs to another run may stay beside these images
                state_path(cfg.output.path).unlink(missing_ok=True)
        if interrupted:
            raise GenerationInterrupted(result)
        return result

    def _settle(self, cfg: DictConfig) -> None:
        """Check what only a run can check, fill in size and seed, refuse to overwrite outputs."""
        require_target(cfg)
        self._low_precision = LowPrecisionCopies()  # new for each run: never stale
        cfg.precision = resolve_precision(cfg.precision, self.device)  # what runs, recorded
        cfg.size = [self.vqgan.round_side(s) for s in cfg.size]
        if cfg.seed is None:
            cfg.seed = int.from_bytes(os.urandom(4), "little") >> 1
        check_outputs(cfg)  # before any work, not after

    def _loop(self, cfg, z, guides, streams, video, callback, progress, resume=None):
        """The optimization, from the start or from ``resume`` (a :class:`LoopState` and the
        losses so far); returns the final images, the losses, whether Ctrl-C ended it, and the
        state after its last whole step (a step that Ctrl-C cut short is undone).

        Nothing in a step waits for the device: the losses stay on it and are read (and checked
        for NaN) every ``LOSS_EVERY`` steps, which is also how often the progress bar shows them.
        """
        z_init = z.detach().clone()
        codebook = self.vqgan.codebook
        lo = codebook.min(0).values.view(1, -1, 1, 1)  # the codebook's per-channel range
        hi = codebook.max(0).values.view(1, -1, 1, 1)
        opt = make_optimizer(cfg.optim.name, [z], cfg.optim.lr)
        losses, state, interrupted = [], None, False
        if resume is not None:
            resume[0].restore(z, opt, streams)
            z_init, losses = resume[0].z_init, list(resume[1])
        checked = len(losses)
        with tqdm(total=cfg.optim.steps, initial=checked, disable=not progress, desc="generate",
                  unit="step", leave=False) as bar:
            try:
                for step in range(checked, cfg.optim.steps):
                    state = LoopState.take(step, z, z_init, opt, streams)  # to undo a cut step
                    image, loss = self._step(cfg, z, z_init, opt, guides, streams)
                    if cfg.denoise_every and (step + 1) % cfg.denoise_every == 0:
                        self.denoise(cfg, z)
                    torch.clamp_(z.data, lo, hi)
                    with ctrl_c_held():  # a Ctrl-C here comes after both: the frame, whole step
                        if video is not None and step % cfg.output.save_every == 0:
                            video.append(video_frame(image))
                        losses.append(loss)  # the step is whole from here: its frame is written
                    bar.update()
                    if (step + 1) % LOSS_EVERY == 0 or step + 1 == cfg.optim.steps:
                        checked = check_finite(losses, checked, z, cfg.optim.lr)
                        bar.set_postfix(loss=f"{losses[-1].mean().item():.4f}")
                    if callback is not None:
                        callback(step, {"image": image, "loss": loss, "z": z.detach()})
            except KeyboardInterrupt:
                interrupted = True  # keep what was made: the current image, the video so far
                if state is not None and len(losses) == state.step:  # inside a step: undo it
                    state.restore(z, opt, streams)
        if len(losses) > checked:  # steps since the last read: never keep a NaN image
            check_finite(losses, checked, z, cfg.optim.lr)
        with torch.no_grad():
            final = self.vqgan.decode(self.vqgan.quantize_latents(z.clamp(lo, hi)))
        if video is not None:
            video.append(video_frame(final))
        return final, losses, interrupted, LoopState.take(len(losses), z, z_init, opt, streams)

    def _step(self, cfg, z, z_init, opt, guides, streams):
        opt.zero_grad(set_to_none=True)
        image, loss = self._loss(cfg, z, z_init, guides, streams)
        loss.sum().backward()  # a sum: each candidate gets the gradient of its own loss
        opt.step()
        return image.detach(), loss.detach()

    def _loss(self, cfg, z, z_init, guides, streams):
        """The decoded images ``(K, 3, H, W)`` and the losses ``(K,)`` of latents z, with their
        graph: each guide's loss on its own cutouts, weighted by its share."""
        decode, encoders = self._models(cfg)
        z_q = self.vqgan.quantize_latents(z)  # fp32 always: code choice is a nearest-neighbour search
        with autocast(cfg.precision, self.device):
            image = decode(z_q, cfg.checkpoint).float()  # (K, 3, H, W) in [0, 1]
        loss = 0
        for guide, encode in zip(guides, encoders, strict=True):
            cuts = guide.cutouts(image, streams)  # (K * cutn, 3, S, S), S the model's own
            with autocast(cfg.precision, self.device):
                embeds = encode(cuts)  # (K * cutn, D), fp32
            embeds = embeds.view(z.shape[0], cfg.cutouts.cutn, -1)  # (K, cutn, D)
            loss = loss + guide.weight * sum(prompt_loss(embeds, t.embeds, t.weight, t.stop)
                                             for t in guide.targets)  # (K,)
        if cfg.prompts.init_weight:
            loss = loss + cfg.prompts.init_weight * init_loss(z, z_init)
        if cfg.tv_weight:
            loss = loss + cfg.tv_weight * tv_loss(image)
        return image, loss

    def _models(self, cfg: DictConfig):
        """The decoder and each guide's image encoder of a step (``cfg`` settled): compiled if
        asked; under bf16 or fp16, copies whose weights are in that dtype already (autocast
        would cast them on every call; :mod:`vqclip.models.low_precision`)."""
        if cfg.compile:
            return self._compiled
        if cfg.precision not in AUTOCAST_DTYPES:
            return self.vqgan.decode, [c.encode_image for c in self.clips]
        copies, dtype = self._low_precision, AUTOCAST_DTYPES[cfg.precision]
        vqgan = copies.get(self.vqgan, ["post_quant_conv", "decoder"], dtype)
        return vqgan.decode, [dataclasses.replace(c, model=copies.get(c.model, ["visual"], dtype))
                              .encode_image for c in self.clips]

    @functools.cached_property
    def _compiled(self):
        """The decoder and the CLIPs' image encoders under torch.compile, made once."""
        return torch.compile(self.vqgan.decode), [torch.compile(c.encode_image) for c in self.clips]

    def _prepare(self, cfg: DictConfig, seeds: list[int], z: torch.Tensor | None = None):
        """Each candidate's random streams, the guides (cutouts and targets of each CLIP) and
        the start z (made from the config unless given)."""
        streams, guides = SeedStreams(seeds, self.device), []
        for clip, weight in zip(self.clips, guide_weights(cfg.models), strict=True):
            cutouts = MakeCutouts(clip.input_size, cfg.cutouts.cutn, cfg.cutouts.cut_pow,
                                  cfg.cutouts.augments, cfg.cutouts.overview)
            guides.append(Guide(clip, cutouts, build_targets(clip, cfg, cutouts), weight))
        z = init_latents(self.vqgan, cfg, streams, self.device) if z is None else z.clone()
        return streams, guides, z.requires_grad_()  # (K, D, h, w)

    @torch.no_grad()
    def denoise(self, cfg: DictConfig, z: torch.Tensor) -> None:
        """Median-filter the current image and put its encoding in ``z``, in place.

        A prior that asks nothing of the prompt: specks smaller than the filter vanish and
        outlines lose their notches, while the optimizer's state carries on. The straight-through
        latents are replaced by the encoder's continuous ones, as for an init image. The loop
        calls it every ``denoise_every`` steps; other loops (the shapes trainer's) call it too.

        Args:
            cfg: a resolved config; ``denoise_size`` is the filter's side and ``precision`` the
                decoder's.
            z: latents ``(K, D, h, w)`` of this generator's VQGAN, overwritten.
        """
        with autocast(cfg.precision, self.device):
            image = self.vqgan.decode(self.vqgan.quantize_latents(z)).float()
        image = median_blur(image, cfg.denoise_size)
        z.copy_(self.vqgan.encode(image))


def generate(prompt: str | None = None, *, config: DictConfig | dict | None = None,
             preset: str | None = None, callback: Callback | None = None, progress: bool = False,
             download: bool = True, **kwargs: Any) -> GenerationResult:
    """Load the models a config names and run one generation (see :meth:`Generator.generate`).

    Example:
        >>> result = generate("a lighthouse", preset="imagenet", steps=50)  # doctest: +SKIP
    """
    if prompt is not None:
        kwargs["prompt"] = prompt
    gen = Generator.load(config, preset=preset, download=download, **kwargs)
    return gen.generate(callback=callback, progress=progress)

