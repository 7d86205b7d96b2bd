"""Training of the bundled offline pair on the shapes world: a tiny VQGAN and a tiny CLIP.

Both are the real architectures vqclip loads for the official models (taming's Encoder/Decoder/
VectorQuantizer2, an open_clip CLIP from a model config), only small. Training streams freshly
rendered scenes, is reproducible from a seed, and saves safetensors checkpoints as it goes
(atomically), so an interrupted run keeps its last checkpoint.

CLIP is trained on what the generation loop shows it: whole images through the loop's own
Kornia augmentations. It can also be given negatives, images that must match none of the
captions (for instance images the loop made that the judge rejects), which the contrastive loss
pushes away from every text.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoints import save_safetensors
from .cutouts import build_augments
from .models.vqgan import VQGAN, VQGANConfig
from .shapes import COLOURS, SHAPES, batch, caption, clutter_batch

__all__ = ["SHAPES_CLIP_ARCH", "SHAPES_CLIP_CONFIG", "SHAPES_VQGAN_CONFIG", "eval_clip",
           "eval_vqgan", "mine_negatives", "negative_bank", "train_clip", "train_vqgan"]

log = logging.getLogger(__name__)

# 64×64 images, f4: a 16×16 grid of 256 codes. taming's GroupNorm has 32 groups, so at ch=32 every
# channel is normalized on its own, over the image: a flat background then reaches the decoder's
# output only through the signs of its features, and colours are learned very slowly (an
# overfitting test: MSE 0.068 after 25 steps at ch=32, 0.038 at ch=64). Hence ch=64.
SHAPES_VQGAN_CONFIG = VQGANConfig(kind="vq", embed_dim=32, n_embed=512, ddconfig=dict(
    double_z=False, z_channels=32, resolution=64, in_channels=3, out_ch=3, ch=64, ch_mult=[1, 1, 2],
    num_res_blocks=1, attn_resolutions=[], dropout=0.0))
SHAPES_CLIP_ARCH = "vqclip-shapes"
SHAPES_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
}
LABELS = [(c, s) for c in COLOURS for s in SHAPES]  # the 24 single-object classes


def _schedule(opt: torch.optim.Optimizer, steps: int):
    """Linear warm-up over a tenth of the run (200 steps at most), then cosine decay."""
    warmup = max(1, min(200, steps // 10))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(i, steps) / steps)))


def _save(state: dict, path: Path, metadata: dict[str, str]) -> None:
    save_safetensors({k: v.detach().cpu().contiguous() for k, v in state.items()}, path, metadata)


# ---------------------------------------------------------------------------------------- VQGAN


def _autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


def _vq_forward(model: VQGAN, x: torch.Tensor, bf16: bool = False):
    """Encoder and decoder under bf16 autocast if asked; the quantizer always in fp32."""
    with _autocast(bf16):
        h = model.quant_conv(model.encoder(x * 2 - 1))
    z_q, q_loss, (_, _, indices) = model.quantize(h.float())
    with _autocast(bf16):
        rec = model.decoder(model.post_quant_conv(z_q))
    return rec.float().add(1).div(2), q_loss, h.float(), indices  # [0, 1], unclamped


def train_vqgan(out: str | Path, steps: int = 6000, batch_size: int = 32, lr: float = 1e-3,
                seed: int = 0, save_every: int = 500, progress: bool = True,
                log_file: str | Path | None = None, log_every: int = 50, bf16: bool = True) -> Path:
    """Train the shapes VQGAN: L1 + MSE + codebook loss, with dead-code restarts.

    ``bf16`` runs the encoder and decoder under bf16 autocast (1.7x faster on a CPU with AVX-512
    BF16; the quantizer stays in fp32). The saved weights are fp32 either way.

    Codes unused over the last 50 steps are moved onto random encoder outputs, so the whole
    codebook stays in use (a standard fix for codebook collapse, e.g. Jukebox, arXiv:2005.00341).
    """
    out = Path(out)
    torch.manual_seed(seed)
    model = VQGAN(SHAPES_VQGAN_CONFIG).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.99))
    sched = _schedule(opt, steps)
    usage = torch.zeros(SHAPES_VQGAN_CONFIG.n_embed)
    meta = {"vqclip.vqgan_config": SHAPES_VQGAN_CONFIG.to_json()}
    bar = tqdm(range(steps), disable=not progress, desc="shapes-vqgan", unit="step")
    for step in bar:
        x, _ = batch(step * batch_size, batch_size, "train")
        if step == 0:  # codes start on encoder outputs, not on taming's tiny uniform init
            with torch.no_grad():
                h = model.quant_conv(model.encoder(x * 2 - 1)).movedim(1, -1).flatten(0, 2)
                model.codebook.copy_(h[torch.randint(len(h), (model.codebook.shape[0],))])
        rec, q_loss, h, indices = _vq_forward(model, x, bf16)
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + q_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        usage += torch.bincount(indices.flatten(), minlength=usage.numel())
        if step % 50 == 49:
            _restart_dead_codes(model, usage, h.detach())
            usage.zero_()
        if step % log_every == 0:
            psnr = -10 * math.log10(F.mse_loss(rec.clamp(0, 1), x).item())
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr:.1f}")
            _log(log_file, {"step": step, "loss": loss.item(), "psnr": psnr})
        if (step + 1) % save_every == 0 or step + 1 == steps:
            _save(model.state_dict(), out, meta)
    return out


@torch.no_grad()
def _restart_dead_codes(model: VQGAN, usage: torch.Tensor, h: torch.Tensor) -> None:
    dead = (usage == 0).nonzero().flatten()
    if len(dead) == 0:
        return
    vectors = h.movedim(1, -1).reshape(-1, h.shape[1])
    pick = torch.randint(len(vectors), (len(dead),))
    model.codebook[dead] = vectors[pick] + 0.01 * torch.randn(len(dead), h.shape[1])


@torch.no_grad()
def eval_vqgan(model: VQGAN, n: int = 500, split: str = "val") -> dict[str, float]:
    """PSNR of reconstructions, and how often the judge reads the same colour and shape."""
    from .judge import judge

    model.eval()
    x, scenes = batch(0, n, split, num_objects=1)
    rec = torch.cat([model.decode(model.quantize_latents(model.encode(c))) for c in x.split(100)])
    mse = (rec - x).pow(2).flatten(1).mean(1)
    kept = [judge(r).matches(s.objects[0].colour, s.objects[0].shape)
            for r, s in zip(rec, scenes, strict=True)]
    return {"psnr": (-10 * mse.log10()).mean().item(), "judge_kept": sum(kept) / n}


# ----------------------------------------------------------------------------------------- CLIP


def register_shapes_clip(folder: str | Path) -> str:
    """Write the tiny CLIP's open_clip config JSON to ``folder`` and register it."""
    from .models.clip import register_clip_config

    path = Path(folder) / f"{SHAPES_CLIP_ARCH}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(SHAPES_CLIP_CONFIG, indent=2) + "\n")
    return register_clip_config(path)


def _clip_batch(start: int, n: int, rng: random.Random) -> tuple[torch.Tensor, list[str]]:
    x, scenes = batch(start, n, "train")
    return x, [caption(s, rng=rng) for s in scenes]


def train_clip(out: str | Path, steps: int = 4000, batch_size: int = 128, lr: float = 1e-3,
               seed: int = 0, save_every: int = 500, progress: bool = True,
               negatives: Callable[[int], torch.Tensor] | None = None,
               init: str | Path | None = None, log_file: str | Path | None = None,
               log_every: int = 50, augments: tuple[str, ...] = ("affine", "noise"),
               clutter: int = 48, bf16: bool = True, adversarial: float = 0.0,
               attack_steps: int = 3, clean_weight: float = 0.0) -> Path:
    """Train the tiny CLIP contrastively on augmented renders and their captions.

    Args:
        negatives: ``negatives(step) -> (M, 3, 64, 64)`` images that match no caption, or None.
        init: a checkpoint to continue from (for rounds of negative mining).
        augments: the Kornia augmentations applied to every image (the loop's names). Mild ones
            by default: perspective and colour jitter slow the learning of shape.
        clutter: how many procedural clutter images (:func:`vqclip.shapes.clutter`) join each
            batch as negatives: ragged blobs, textures, scattered pieces and almost-shapes.
        bf16: run the forward pass under bf16 autocast (faster on CPUs with AVX-512 BF16).
        adversarial: if > 0, train on PGD perturbations of the images of at most this L-inf size
            (in [0, 1] pixels, ``attack_steps`` steps), so that the image tower is robust and its
            gradients point at shapes rather than at imperceptible patterns (Madry et al. 2018;
            Santurkar et al. 2019, "Image synthesis with a single robust classifier").
        clean_weight: with ``adversarial``, the share of the loss taken on the clean images (the
            rest on the perturbed ones): robust training costs clean accuracy, and this keeps it.
    """
    import open_clip

    from .checkpoints import load_strict, read_state_dict

    out = Path(out)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    register_shapes_clip(out.parent)
    model = open_clip.create_model(SHAPES_CLIP_ARCH)
    if init is not None:
        load_strict(model, read_state_dict(init), init, f"the {SHAPES_CLIP_ARCH} CLIP")
    model.train()
    pp = open_clip.get_model_preprocess_cfg(model)
    mean, std = torch.tensor(pp["mean"]), torch.tensor(pp["std"])
    augs = build_augments(augments)
    tokenizer = open_clip.get_tokenizer(SHAPES_CLIP_ARCH)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.98))
    sched = _schedule(opt, steps)

    def encode_image(x: torch.Tensor) -> torch.Tensor:  # (B, 3, 64, 64) in [0, 1] -> (B, D) unit
        with _autocast(bf16):
            x = model.encode_image((x - mean[:, None, None]) / std[:, None, None])
        return F.normalize(x.float(), dim=-1)

    bar = tqdm(range(steps), disable=not progress, desc="shapes-clip", unit="step")
    for step in bar:
        images, texts = _clip_batch(step * batch_size, batch_size, rng)
        extra = [clutter_batch(step * clutter, clutter)] if clutter else []
        if negatives is not None:
            extra.append(negatives(step))
        images = augs(torch.cat([images, *extra])).clamp(0, 1)  # negatives look augmented too
        # captions repeat within a batch ("a red circle"): all images with that caption are right
        same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32)

        with _autocast(bf16):
            txt = F.normalize(model.encode_text(tokenizer(texts)).float(), dim=-1)
        scale = model.logit_scale.exp()
        clean_share = clean_weight if adversarial else 1.0
        loss = 0.0
        if adversarial:  # logits: (n texts, n images)
            fixed = (scale * txt).detach()
            attacked = _attack(lambda x, f=fixed, s=same: _contrastive(f @ encode_image(x).T, s),
                               images, adversarial, attack_steps)
            loss = (1 - clean_share) * _contrastive(scale * txt @ encode_image(attacked).T, same)
        if clean_share:
            loss = loss + clean_share * _contrastive(scale * txt @ encode_image(images).T, same)
        _clip_update(model, opt, sched, loss)
        if step % log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            _log(log_file, {"step": step, "loss": loss.item()})
        if (step + 1) % save_every == 0 or step + 1 == steps:
            _save(model.state_dict(), out, {"vqclip.clip_arch": SHAPES_CLIP_ARCH})
    return out


def _clip_update(model, opt: torch.optim.Optimizer, sched, loss: torch.Tensor) -> None:
    """One optimizer step on ``loss``, with CLIP's temperature kept at most 100."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))


def _contrastive(logits: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over ``logits`` (n texts, n images + negatives), where ``same[i, j]`` says
    that text i describes image j; the extra images (negatives) match no text."""
    n = len(same)
    target_t = F.pad(same, (0, logits.shape[1] - n))
    loss_t = torch.sum(-target_t / target_t.sum(1, keepdim=True) * logits.log_softmax(1), 1).mean()
    loss_i = torch.sum(-same / same.sum(1, keepdim=True) * logits[:, :n].T.log_softmax(1), 1).mean()
    return (loss_t + loss_i) / 2


def _attack(loss_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, eps: float,
            steps: int) -> torch.Tensor:
    """L-inf PGD from a random start: the images within ``eps`` that maximize ``loss_fn``."""
    delta = torch.empty_like(images).uniform_(-eps, eps)
    for _ in range(steps):
        delta.requires_grad_()
        grad, = torch.autograd.grad(loss_fn((images + delta).clamp(0, 1)), delta)
        delta = (delta.detach() + 2.5 * eps / steps * grad.sign()).clamp(-eps, eps)
    return (images + delta).clamp(0, 1).detach()


@torch.no_grad()
def eval_clip(clip, n: int = 480, split: str = "val") -> dict[str, float]:
    """Zero-shot accuracy over the 24 "a {colour} {shape}" classes on clean single-object renders."""
    texts = [f"a {c} {s}" for c, s in LABELS]
    t = F.normalize(clip.encode_text(texts), dim=-1)
    x, scenes = batch(0, n, split, num_objects=1)
    x = F.interpolate(x, size=clip.input_size, mode="bilinear", antialias=True) \
        if x.shape[-1] != clip.input_size else x
    i = F.normalize(torch.cat([clip.encode_image(c) for c in x.split(120)]), dim=-1)
    pred = (i @ t.T).argmax(1)
    truth = torch.tensor([LABELS.index((s.objects[0].colour, s.objects[0].shape)) for s in scenes])
    return {"accuracy": (pred == truth).float().mean().item(),
            "colour_accuracy": sum(LABELS[p][0] == LABELS[t][0] for p, t in zip(pred, truth,
                                                                             strict=True)) / n,
            "shape_accuracy": sum(LABELS[p][1] == LABELS[t][1] for p, t in zip(pred, truth,
                                                                            strict=True)) / n}


def negative_bank(path: str | Path, per_step: int = 16, seed: int = 0):
    """``negatives(step)`` for :func:`train_clip`: ``per_step`` images drawn from a file of mined
    negatives (a safetensors file with an ``images`` tensor, as ``scripts/mine_shapes.py`` writes)."""
    from .checkpoints import CheckpointError, read_state_dict

    bank = read_state_dict(path).get("images")
    if bank is None or bank.ndim != 4 or bank.shape[1] != 3 or len(bank) == 0:
        raise CheckpointError(f"{path}: no mined negatives here (an `images` tensor (N, 3, H, W), "
                              "as scripts/mine_shapes.py writes)")
    bank = bank.float()
    g = torch.Generator().manual_seed(seed)
    return lambda step: bank[torch.randint(len(bank), (min(per_step, len(bank)),), generator=g)]


def _log(path: str | Path | None, record: dict) -> None:
    if path is not None:
        with open(path, "a") as f:
            f.write(json.dumps({"time": round(time.time(), 1), **record}) + "\n")


def mine_negatives(generator, n: int, seed: int = 0, max_tries: int | None = None,
                   snapshots: int = 1, **settings) -> torch.Tensor:
    """Images the generation loop makes that the judge rejects for their prompt.

    These are the tiny CLIP's blind spots: images it was steered to rate as "a {colour}
    {shape}" that are not. Fed back to :func:`train_clip` as negatives (rounds of adversarial
    mining), they teach it to tell a red blob from a red circle.

    Args:
        generator: a :class:`vqclip.generator.Generator` with the models being improved.
        n: how many to collect. settings: generation settings (``steps``, ``lr``...).
        snapshots: images taken from each run, evenly spaced along it and ending with the final
            one (the loop's path towards a blind spot is made of blind spots too).
    Returns:
        ``(m, 3, H, W)`` with m <= n (fewer if ``max_tries`` generations ran out first).
    """
    from .judge import judge

    rng = random.Random(seed)
    found: list[torch.Tensor] = []
    steps = settings.get("steps", generator.config.optim.steps)
    keep = {steps * (i + 1) // snapshots - 1 for i in range(snapshots - 1)}
    frames: list[torch.Tensor] = []

    def snapshot(step: int, info: dict) -> None:
        if step in keep:
            frames.append(info["image"][0].detach().cpu())

    for _ in range(max_tries or 4 * n):
        if len(found) >= n:
            break
        colour, shape = rng.choice(LABELS)
        frames.clear()
        result = generator.generate(f"a {colour} {shape}", seed=rng.randrange(2**31),
                                    callback=snapshot, **settings)
        for image in [*frames, result.tensor[0]]:
            if not judge(image).matches(colour, shape):
                found.append(image)
    found = found[:n]
    return torch.stack(found) if found else torch.empty(0, 3, 64, 64)


# ------------------------------------------------------------------- CLIP against the loop itself


class _LoopData(torch.utils.data.Dataset):
    """Step ``i``'s training batch: captioned renders and clutter, made in a worker process."""

    def __init__(self, batch_size: int, clutter: int, seed: int):
        self.batch_size, self.clutter, self.seed = batch_size, clutter, seed

    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, step: int):
        images, texts = _clip_batch(step * self.batch_size, self.batch_size,
                                    random.Random(self.seed * 10**9 + step))
        return images, texts, clutter_batch(step * self.clutter, self.clutter)


def _judge_job(job):
    from .judge import judge

    image, colour, shape, age, whole = job
    return image, colour, shape, age, whole, judge(image).matches(colour, shape)


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


def _label_renders(per_label: int, seed: int) -> torch.Tensor:
    """``(24 * per_label, 3, 64, 64)``: each label's object alone, at random sizes, places and
    backgrounds (label-major)."""
    from .images import to_tensor
    from .shapes import BACKGROUNDS, Scene, ShapeObject, place_alone, render

    rng, images = random.Random(seed), []
    for colour, shape in LABELS:
        for _ in range(per_label):
            position, size = place_alone(rng)
            background = rng.choice([b for b in BACKGROUNDS if b != colour])
            images.append(to_tensor(render(Scene(background, (ShapeObject(colour, shape, size,
                                                                           position),)))))
    return torch.cat(images)


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

    ``chains`` runs of the loop (its settings, from gray, on random "a {colour} {shape}" prompts)
    advance ``chain_steps`` steps between two CLIP updates, always against the current CLIP, and
    start afresh when done. Every ``judge_every`` steps of a run, and at its end, the pixel-only
    judge reads its image: a rejected one joins a bank of negatives (it matches no caption), an
    accepted final one a bank of positives with its prompt. Each CLIP update is the contrastive
    loss of :func:`train_clip` on fresh renders with clutter and samples of both banks. This is
    adversarial mining with the real attack, as short-run MCMC trains an energy model
    (Nijkamp et al. 2019): the loop's failures are what the CLIP learns to score low.

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
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from .cutouts import MakeCutouts
    from .generator import Generator
    from .losses import spherical_distance

    if start not in ("gray", "render"):
        raise ValueError(f"start must be gray or render, got {start!r}")
    if workers is None:  # the CPUs this process may use, as DataLoader counts them
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        workers = min(4, cpus or 1)
    if workers < 1:
        raise ValueError(f"workers must be at least 1 (the judge runs in them), got {workers}")
    out = Path(out)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    config = register_shapes_clip(out.parent)  # beside the output, as train_clip does
    models = {} if init is None else {"clip_pretrained": str(init), "clip_config": str(
        out.parent / f"{config}.json")}
    gen = Generator.load(preset="shapes", device=device, overrides=list(loop_overrides), **models)
    cfg, vq, clip = gen.config, gen.vqgan, gen.clip
    dev = clip.device
    if cfg.optim.name != "adam" or cfg.prompts.init != "gray" or cfg.prompts.init_image:
        raise ValueError("the chains follow the shapes preset's loop: adam from a gray start")
    ignored = [k for k, on in (("prompts.init_weight", cfg.prompts.init_weight),
                               ("tv_weight", cfg.tv_weight), ("prompts.images", cfg.prompts.images),
                               ("prompts.noise", cfg.prompts.noise),
                               ("precision", cfg.precision != "fp32")) if on]
    if ignored:
        raise ValueError(f"the chains do not implement {ignored[0]}: leave it at the preset's value")
    T, every = cfg.optim.steps, cfg.denoise_every
    cutouts = MakeCutouts(clip.input_size, cfg.cutouts.cutn, cfg.cutouts.cut_pow,
                          cfg.cutouts.augments, cfg.cutouts.overview)
    augs = build_augments(cfg.cutouts.augments)
    model = clip.model
    model.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.98))
    warmup = min(100, steps)  # the same for every run length, so that runs can be continued
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup))
    amp = torch.autocast(dev.type, dtype=torch.bfloat16)
    texts24 = [f"a {c} {s}" for c, s in LABELS]
    R = renders_per_label
    with torch.no_grad():  # (24 * R, 3, H, W): clean renders of each label, through the VQGAN
        rendered = torch.cat([vq.encode(x.to(dev)) for x in _label_renders(R, seed).split(256)])
        clean = torch.cat([vq.decode(vq.quantize_latents(x)) for x in rendered.split(256)])

    # the chains: latents, Adam's moments and step counts, ages, prompts
    codebook = vq.codebook
    lo, hi = codebook.min(0).values.view(1, -1, 1, 1), codebook.max(0).values.view(1, -1, 1, 1)
    w, h = cfg.size
    with torch.no_grad():
        gray = vq.encode(torch.full((1, 3, h, w), 0.5, device=dev))
    age = torch.randint(0, T, (chains,), generator=g)  # staggered, for a steady flow of images
    full = torch.zeros(chains, dtype=torch.bool)  # whether a run began at step 0 (first ones: no)
    label = torch.randint(len(LABELS), (chains,), generator=g)

    def fresh(runs: torch.Tensor) -> torch.Tensor:  # the start latents of these runs, for their labels
        if start == "gray":
            return gray.repeat(len(runs), 1, 1, 1)
        return rendered[(label[runs] * R + torch.randint(R, (len(runs),), generator=g)).to(dev)]

    z = fresh(torch.arange(chains))
    m, v = torch.zeros_like(z), torch.zeros_like(z)
    t = torch.zeros(chains, 1, 1, 1, device=dev)
    b1, b2, eps = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults, as the loop uses them

    def decode(latents):
        return vq.decode(vq.quantize_latents(latents.clamp(lo, hi)))

    def chain_step(targets):
        nonlocal z
        z = z.detach().requires_grad_()
        image = vq.decode(vq.quantize_latents(z))
        # at the CLIP's own input size every cutout is the whole image: the same, unlooped
        cuts = augs(image.repeat_interleave(cfg.cutouts.cutn, 0)) \
            if image.shape[-1] == image.shape[-2] == clip.input_size else cutouts(image)
        embeds = clip.encode_image(cuts)
        loss = spherical_distance(embeds.view(chains, cfg.cutouts.cutn, -1), targets[:, None])
        grad, = torch.autograd.grad(loss.mean(1).sum(), z)
        with torch.no_grad():
            z = z.detach()
            t.add_(1)
            m.mul_(b1).add_(grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            denom = (v / (1 - b2 ** t)).sqrt().add_(eps)
            z -= cfg.optim.lr / (1 - b1 ** t) * m / denom
            age.add_(1)
            due = (age % every == 0).nonzero()[:, 0].tolist() if every else []
            if due:  # the loop's own denoising prior, on the runs whose turn it is
                part = z[due]
                gen._denoise(cfg, part)
                z[due] = part
            z.clamp_(lo, hi)

    data = iter(torch.utils.data.DataLoader(_LoopData(batch_size, clutter, seed), batch_size=None,
                                            num_workers=workers, prefetch_factor=4,
                                            persistent_workers=True))
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=torch.set_num_threads, initargs=(1,))
    # the judge works in other processes while the chains advance; a step uses the verdicts on
    # the images of the step before it, all of them and in order, so that runs are repeatable
    pending, neg_bank, pos_bank = [], _Ring(4096), _Ring(1024)
    finals = []  # (shape, accepted) of the latest finished runs
    began = time.perf_counter()
    try:
        bar = tqdm(range(steps), disable=not progress, desc="shapes-clip on the loop", unit="step")
        for step in bar:
            # 1. the chains advance against the current CLIP
            model.eval()
            tick = time.perf_counter()
            judged, pending = pending, []
            with torch.no_grad():
                targets = F.normalize(clip.encode_text([texts24[i] for i in label.tolist()]), dim=-1)
            for _ in range(chain_steps):
                chain_step(targets)
                snap = ((age % judge_every == 0) | (age >= T)).nonzero()[:, 0].tolist()
                if snap:
                    with torch.no_grad():
                        images = decode(z[snap]).cpu()
                    pending += [pool.submit(_judge_job, (im, *LABELS[int(label[i])], int(age[i]),
                                                         bool(full[i])))
                                for im, i in zip(images, snap, strict=True)]
                done = (age >= T).nonzero()[:, 0]
                if len(done):  # fresh runs on new prompts
                    label[done] = torch.randint(len(LABELS), (len(done),), generator=g)
                    z[done], m[done], v[done], t[done], age[done], full[done] = fresh(done), 0, 0, 0, 0, True
                    with torch.no_grad():
                        targets[done.to(dev)] = F.normalize(clip.encode_text(
                            [texts24[i] for i in label[done].tolist()]), dim=-1)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            chain_seconds = time.perf_counter() - tick
            # 2. the verdicts on the last step's images feed the banks
            for future in judged:
                image, colour, shape, a, whole, ok = future.result()
                k = torch.tensor([LABELS.index((colour, shape))], device=dev)
                if not ok:
                    neg_bank.push(image[None].to(dev), k)
                elif a >= T:
                    pos_bank.push(image[None].to(dev), k)
                if a >= T and whole:  # the acceptance rate counts whole runs only
                    finals.append((shape, ok))
            finals = finals[-600:]
            # 3. one CLIP update
            model.train()
            images, texts, junk = next(data)
            pos, pos_labels = pos_bank.sample(positives, g)
            neg, neg_labels = neg_bank.sample(negatives, g)
            texts = list(texts) + [texts24[i] for i in pos_labels.tolist()]
            extra = [x for x in (pos, junk.to(dev), neg) if len(x)]
            twins = clean[neg_labels * R + torch.randint(R, neg_labels.shape, device=dev)] \
                if len(neg) else clean[:0]
            batch_images = augs(torch.cat([images.to(dev), *extra, twins])).clamp(0, 1)
            same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32, device=dev)
            with amp:
                txt = F.normalize(clip.encode_text(texts + texts24).float(), dim=-1)
                im = F.normalize(clip.encode_image(batch_images).float(), dim=-1)
            scale = model.logit_scale.exp()
            im, im_twins = im[:len(im) - len(twins)], im[len(im) - len(twins):]
            txt, txt24 = txt[:len(texts)], txt[len(texts):]
            loss = _contrastive(scale * txt @ im.T, same)
            if len(neg) and margin_weight:  # each negative below a clean twin, for its own prompt
                t_k = txt24[neg_labels]
                gap = scale * ((t_k * im[len(im) - len(neg):]).sum(-1) - (t_k * im_twins).sum(-1))
                loss = loss + margin_weight * F.softplus(gap).mean()
            _clip_update(model, opt, sched, loss)
            elapsed = time.perf_counter() - began
            if step % log_every == 0 or step + 1 == steps:
                rate = {s: [ok for sh, ok in finals if sh == s] for s in SHAPES}
                record = {"step": step, "loss": round(loss.item(), 4), "negatives": len(neg_bank),
                          "positives": len(pos_bank), "seconds": round(elapsed, 1),
                          "chain_seconds": round(chain_seconds, 3),
                          "finals": len(finals), "accepted": round(sum(ok for _, ok in finals)
                                                                   / max(1, len(finals)), 3),
                          **{s: round(sum(r) / max(1, len(r)), 3) for s, r in rate.items()}}
                bar.set_postfix(loss=f"{loss.item():.3f}", ok=record["accepted"])
                _log(log_file, record)
            stop = time_limit is not None and elapsed > time_limit
            if (step + 1) % save_every == 0 or step + 1 == steps or stop:
                _save(model.state_dict(), out, {"vqclip.clip_arch": SHAPES_CLIP_ARCH})
            if stop:
                break
    finally:  # also on Ctrl-C: the judge's processes end with the run
        pool.shutdown(cancel_futures=True)
    return out
