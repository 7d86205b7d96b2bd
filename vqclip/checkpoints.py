"""Safe reading of PyTorch checkpoints (.ckpt/.pt/.pth/.bin) and safetensors files.

A ``.ckpt`` from the internet is a pickle, and unpickling can run any code the file names.
The official taming-transformers ``last.ckpt`` files also pickle PyTorch Lightning objects
(callback state, hyper-parameters), which ``torch.load(weights_only=True)`` refuses, and falling
back to ``weights_only=False`` would run whatever the file says.

So :func:`read_checkpoint` reads the zip archive that ``torch.save`` writes by itself: the pickle
is unpickled by :class:`_RestrictedUnpickler`, whose ``find_class`` hands out only the few pure
functions needed to rebuild tensors. Every other global (a Lightning callback class, ``os.system``,
``builtins.eval`` ...) becomes an :class:`Inert` placeholder that records its arguments and does
nothing. ``find_class`` is the only door through which a pickle reaches code (GLOBAL, STACK_GLOBAL,
INST, OBJ and the EXT opcodes all go through it), so nothing from the file can execute.
"""

from __future__ import annotations

import collections
import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "Inert", "load_strict", "read_checkpoint", "read_state_dict",
           "save_safetensors"]

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A weights file that cannot be read: corrupt, truncated, or not in a supported format."""


class Inert:
    """Stands in for any object whose class the checkpoint names but we refuse to import.

    It accepts whatever the pickle feeds it (constructor arguments, state, items) and keeps it
    for inspection, but never calls into the named class.
    """

    _origin = "?"

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.state, obj.items = args, None, []
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):  # SETITEM(S) on dict subclasses
        self.items.append((key, value))

    def append(self, value):  # APPEND(S) on list subclasses
        self.items.append(value)

    def extend(self, values):
        self.items.extend(values)

    def __repr__(self) -> str:
        return f"<inert {self._origin}>"


def _inert_class(module: str, name: str) -> type:
    return type(name, (Inert,), {"_origin": f"{module}.{name}", "__module__": "vqclip.checkpoints"})


# Storage classes name the dtype of a tensor's storage in the pickle ('torch', 'FloatStorage').
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return storage.as_strided(size, stride, storage_offset)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data  # a Parameter is only a tensor to us


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    # Protocol-2 pickles spell sets and bytes as calls to these pure builtins.
    ("builtins", "set"): set, ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset, ("__builtin__", "frozenset"): frozenset,
    ("_codecs", "encode"): lambda text, encoding="latin1": text.encode(encoding),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(file)
        self._archive, self._prefix, self._byteorder = archive, prefix, byteorder
        self._storages: dict[str, torch.Tensor] = {}
        self.refused: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        self.refused.add(f"{module}.{name}")
        return _inert_class(module, name)

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel): the bytes live in <prefix>data/<key>.
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unknown storage type {storage_type!r}")
        if key not in self._storages:
            dtype = storage_type.dtype
            raw = bytearray(self._archive.read(f"{self._prefix}data/{key}"))
            flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            if self._byteorder != "little" and dtype.itemsize > 1:  # written on a big-endian machine
                swapped = flat.view(torch.uint8).view(-1, dtype.itemsize).flip(1).contiguous()
                flat = swapped.view(dtype).flatten()
            self._storages[key] = flat
        return self._storages[key]


def read_checkpoint(path: str | Path) -> Any:
    """Read a torch-saved checkpoint without running any code from it.

    Args:
        path: a file written by ``torch.save`` (zip format, the default since torch 1.6), such as
            a taming ``last.ckpt`` or an open_clip ``.bin``.
    Returns:
        The unpickled object. Tensors are real tensors; objects of any class outside the
        allow-list are :class:`Inert` placeholders.
    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: truncated, corrupt, or not a torch checkpoint; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):
        return _read_legacy(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pkl = next((n for n in names if n.endswith("data.pkl") and n.count("/") == 1), None)
            if pkl is None:
                raise CheckpointError(f"{path}: a zip file, but not a torch checkpoint (no data.pkl)")
            prefix = pkl[: -len("data.pkl")]
            if any(n.startswith(f"{prefix}code/") for n in names):
                raise CheckpointError(f"{path}: a TorchScript archive, which vqclip does not read; "
                                      "use the weights as .safetensors or a plain state dict")
            byteorder = "little"
            if f"{prefix}byteorder" in names:
                byteorder = archive.read(f"{prefix}byteorder").decode().strip()
            with archive.open(pkl) as f:
                unpickler = _RestrictedUnpickler(f, archive, prefix, byteorder)
                obj = unpickler.load()
    except zipfile.BadZipFile as e:
        raise CheckpointError(
            f"{path}: truncated or corrupt checkpoint ({e}); delete it and download it again"
        ) from None
    except CheckpointError:
        raise
    except Exception as e:  # a damaged pickle can fail in many ways; all mean the same to the user
        raise CheckpointError(f"{path}: corrupt checkpoint ({type(e).__name__}: {e})") from None
    if unpickler.refused:
        log.debug("%s: left %d classes inert: %s", path, len(unpickler.refused),
                  ", ".join(sorted(unpickler.refused)))
    return obj


def _read_legacy(path: Path) -> Any:
    # Files from torch < 1.6 (or _use_new_zipfile_serialization=False) are not zip archives.
    # torch's own weights_only unpickler is safe for them; it refuses non-tensor objects.
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:1] != b"\x80":
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint (not a torch file); "
                              "delete it and download it again")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable legacy-format checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0]})") from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read only the weights of a checkpoint or safetensors file.

    A ``{"state_dict": {...}}`` wrapper (Lightning, open_clip training) is unwrapped; a flat
    mapping of tensors is returned as it is.

    Raises:
        CheckpointError: the file holds no state dict, or one of its values is not a tensor.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path)[0]
    obj = read_checkpoint(path)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"{path}: no state_dict in this checkpoint (found {type(obj).__name__})")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{path}: state_dict entries that are not tensors: {', '.join(map(str, bad[:5]))}"
        )
    return dict(sd)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FileNotFoundError(f"weights not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({e})") from None


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata stored in a safetensors header."""
    return _read_safetensors(Path(path))[1]


def save_safetensors(state_dict: dict[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, str] | None = None) -> Path:
    """Write tensors to ``path`` atomically (temp file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # clone: tensors read from a pickle may share storage, which safetensors refuses
    tensors = {k: v.detach().clone().contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def load_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str | Path,
                what: str = "this model", assign: bool = False) -> None:
    """``model.load_state_dict(strict=True)`` with an error that names the mismatched keys.

    ``assign=True`` adopts the given tensors instead of copying into the model's own, which lets
    a model built on the meta device skip allocating and initializing weights it would discard.

    Raises:
        CheckpointError: keys missing or unexpected, or a tensor of the wrong shape.
    """
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - state_dict.keys()), sorted(state_dict.keys() - expected)
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:8])}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}")
    if problems:
        raise CheckpointError(f"{source}: weights do not fit {what}; " + "; ".join(problems))
    try:
        model.load_state_dict(state_dict, strict=True, assign=assign)
    except RuntimeError as e:  # shape mismatches; torch lists them one per line
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise CheckpointError(f"{source}: weights do not fit {what}; {detail}") from None
