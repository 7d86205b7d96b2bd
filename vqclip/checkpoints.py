"""Safe reading of PyTorch checkpoints (.ckpt/.pt/.pth/.bin) and safetensors files.

A ``.ckpt`` from the internet is a pickle, and unpickling can run any code the file names.
The official taming-transformers ``last.ckpt`` files also pickle PyTorch Lightning objects
(callback state, hyper-parameters), which ``torch.load(weights_only=True)`` refuses, and falling
back to ``weights_only=False`` would run whatever the file says.

So :func:`read_checkpoint` reads the zip archive that ``torch.save`` writes by itself:

- ``find_class`` is the only door through which a pickle reaches code (GLOBAL, STACK_GLOBAL,
  INST, OBJ and the EXT opcodes all go through it). It hands out a few sealed callables that only
  record what they were given, and turns every other global (a Lightning callback class,
  ``os.system``, ``builtins.eval`` ...) into an :class:`Inert` placeholder that does nothing.
- Nothing mutable of ours is ever on the pickle's stack: storages and tensors are immutable
  tuple records while unpickling, so opcodes that call methods on stack objects (BUILD, SETITEM,
  ADDITEMS, APPENDS) cannot reach tensor methods or our functions' attributes. Tensors are
  built from the records afterwards, with their bounds checked against the bytes in the file.
- The pure-Python unpickler keeps its memo in a dict (the C one allocates an array as large as
  the largest memo index the file names), and compressed archive members are refused (torch
  never writes them; a zip bomb would).
"""

from __future__ import annotations

import logging
import math
import pickle
import zipfile
from collections import OrderedDict
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
    return type(name, (Inert,), {"_origin": f"{module}.{name}", "__module__": __name__})


# Immutable records that stand for storages and tensors while the pickle is read.
class _StorageRef(tuple):
    __slots__ = ()  # (key, dtype name)


class _TensorRef(tuple):
    __slots__ = ()  # (storage ref, offset, size, stride)


class _StorageName(str):
    __slots__ = ()  # "FloatStorage" ..., as find_class hands it to persistent_load


_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}


def _ints(values, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or not all(type(v) is int and v >= 0 for v in values):
        raise pickle.UnpicklingError(f"bad tensor {what} {values!r}")
    return tuple(values)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *unused):
    if not isinstance(storage, _StorageRef) or type(storage_offset) is not int or storage_offset < 0:
        raise pickle.UnpicklingError("bad tensor record")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise pickle.UnpicklingError("bad tensor record: size and stride differ in length")
    return _TensorRef((storage, storage_offset, size, stride))


def _rebuild_parameter(data, *unused):
    return data  # a Parameter is only a tensor to us


def _encode_latin1(text, encoding="latin1"):
    # protocol-2 pickles spell bytes as _codecs.encode(text, "latin1"); no other codec is needed
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is allowed for latin1 text only")
    return text.encode("latin1")


def _sealed(fn):
    """``fn`` behind an instance with no attributes, so BUILD cannot alter it (``__defaults__``)."""
    return type(f"_sealed_{fn.__name__}", (), {"__slots__": (), "__call__": staticmethod(fn)})()


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _sealed(_rebuild_tensor_v2),
    ("torch._utils", "_rebuild_parameter"): _sealed(_rebuild_parameter),
    ("torch._utils", "_rebuild_parameter_with_state"): _sealed(_rebuild_parameter),
    ("collections", "OrderedDict"): OrderedDict,  # built-in types refuse new attributes
    ("builtins", "set"): set, ("__builtin__", "set"): set,
    ("builtins", "frozenset"): frozenset, ("__builtin__", "frozenset"): frozenset,
    ("_codecs", "encode"): _sealed(_encode_latin1),
}


_MAX_TUPLE_DEPTH = 100  # checkpoints nest a few levels; hashing a million crashes CPython


def _depth_checked(load):
    # Hashing a tuple recurses in C without a limit, so a dict key nested a million tuples deep
    # would crash the process; track each tuple's depth as it is built and refuse deep ones.
    def load_tuple(self):
        load(self)
        t = self.stack[-1]
        depth = 1 + max((self.depths.get(id(x), 1) for x in t if type(x) is tuple), default=0)
        if depth > _MAX_TUPLE_DEPTH:
            raise pickle.UnpicklingError(f"tuples nested more than {_MAX_TUPLE_DEPTH} deep")
        self.depths[id(t)] = depth
    return load_tuple


class _RestrictedUnpickler(pickle._Unpickler):  # the pure-Python one: its memo is a dict
    dispatch = dict(pickle._Unpickler.dispatch)
    for _op in (pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3):
        dispatch[_op[0]] = _depth_checked(pickle._Unpickler.dispatch[_op[0]])
    del _op

    def __init__(self, file):
        super().__init__(file)
        self.refused: set[str] = set()
        self.depths: dict[int, int] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageName(name)
        self.refused.add(f"{module}.{name}")
        return _inert_class(module, name)

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel): the bytes live in <prefix>data/<key>
        if not (type(pid) is tuple and len(pid) >= 3 and pid[0] == "storage"
                and isinstance(pid[1], _StorageName) and isinstance(pid[2], (str, int))):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        return _StorageRef((str(pid[2]), str(pid[1])))


class _Materializer:
    """Turns the records left by unpickling into tensors, reading each storage once."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str):
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, torch.Tensor] = {}
        self.done: dict[int, Any] = {}

    def storage(self, ref: _StorageRef) -> torch.Tensor:
        key, kind = ref
        if key not in self.storages:
            info = self.archive.getinfo(f"{self.prefix}data/{key}")
            if info.compress_type != zipfile.ZIP_STORED:
                raise CheckpointError("compressed tensor data; torch.save never writes that")
            dtype = _STORAGE_DTYPES[kind]
            raw = bytearray(self.archive.read(info))
            if len(raw) % dtype.itemsize:
                raise CheckpointError(f"tensor data {key} is not a whole number of {kind} items")
            self.storages[key] = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        flat = self.storages[key]
        if flat.dtype != _STORAGE_DTYPES[kind]:
            raise CheckpointError(f"tensor data {key} is named with two dtypes")
        return flat

    def tensor(self, ref: _TensorRef) -> torch.Tensor:
        storage, offset, size, stride = ref
        flat = self.storage(storage)
        numel = math.prod(size)
        # a tensor never holds more elements than its storage unless it overlaps itself
        # (an expand()), which no saved weight does and which would let a small file ask for
        # any amount of memory once the tensor is copied
        end = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) + 1 if numel else offset
        if numel > flat.numel() or end > flat.numel():
            raise CheckpointError(f"a tensor of size {list(size)} does not fit its storage")
        return flat.as_strided(size, stride, offset)

    def __call__(self, obj: Any) -> Any:
        if isinstance(obj, _TensorRef):
            return self.tensor(obj)
        if isinstance(obj, (str, bytes, int, float, bool, type(None), _StorageRef)):
            return obj
        if id(obj) in self.done:  # shared or cyclic structure
            return self.done[id(obj)]
        if isinstance(obj, dict):
            out = self.done[id(obj)] = type(obj)() if type(obj) in (dict, OrderedDict) else {}
            out.update((self(k), self(v)) for k, v in obj.items())
            return out
        if isinstance(obj, list):
            out = self.done[id(obj)] = []
            out.extend(self(v) for v in obj)
            return out
        if isinstance(obj, (tuple, set, frozenset)):
            out = self.done[id(obj)] = type(obj)(self(v) for v in obj)
            return out
        if isinstance(obj, Inert):
            self.done[id(obj)] = obj
            obj.args, obj.state, obj.items = self(obj.args), self(obj.state), self(obj.items)
        return obj


def read_checkpoint(path: str | Path, select: str | None = None) -> Any:
    """Read a torch-saved checkpoint without running any code from it.

    Args:
        path: a file written by ``torch.save`` (zip format, the default since torch 1.6), such as
            a taming ``last.ckpt`` or an open_clip ``.bin``.
        select: if the top level is a dict holding this key, build the tensors of that entry
            only (e.g. ``"state_dict"``, leaving optimizer state unread) and return it.
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
        obj = _read_legacy(path)
        return obj[select] if select is not None and isinstance(obj, dict) and select in obj else obj
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pkl = next((n for n in names if n.endswith("data.pkl") and n.count("/") == 1), None)
            if pkl is None:
                raise CheckpointError("a zip file, but not a torch checkpoint (no data.pkl)")
            prefix = pkl[: -len("data.pkl")]
            if any(n.startswith(f"{prefix}code/") for n in names):
                raise CheckpointError("a TorchScript archive, which vqclip does not read; "
                                      "use the weights as .safetensors or a plain state dict")
            if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder") != b"little":
                raise CheckpointError("written on a big-endian machine, which vqclip does not read")
            if archive.getinfo(pkl).compress_type != zipfile.ZIP_STORED:
                raise CheckpointError("compressed data.pkl; torch.save never writes that")
            with archive.open(pkl) as f:
                unpickler = _RestrictedUnpickler(f)
                obj = unpickler.load()
            if select is not None and isinstance(obj, dict) and select in obj:
                obj = obj[select]
            obj = _Materializer(archive, prefix)(obj)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({e}); delete it and "
                              "download it again") from None
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
        raise CheckpointError(
            f"{path}: an old-format (torch < 1.6) checkpoint that holds more than tensors "
            f"({type(e).__name__}); vqclip reads only the zip format for such files. Re-save its "
            "state dict with a current torch in a trusted environment, or use .safetensors"
        ) from None


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
    sd = read_checkpoint(path, select="state_dict")
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"{path}: no state_dict in this checkpoint (found {type(sd).__name__})")
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{path}: state_dict entries that are not tensors: {', '.join(map(str, bad[:5]))}"
        )
    return dict(sd)


def _read_safetensors(path: Path, tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise FileNotFoundError(f"weights not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            weights = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
            return weights, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({e})") from None


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata stored in a safetensors header; the tensors are not read."""
    return _read_safetensors(Path(path), tensors=False)[1]


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
