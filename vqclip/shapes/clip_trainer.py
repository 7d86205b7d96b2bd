"""Training of the shapes world's tiny CLIP: an open_clip CLIP from a model config (the code path
vqclip loads the official models through), only small, with open_clip's real BPE tokenizer.

CLIP is trained on what the generation loop shows it: whole images through the loop's own
Kornia augmentations. It can also be given negatives, images that must match none of the
captions (for instance images the loop made that the judge rejects), which the contrastive loss
pushes away from every text. Reproducible from a seed; checkpoints are saved as it goes.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..cutouts import build_augments
from .training import bf16_autocast, log_record, save_weights, warmup_cosine
from .world import LABEL_TEXTS, LABELS, batch, caption, clutter_batch

__all__ = ["SHAPES_CLIP_ARCH", "SHAPES_CLIP_CONFIG", "SHAPES_CLIP_FAMILIES", "clip_batch", "clip_update", "contrastive",
           "eval_clip", "mine_negatives", "negative_bank", "register_shapes_clip", "train_clip"]

SHAPES_CLIP_ARCH = "vqclip-shapes"
SHAPES_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
}


# another family for ensembles: the same text tower, an image tower of convolutions (open_clip's
# ModifiedResNet, as in OpenAI's RN50, much narrower): patterns that fool one family rarely fool
# the other
SHAPES_CLIP_FAMILIES = {
    "vit": (SHAPES_CLIP_ARCH, SHAPES_CLIP_CONFIG),
    "resnet": ("vqclip-shapes-rn", {**SHAPES_CLIP_CONFIG, "vision_cfg": {
        "image_size": 64, "layers": [1, 1, 1, 1], "width": 24, "head_width": 32}}),
}


def register_shapes_clip(folder: str | Path, family: str = "vit") -> str:
    """Write a shapes CLIP's open_clip config JSON (``family``: see :data:`SHAPES_CLIP_FAMILIES`)
    to ``folder`` and register it; returns its architecture's name."""
    from ..models.clip import register_clip_config

    arch, config = SHAPES_CLIP_FAMILIES[family]
    path = Path(folder) / f"{arch}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return register_clip_config(path)


def clip_batch(start: int, n: int, rng: random.Random) -> tuple[torch.Tensor, list[str]]:
    x, scenes = batch(start, n, "train")
    return x, [caption(s, rng=rng) for s in scenes]


def train_clip(out: str | Path, steps: int = 4000, batch_size: int = 128, lr: float = 1e-3,
               seed: int = 0, save_every: int = 500, progress: bool = True,
               negatives: Callable[[int], torch.Tensor] | None = None,
               init: str | Path | None = None, log_file: str | Path | None = None,
               log_every: int = 50, augments: tuple[str, ...] = ("affine", "noise"),
               clutter: int = 48, bf16: bool | None = None, adversarial: float = 0.0,
               attack_steps: int = 3, clean_weight: float = 0.0, family: str = "vit") -> Path:
    """Train the tiny CLIP contrastively on augmented renders and their captions.

    Args:
        negatives: ``negatives(step) -> (M, 3, 64, 64)`` images that match no caption, or None.
        init: a checkpoint to continue from (for rounds of negative mining).
        augments: the Kornia augmentations applied to every image (the loop's names). Mild ones
            by default: perspective and colour jitter slow the learning of shape.
        clutter: how many procedural clutter images (:func:`vqclip.shapes.clutter`) join each
            batch as negatives: ragged blobs, textures, scattered pieces and almost-shapes.
        bf16: run the forward pass under bf16 autocast (faster on CPUs with AVX-512 BF16); None:
            where the CPU has bf16 arithmetic.
        adversarial: if > 0, train on PGD perturbations of the images of at most this L-inf size
            (in [0, 1] pixels, ``attack_steps`` steps), so that the image tower is robust and its
            gradients point at shapes rather than at imperceptible patterns (Madry et al. 2018;
            Santurkar et al. 2019, "Image synthesis with a single robust classifier").
        clean_weight: with ``adversarial``, the share of the loss taken on the clean images (the
            rest on the perturbed ones): robust training costs clean accuracy, and this keeps it.
        family: the image tower, ``vit`` (the shipped one) or ``resnet`` (for ensembles).
    """
    import open_clip

    from ..checkpoints import load_strict, read_state_dict

    out = Path(out)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    arch = register_shapes_clip(out.parent, family)
    model = open_clip.create_model(arch)
    if init is not None:
        load_strict(model, read_state_dict(init), init, f"the {arch} CLIP")
    model.train()
    pp = open_clip.get_model_preprocess_cfg(model)
    mean, std = torch.tensor(pp["mean"]), torch.tensor(pp["std"])
    augs = build_augments(augments)
    tokenizer = open_clip.get_tokenizer(arch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.98))
    sched = warmup_cosine(opt, steps)

    def encode_image(x: torch.Tensor) -> torch.Tensor:  # (B, 3, 64, 64) in [0, 1] -> (B, D) unit
        with bf16_autocast("cpu", bf16):
            x = model.encode_image((x - mean[:, None, None]) / std[:, None, None])
        return F.normalize(x.float(), dim=-1)

    bar = tqdm(range(steps), disable=not progress, desc="shapes-clip", unit="step")
    for step in bar:
        images, texts = clip_batch(step * batch_size, batch_size, rng)
        extra = [clutter_batch(step * clutter, clutter)] if clutter else []
        if negatives is not None:
            extra.append(negatives(step))
        images = augs(torch.cat([images, *extra])).clamp(0, 1)  # negatives look augmented too
        # captions repeat within a batch ("a red circle"): all images with that caption are right
        same = torch.tensor([[a == b for b in texts] for a in texts], dtype=torch.float32)

        with bf16_autocast("cpu", bf16):
            txt = F.normalize(model.encode_text(tokenizer(texts)).float(), dim=-1)
        scale = model.logit_scale.exp()
        clean_share = clean_weight if adversarial else 1.0
        loss = 0.0
        if adversarial:  # logits: (n texts, n images)
            fixed = (scale * txt).detach()
            attacked = _attack(lambda x, f=fixed, s=same: contrastive(f @ encode_image(x).T, s),
                               images, adversarial, attack_steps)
            loss = (1 - clean_share) * contrastive(scale * txt @ encode_image(attacked).T, same)
        if clean_share:
            loss = loss + clean_share * contrastive(scale * txt @ encode_image(images).T, same)
        clip_update(model, opt, sched, loss)
        if step % log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            log_record(log_file, {"step": step, "loss": loss.item()})
        if (step + 1) % save_every == 0 or step + 1 == steps:
            save_weights(model.state_dict(), out, {"vqclip.clip_arch": arch})
    return out


def clip_update(model, opt: torch.optim.Optimizer, sched, loss: torch.Tensor) -> None:
    """One optimizer step on ``loss``, with CLIP's temperature kept at most 100."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))


def contrastive(logits: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
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
    t = F.normalize(clip.encode_text(LABEL_TEXTS), dim=-1)
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
    from ..checkpoints import CheckpointError, read_state_dict

    bank = read_state_dict(path).get("images")
    if bank is None or bank.ndim != 4 or bank.shape[1] != 3 or len(bank) == 0:
        raise CheckpointError(f"{path}: no mined negatives here (an `images` tensor (N, 3, H, W), "
                              "as scripts/mine_shapes.py writes)")
    bank = bank.float()
    g = torch.Generator().manual_seed(seed)
    return lambda step: bank[torch.randint(len(bank), (min(per_step, len(bank)),), generator=g)]


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
