"""Runs that go on where they stopped, bit for bit on the same machine.

A state file is a safetensors file: the tensors, and everything else as JSON in its header
(``metadata["vqclip"]``); never a pickle, so a state file from elsewhere cannot run code. Kinds:

``generation``: a run saved as ``out.png`` writes ``out.state.safetensors`` beside it (unless
    ``output.save_state`` is false), as it ends or is stopped: the latents, the start they began
    from (``init_weight`` pulls toward it), the optimizer's state, each candidate's random
    streams and the losses, after the last whole step (Ctrl-C inside a step drops that step).
    ``vqclip generate --resume out.png --steps N`` goes on to N steps in all.
``animation``: an animation keeps ``animation.state.safetensors`` in its folder, rewritten after
    each frame: the last frame as the loop made it (not the rounded PNG) and the frames' records.
    Each frame starts a fresh optimizer and its own random stream, so that is all the next frame
    needs. ``vqclip animate --resume DIR --frames N`` goes on to N frames in all.

Both record the run's config, which a resumed run takes. Settings given again must match it
(:func:`resumed_config`); only the length, the device and where the outputs go may change.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .config import load_config
from .images import atomic_path
from .outputs import state_path

__all__ = ["LoopState", "find_state", "length_done", "load_resumed", "read_state",
           "save_state"]

log = logging.getLogger(__name__)

FORMAT = "vqclip-state/1"
ANIMATION_STATE = "animation.state.safetensors"
# what a resumed run may change: its length, where it runs, and where its outputs go
FREE = {"generation": {"optim.steps", "device", "output.path", "output.video",
                       "output.overwrite", "output.save_state", "output.best_only"},
        "animation": {"animation.frames", "device", "output.video", "output.overwrite",
                      "animation.fps"}}
# what a state file of each kind holds: header keys, then tensors
HOLDS = {"generation": ({"config", "factor", "step", "optim", "device"},
                        {"z", "z_init", "losses"}),
         "animation": ({"config", "factor", "records"}, {"last"})}


def find_state(path: str | Path, kind: str) -> Path:
    """The state file that ``--resume PATH`` means: the file itself, the state of an animation
    folder, or the state beside a generation's PNG (also given as candidate ``out-k.png``).

    Raises:
        FileNotFoundError: none there.
    """
    path = Path(path)
    if kind == "animation":
        found = [path / ANIMATION_STATE if path.is_dir() else path]
    else:
        found = [path] if path.suffix == ".safetensors" else [
            state_path(path), state_path(path.with_name(re.sub(r"-\d+$", "", path.stem) + ".png"))]
    for candidate in found:
        if candidate.is_file():
            return candidate
    where = "an animation folder" if kind == "animation" else "a generation's PNG"
    raise FileNotFoundError(f"--resume {path}: no saved state there ({found[0].name}); give "
                            f"{where} made by vqclip {__version__} or later")


def save_state(path: str | Path, kind: str, tensors: dict[str, torch.Tensor],
               config: DictConfig, **meta: Any) -> Path:
    """Write a state file atomically: ``tensors`` (moved to the CPU) and ``meta`` (JSON)."""
    header = {"format": FORMAT, "kind": kind, "vqclip_version": __version__,
              "config": OmegaConf.to_container(config), **meta}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"vqclip": json.dumps(header)})
    return path


def read_state(path: str | Path, kind: str, tensors: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """A state file's header and (unless ``tensors`` is false: just the header, which is quick)
    its tensors, on the CPU. The header's ``config`` is a DictConfig.

    Raises:
        ValueError: not a vqclip state of this kind.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get("vqclip", "{}"))
            data = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"--resume: {path} is not a vqclip state file ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("kind") != kind:
        found = header if isinstance(header, dict) else {}
        raise ValueError(f"--resume: {path} holds no {kind} state (format "
                         f"{found.get('format')!r}, kind {found.get('kind')!r})")
    keys, names = HOLDS[kind]
    missing = sorted(keys - header.keys()) + sorted(names - data.keys() if tensors else [])
    if missing or not isinstance(header["config"], dict):
        raise ValueError(f"--resume: {path} is damaged: no {(missing or ['config'])[0]} in it")
    try:
        header["config"] = load_config(header["config"])
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"--resume: {path} holds settings this vqclip cannot read ({e})") from None
    return header, data


def load_resumed(path: str | Path, kind: str, change: Callable[[DictConfig], DictConfig],
                 tensors: bool = True) -> tuple[Path, DictConfig, dict, dict[str, torch.Tensor]]:
    """The state file ``--resume PATH`` names, the config a resumed run takes, the header and
    (unless ``tensors`` is false, for the checks before the models load) the tensors.

    ``change(saved)`` applies what the caller was given (flags, overrides, a config) to the run's
    own config; that must match it but for the length, the device and the outputs (:data:`FREE`).
    ``auto`` precision means whatever the run chose, and a size counts as the VQGAN rounds it.

    Raises:
        FileNotFoundError: no state there. ValueError: not a state of this kind, or a setting
        that differs from the run's (the first, with both values).
    """
    path = find_state(path, kind)
    header, data = read_state(path, kind, tensors)
    saved, factor, free = header["config"], header["factor"], FREE[kind]
    if kind == "animation":  # where it is now, wherever it was made
        own = saved.animation.output = str(path.parent)
        for record in header["records"]:
            if not (path.parent / Path(record["path"]).name).is_file():
                raise ValueError(f"--resume: {Path(record['path']).name} is missing from "
                                 f"{path.parent}; the animation cannot go on without it")
    else:
        own = saved.output.path = str(path.parent / Path(saved.output.path).name)
        saved.output.video = None  # the stopped run's progress video stays; --video starts one
    saved.output.overwrite = False  # only what is given now
    new = change(copy.deepcopy(saved))
    old_leaves = _leaves(OmegaConf.to_container(saved))
    new_leaves = _leaves(OmegaConf.to_container(new))
    for key, value in new_leaves.items():
        old = old_leaves.get(key)
        if key == "size" and value is not None:
            value = [max(factor, int(s / factor + 0.5) * factor) for s in value]
        if value == old or key in free or (key == "precision" and value == "auto"):
            continue
        raise ValueError(f"--resume: the run has {key}={_show(old)}, not {_show(value)}; leave it "
                         "out to go on with the run's own settings")
    for key in free & new_leaves.keys():
        OmegaConf.update(saved, key, new_leaves[key], merge=False)
    if kind == "animation" or Path(saved.output.path).resolve() == Path(own).resolve():
        saved.output.overwrite = True  # the run's own files, continued
    done = length_done(header, kind)
    total, name = (saved.optim.steps, "steps") if kind == "generation" \
        else (saved.animation.frames, "frames")
    if total <= done:
        raise ValueError(f"--resume: {path.parent if kind == 'animation' else path} has {done} "
                         f"{name} already; ask for more (--{name} N, N > {done})")
    return path, saved, header, data


def length_done(header: dict, kind: str) -> int:
    """How far a state file's run got: its steps (a generation) or frames (an animation)."""
    return header["step"] if kind == "generation" else len(header["records"])


def _leaves(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


@dataclass
class LoopState:
    """The loop between two steps, all it needs to go on as if never stopped: ``step`` steps
    done, the latents ``z`` and their start ``z_init`` ``(K, D, h, w)``, the optimizer's state
    for ``z`` and each random stream's state."""

    step: int
    z: torch.Tensor
    z_init: torch.Tensor
    optim: dict[str, Any]
    streams: dict[str, torch.Tensor]

    @classmethod
    def take(cls, step: int, z: torch.Tensor, z_init: torch.Tensor, opt: torch.optim.Optimizer,
             streams) -> "LoopState":
        """A copy of the state now (nothing in it waits for the device)."""
        optim = {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state.get(z, {}).items()}
        states = {f"cpu.{k}": g.get_state() for k, g in enumerate(streams.cpu)}
        if streams.device is not streams.cpu:
            states.update({f"device.{k}": g.get_state() for k, g in enumerate(streams.device)})
        return cls(step, z.detach().clone(), z_init, optim, states)

    def restore(self, z: torch.Tensor, opt: torch.optim.Optimizer, streams) -> None:
        """Put this state into the loop's latents, optimizer and streams."""
        with torch.no_grad():
            z.copy_(self.z)
        optim = {k: v.clone() if torch.is_tensor(v) else v for k, v in self.optim.items()}
        opt.load_state_dict({"state": {0: optim} if optim else {},
                             "param_groups": opt.state_dict()["param_groups"]})
        for name, state in self.streams.items():
            kind, k = name.split(".")
            getattr(streams, kind)[int(k)].set_state(state)

    def save(self, path: str | Path, cfg: DictConfig, losses: list[torch.Tensor],
             factor: int) -> Path:
        """Write this state and the losses of its steps ``(step, K)`` to a state file (with the
        VQGAN's ``factor``, which a resumed run's size is checked with before it loads)."""
        tensors = {"z": self.z, "z_init": self.z_init,
                   "losses": torch.stack(losses[:self.step]) if self.step else
                   torch.empty(0, self.z.shape[0]),
                   **{f"optim.{k}": v for k, v in self.optim.items() if torch.is_tensor(v)},
                   **{f"stream.{k}": v for k, v in self.streams.items()}}
        scalars = {k: v for k, v in self.optim.items() if not torch.is_tensor(v)}
        return save_state(path, "generation", tensors, cfg, step=self.step, optim=scalars,
                          device=self.z.device.type, factor=factor)

    @classmethod
    def load(cls, header: dict, tensors: dict[str, torch.Tensor], device: torch.device
             ) -> tuple["LoopState", list[torch.Tensor]]:
        """The state and losses :meth:`save` wrote (``read_state``'s header and tensors), on
        ``device``. A state saved on another kind of device keeps its CPU streams only, so the
        cutouts' noise there differs from the run that was stopped."""
        streams = {k[7:]: v for k, v in tensors.items() if k.startswith("stream.")}
        if header["device"] != device.type:
            log.warning("this run was stopped on %s: on %s its cutouts' noise differs from the "
                        "run's own", header["device"], device.type)
            streams = {k: v for k, v in streams.items() if k.startswith("cpu.")}
        optim = {**header["optim"], **{k[6:]: v for k, v in tensors.items() if k.startswith("optim.")}}
        losses = list(tensors["losses"].to(device))
        return cls(header["step"], tensors["z"].to(device), tensors["z_init"].to(device), optim,
                   streams), losses
