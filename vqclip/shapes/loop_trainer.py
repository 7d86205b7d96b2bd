"""Fine-tuning of the shapes CLIP against the shapes preset's own generation loop, online.

Runs of the real loop (the chains) go on beside the training, always against the current CLIP; a
pixel-only judge in worker processes reads their images; the ones it rejects become negatives. One
step of :func:`train_clip_on_loop` is:

1. :meth:`_Chains.advance`: every run takes ``chain_steps`` steps of the loop, and the images due
   for judging go to :class:`_Judging`;
2. :meth:`_Banks.feed`: the verdicts on the previous step's images fill the banks;
3. :class:`_Update`: one CLIP update on fresh renders, clutter and samples of both banks, with
   :class:`_Renders`, the clean renders of each label, as the twins the negatives must score below.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import time
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..cutouts import MakeCutouts, build_augments
from ..generator import Generator
from ..losses import spherical_distance
from .clip_trainer import SHAPES_CLIP_ARCH, clip_batch, clip_update, contrastive, register_shapes_clip
from .judge import judge
from .training import bf16_autocast, log_record, save_weights
from .world import LABEL_TEXTS, LABELS, SHAPES, clutter_batch, label_renders

__all__ = ["train_clip_on_loop"]


def train_clip_on_loop(out: str | Path, init: str | Path | None = None, steps: int = 1000,
                       chains: int = 256, chain_steps: int = 2, batch_size: int = 256,
                       negatives: int = 128, positives: int = 32, clutter: int = 48,
                       lr: float = 2e-4, seed: int = 0, device: str = "auto", save_every: int = 100,
                       judge_every: int = 30, workers: int | None = None,
                       time_limit: float | None = None,
                       margin_weight: float = 1.0, renders_per_label: int = 48, start: str = "gray",
                       loop_overrides: tuple[str, ...] = (), log_file: str | Path | None = None,
                       log_every: int = 10, progress: bool = True) -> Path:
    """Fine-tune the tiny CLIP against the shapes preset's own generation loop, online.

    ``chains`` runs of the loop (its settings, from ``start``, on random "a {colour} {shape}" prompts)
    advance ``chain_steps`` steps between two CLIP updates, always against the current CLIP, and
    start afresh when done. Every ``judge_every`` steps of a run, and at its end, the pixel-only
    judge reads its image: a rejected one joins a bank of negatives (it matches no caption), an
    accepted final one a bank of positives with its prompt. Each CLIP update is the contrastive
    loss of :func:`~vqclip.shapes.clip_trainer.train_clip` on fresh renders with clutter and
    samples of both banks. This is adversarial mining with the real attack, as short-run MCMC
    trains an energy model (Nijkamp et al. 2019): the loop's failures are what the CLIP learns to
    score low.

    The contrastive loss pushes a negative away from the batch's captions, which seldom include
    the prompt it was made for. So a second loss (``margin_weight``) ranks each negative below a
    clean render of its own prompt, as the VQGAN reconstructs it (the loop can only make decoded
    images), for that prompt's text: the loop's blob must score less than the shape it imitates.

    Args:
        init: the CLIP to start from (default: the shipped one).
        loop_overrides: ``key=value`` generation settings for the chains (default: the preset's).
        workers: processes that render the training batches and run the judge (default: the
            CPU count, at most 4).
        start: where each run starts: ``gray`` (the preset's start, as generation does) or
            ``render``, a clean render of its own prompt through the VQGAN, as
            ``scripts/eval_shapes.py --only keep`` does. There every failure is a departure from a
            true shape that CLIP scored higher, the step the loop takes away from the right answer.
        time_limit: stop (and save) after this many seconds.
    Returns the path of the saved weights (written every ``save_every`` steps and at the end).
    """
    workers = _check(start, workers)  # before anything is written
    out = Path(out)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    gen = _chain_generator(out, init, device, loop_overrides)
    augs = build_augments(gen.config.cutouts.augments)  # one set for the chains and the updates
    renders = _Renders(gen.vqgan, renders_per_label, seed)
    update = _Update(gen.clip, lr, steps, augs, renders, margin_weight)
    runs = _Chains(gen, chains, start, renders, augs, g)
    data = iter(torch.utils.data.DataLoader(_LoopData(batch_size, clutter, seed), batch_size=None,
                                            num_workers=workers, prefetch_factor=4,
                                            persistent_workers=True))
    judging, banks = _Judging(workers), _Banks(gen.clip.device)
    began = time.perf_counter()
    try:  # also on Ctrl-C: the judge's processes end with the run
        bar = tqdm(range(steps), disable=not progress, desc="shapes-clip on the loop", unit="step")
        for step in bar:
            judged = judging.take()  # the images of the step before, judged while it ran
            tick = time.perf_counter()
            runs.advance(chain_steps, judge_every, judging)
            chain_seconds = time.perf_counter() - tick
            banks.feed(judged, runs.T)
            loss = update(next(data), banks, positives, negatives, g)
            elapsed = time.perf_counter() - began
            if step % log_every == 0 or step + 1 == steps:
                record = {"step": step, "loss": round(loss.item(), 4), "negatives": len(banks.neg),
                          "positives": len(banks.pos), "seconds": round(elapsed, 1),
                          "chain_seconds": round(chain_seconds, 3), **banks.acceptance()}
                bar.set_postfix(loss=f"{loss.item():.3f}", ok=record["accepted"])
                log_record(log_file, record)
            stop = time_limit is not None and elapsed > time_limit
            if (step + 1) % save_every == 0 or step + 1 == steps or stop:
                save_weights(update.model.state_dict(), out, {"vqclip.clip_arch": SHAPES_CLIP_ARCH})
            if stop:
                break
    finally:
        judging.close()
    return out


def _check(start: str, workers: int | None) -> int:
    """The settings that need no model, checked first; returns the worker count."""
    if start not in ("gray", "render"):
        raise ValueError(f"start must be gray or render, got {start!r}")
    if workers is None:  # the CPUs this process may use, as DataLoader counts them
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        workers = min(4, cpus or 1)
    if workers < 1:
        raise ValueError(f"workers must be at least 1 (the judge runs in them), got {workers}")
    return workers


def _chain_generator(out: Path, init: str | Path | None, device: str,
                     loop_overrides: tuple[str, ...]) -> Generator:
    """The shapes preset's generator, with the CLIP to tune; refuses loops the chains do not run."""
    config = register_shapes_clip(out.parent)  # beside the output, as train_clip does
    models = {} if init is None else {"clip_pretrained": str(init), "clip_config": str(
        out.parent / f"{config}.json")}
    gen = Generator.load(preset="shapes", device=device, overrides=list(loop_overrides), **models)
    cfg = gen.config
    if cfg.optim.name != "adam" or cfg.prompts.init != "gray" or cfg.prompts.init_image:
        raise ValueError("the chains follow the shapes preset's loop: adam from a gray start")
    ignored = [k for k, on in (("prompts.init_weight", cfg.prompts.init_weight),
                               ("tv_weight", cfg.tv_weight), ("prompts.images", cfg.prompts.images),
                               ("prompts.noise", cfg.prompts.noise),
                               ("precision", cfg.precision != "fp32")) if on]
    if ignored:
        raise ValueError(f"the chains do not implement {ignored[0]}: leave it at the preset's value")
    return gen


class _Chains:
    """``n`` runs of the loop side by side, one row each: latents, Adam's moments and step counts,
    ages (steps taken) and prompts (label indices)."""

    def __init__(self, gen: Generator, n: int, start: str, renders: "_Renders", augs,
                 g: torch.Generator):
        cfg, vq, self.clip = gen.config, gen.vqgan, gen.clip
        self.gen, self.cfg, self.vq, self.start, self.g = gen, cfg, vq, start, g
        self.renders, self.augs = renders, augs
        dev = self.clip.device
        self.T, self.every = cfg.optim.steps, cfg.denoise_every
        self.cutouts = MakeCutouts(self.clip.input_size, cfg.cutouts.cutn, cfg.cutouts.cut_pow,
                                   cfg.cutouts.augments, cfg.cutouts.overview)
        codebook = vq.codebook
        self.lo = codebook.min(0).values.view(1, -1, 1, 1)
        self.hi = codebook.max(0).values.view(1, -1, 1, 1)
        w, h = cfg.size
        with torch.no_grad():
            self.gray = vq.encode(torch.full((1, 3, h, w), 0.5, device=dev))
        self.age = torch.randint(0, self.T, (n,), generator=g)  # staggered, for a steady flow of images
        self.full = torch.zeros(n, dtype=torch.bool)  # whether a run began at step 0 (first ones: no)
        self.label = torch.randint(len(LABELS), (n,), generator=g)
        self.z = self.fresh(torch.arange(n))
        # Adam by hand, batched over the runs, rather than torch.optim.Adam: each run restarts on
        # its own schedule, and a restart must reset that run's moments and step count alone,
        # which torch.optim.Adam's single state for the whole tensor cannot do.
        self.m, self.v = torch.zeros_like(self.z), torch.zeros_like(self.z)
        self.t = torch.zeros(n, 1, 1, 1, device=dev)

    def fresh(self, runs: torch.Tensor) -> torch.Tensor:
        """The start latents of these runs, for their labels."""
        if self.start == "gray":
            return self.gray.repeat(len(runs), 1, 1, 1)
        return self.renders.latents[self.renders.pick(self.label[runs], self.g)]

    def advance(self, chain_steps: int, judge_every: int, judging: "_Judging") -> None:
        """``chain_steps`` steps of every run against the current CLIP; the images due for judging
        (every ``judge_every`` steps of a run, and its last) go to ``judging``; finished runs start
        afresh on new prompts."""
        self.clip.model.eval()
        targets = self.targets(self.label)
        for _ in range(chain_steps):
            self.step(targets)
            age = self.age
            snap = ((age % judge_every == 0) | (age >= self.T)).nonzero()[:, 0].tolist()
            if snap:
                with torch.no_grad():
                    images = self.decode(self.z[snap]).cpu()
                judging.submit([(im, *LABELS[int(self.label[i])], int(age[i]), bool(self.full[i]))
                                for im, i in zip(images, snap, strict=True)])
            done = (age >= self.T).nonzero()[:, 0]
            if len(done):  # fresh runs on new prompts
                self.label[done] = torch.randint(len(LABELS), (len(done),), generator=self.g)
                self.z[done], self.m[done], self.v[done] = self.fresh(done), 0, 0
                self.t[done], self.age[done], self.full[done] = 0, 0, True
                targets[done.to(self.clip.device)] = self.targets(self.label[done])
        if self.clip.device.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """The unit text embeddings of these labels' prompts: ``(len(labels), D)``."""
        return F.normalize(self.clip.encode_text([LABEL_TEXTS[i] for i in labels.tolist()]), dim=-1)

    def step(self, targets: torch.Tensor) -> None:
        """One step of the loop for every run: the preset's cutouts, loss, Adam and prior."""
        cfg, vq, clip = self.cfg, self.vq, self.clip
        z = self.z.detach().requires_grad_()
        image = vq.decode(vq.quantize_latents(z))
        # at the CLIP's own input size every cutout is the whole image: the same, unlooped
        cuts = self.augs(image.repeat_interleave(cfg.cutouts.cutn, 0)) \
            if image.shape[-1] == image.shape[-2] == clip.input_size else self.cutouts(image)
        embeds = clip.encode_image(cuts)
        loss = spherical_distance(embeds.view(len(z), cfg.cutouts.cutn, -1), targets[:, None])
        grad, = torch.autograd.grad(loss.mean(1).sum(), z)
        b1, b2, eps = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults, as the loop uses them
        with torch.no_grad():
            z = z.detach()
            m, v, t = self.m, self.v, self.t
            t.add_(1)
            m.mul_(b1).add_(grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            denom = (v / (1 - b2 ** t)).sqrt().add_(eps)
            z -= cfg.optim.lr / (1 - b1 ** t) * m / denom
            self.age.add_(1)
            due = (self.age % self.every == 0).nonzero()[:, 0].tolist() if self.every else []
            if due:  # the loop's own denoising prior, on the runs whose turn it is
                part = z[due]
                self.gen.denoise(cfg, part)
                z[due] = part
            z.clamp_(self.lo, self.hi)
        self.z = z

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vq.decode(self.vq.quantize_latents(latents.clamp(self.lo, self.hi)))


class _Judging:
    """The pixel judge in spawned worker processes (one torch thread each), while the chains
    advance. A step uses the verdicts on the images of the step before it, all of them and in
    order, so that runs repeat from the seed whatever the judge's timing."""

    def __init__(self, workers: int):
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                        initializer=torch.set_num_threads, initargs=(1,))
        self.pending: list[Future] = []

    def submit(self, jobs: list[tuple]) -> None:
        """``(image, colour, shape, age, whole)`` per image; ``whole``: its run began at step 0."""
        self.pending += [self.pool.submit(_judge_job, job) for job in jobs]

    def take(self) -> list[Future]:
        """The jobs submitted so far (their results come in order); later ones start a new list."""
        taken, self.pending = self.pending, []
        return taken

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


def _judge_job(job):
    image, colour, shape, age, whole = job
    return image, colour, shape, age, whole, judge(image).matches(colour, shape)


class _Banks:
    """The judged images: rejected ones (negatives, any age), accepted final ones (positives), and
    the verdicts on the latest whole runs, for the log's acceptance rates."""

    def __init__(self, device: torch.device):
        self.device = device
        self.neg, self.pos = _Ring(4096), _Ring(1024)
        self.finals: list[tuple[str, bool]] = []  # (shape, accepted)

    def feed(self, judged: list[Future], T: int) -> None:
        for future in judged:
            image, colour, shape, age, whole, ok = future.result()
            k = torch.tensor([LABELS.index((colour, shape))], device=self.device)
            if not ok:
                self.neg.push(image[None].to(self.device), k)
            elif age >= T:
                self.pos.push(image[None].to(self.device), k)
            if age >= T and whole:  # the acceptance rate counts whole runs only
                self.finals.append((shape, ok))
        self.finals = self.finals[-600:]

    def sample(self, positives: int, negatives: int, g: torch.Generator):
        """``(pos, pos_labels, neg, neg_labels)``: up to that many of each, drawn uniformly."""
        return (*self.pos.sample(positives, g), *self.neg.sample(negatives, g))

    def acceptance(self) -> dict:
        rate = {s: [ok for sh, ok in self.finals if sh == s] for s in SHAPES}
        return {"finals": len(self.finals),
                "accepted": round(sum(ok for _, ok in self.finals) / max(1, len(self.finals)), 3),
                **{s: round(sum(r) / max(1, len(r)), 3) for s, r in rate.items()}}


class _Ring:
    """The last ``size`` rows pushed (images and label indices), sampled uniformly."""

    def __init__(self, size: int):
        self.size, self.rows, self.labels, self.next = size, None, None, 0

    def __len__(self) -> int:
        return 0 if self.rows is None else min(self.next, self.size)

    def push(self, rows: torch.Tensor, labels: torch.Tensor) -> None:
        if self.rows is None:
            self.rows = rows.new_zeros(self.size, *rows.shape[1:])
            self.labels = labels.new_zeros(self.size)
        for row, label in zip(rows, labels, strict=True):
            self.rows[self.next % self.size], self.labels[self.next % self.size] = row, label
            self.next += 1

    def sample(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if not len(self) or not n:
            return torch.empty(0), torch.empty(0, dtype=torch.long)
        i = torch.randint(len(self), (min(n, len(self)),), generator=g)
        return self.rows[i.to(self.rows.device)], self.labels[i.to(self.labels.device)]


class _Renders:
    """Clean renders of each label through the VQGAN: runs' starts (``start="render"``), twins."""

    @torch.no_grad()
    def __init__(self, vq, per_label: int, seed: int):
        dev, self.per_label = vq.codebook.device, per_label
        renders = label_renders(per_label, seed).split(256)  # (24 * per_label, 3, H, W)
        self.latents = torch.cat([vq.encode(x.to(dev)) for x in renders])  # label-major
        self.images = torch.cat([vq.decode(vq.quantize_latents(x)) for x in self.latents.split(256)])

    def pick(self, labels: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
        """The index of a random render of each label, drawn from ``g`` (on the CPU) or else from
        torch's own generator on the labels' device."""
        R = self.per_label
        if g is None:
            return labels * R + torch.randint(R, labels.shape, device=labels.device)
        return (labels * R + torch.randint(R, labels.shape, generator=g)).to(self.latents.device)


class _Update:
    """One CLIP update: the contrastive loss on a training batch with samples of both banks, plus
    the margin that ranks each negative below a clean render of its own prompt."""

    def __init__(self, clip, lr: float, steps: int, augs, renders: _Renders, margin_weight: float):
        self.clip, self.model, self.augs, self.renders = clip, clip.model, augs, renders
        self.margin_weight = margin_weight
        self.model.requires_grad_(True)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.1,
                                     betas=(0.9, 0.98))
        warmup = min(100, steps)  # the same for every run length, so that runs can be continued
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda i: min(1.0, (i + 1) / warmup))
        self.amp = bf16_autocast(clip.device)

    def __call__(self, batch, banks: _Banks, positives: int, negatives: int,
                 g: torch.Generator) -> torch.Tensor:
        dev, model = self.clip.device, self.model
        model.train()
        images, texts, junk = batch
        pos, pos_labels, neg, neg_labels = banks.sample(positives, negatives, g)
        texts = list(texts) + [LABEL_TEXTS[i] for i in pos_labels.tolist()]
        extra = [x for x in (pos, junk.to(dev), neg) if len(x)]
        clean = self.renders.images
        twins = clean[self.renders.pick(neg_labels)] if len(neg) else clean[:0]
        batch_images = self.augs(torch.cat([images.to(dev), *extra, twins])).clamp(0, 1)
        same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32, device=dev)
        with self.amp:
            txt = F.normalize(self.clip.encode_text(texts + LABEL_TEXTS).float(), dim=-1)
            im = F.normalize(self.clip.encode_image(batch_images).float(), dim=-1)
        scale = model.logit_scale.exp()
        im, im_twins = im[:len(im) - len(twins)], im[len(im) - len(twins):]
        txt, txt24 = txt[:len(texts)], txt[len(texts):]
        loss = contrastive(scale * txt @ im.T, same)
        if len(neg) and self.margin_weight:  # each negative below a clean twin, for its own prompt
            t_k = txt24[neg_labels]
            gap = scale * ((t_k * im[len(im) - len(neg):]).sum(-1) - (t_k * im_twins).sum(-1))
            loss = loss + self.margin_weight * F.softplus(gap).mean()
        clip_update(model, self.opt, self.sched, loss)
        return loss


class _LoopData(torch.utils.data.Dataset):
    """Step ``i``'s training batch: captioned renders and clutter, made in a worker process."""

    def __init__(self, batch_size: int, clutter: int, seed: int):
        self.batch_size, self.clutter, self.seed = batch_size, clutter, seed

    def __len__(self) -> int:  # endless: step i asks for item i
        return 10**9

    def __getitem__(self, step: int):
        images, texts = clip_batch(step * self.batch_size, self.batch_size,
                                   random.Random(self.seed * 10**9 + step))
        return images, texts, clutter_batch(step * self.clutter, self.clutter)
