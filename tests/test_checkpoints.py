"""Safe checkpoint reading: tensors come back, code in the pickle never runs."""

import os
import pickle
import zipfile

import pytest
import torch
from conftest import lightning_checkpoint, save_lightning

from vqclip.checkpoints import (
    _ALLOWED,
    CheckpointError,
    Inert,
    read_checkpoint,
    read_state_dict,
    save_safetensors,
)


class CreatesFile:
    """Unpickling this calls ``open(path, "w")``, which creates the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class RunsShell:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_tensors_round_trip_with_views_dtypes_and_parameters(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {"w": base, "view": base[1:, ::2], "half": torch.randn(5).half(),
          "bf16": torch.randn(6, dtype=torch.bfloat16)[2:], "mask": torch.tensor([True, False]),
          "idx": torch.arange(3), "param": torch.nn.Parameter(torch.ones(2, 2))}
    torch.save({"state_dict": sd, "tags": {"a", "b"}, "raw": b"\x00\x01"}, tmp_path / "m.ckpt")
    obj = read_checkpoint(tmp_path / "m.ckpt")
    for key, value in sd.items():
        assert obj["state_dict"][key].dtype == value.dtype
        assert torch.equal(obj["state_dict"][key], value.detach()), key
    assert obj["tags"] == {"a", "b"} and obj["raw"] == b"\x00\x01"


@pytest.mark.parametrize("payload_cls", [CreatesFile, RunsShell])
def test_payload_outside_state_dict_never_runs(tmp_path, payload_cls):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "extra": payload_cls(marker)}, ckpt)

    sd = read_state_dict(ckpt)
    assert torch.equal(sd["w"], torch.ones(3))
    assert not marker.exists()
    assert isinstance(read_checkpoint(ckpt)["extra"], Inert)
    assert not marker.exists()

    # The payload is live: torch's unrestricted loader does run it.
    torch.load(ckpt, weights_only=False)
    assert marker.exists()


def test_payload_inside_state_dict_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3), "bad": CreatesFile(marker)}}, ckpt)
    with pytest.raises(CheckpointError, match="bad"):
        read_state_dict(ckpt)
    assert not marker.exists()


def test_lightning_objects_load_but_weights_only_refuses(tmp_path):
    ckpt = save_lightning(lightning_checkpoint({"enc.w": torch.randn(4, 4)}, extra_loss_keys=False),
                          tmp_path / "last.ckpt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt, weights_only=True)
    obj = read_checkpoint(ckpt)
    assert obj["global_step"] == 1000
    callback_class = next(iter(obj["callbacks"]))
    assert issubclass(callback_class, Inert) and "ModelCheckpoint" in repr(obj["callbacks"]["cb"])
    assert set(read_state_dict(ckpt)) == {"enc.w"}


def test_truncated_checkpoint_names_the_file(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.randn(1000)}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="last.ckpt.*truncated or corrupt"):
        read_state_dict(ckpt)


def test_corrupt_tensor_data_names_the_file(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, ckpt)
    data = bytearray(ckpt.read_bytes())
    at = data.find(bytes(4000))  # the tensor's bytes: stored uncompressed, guarded by a CRC
    data[at + 100] = 7
    ckpt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="last.ckpt"):
        read_state_dict(ckpt)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04garbage"])
def test_garbage_is_a_clear_error(tmp_path, content):
    path = tmp_path / "x.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="x.ckpt"):
        read_state_dict(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        read_state_dict(tmp_path / "nope.ckpt")


def test_legacy_format_reads_through_torchs_safe_loader(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"state_dict": {"w": torch.arange(3.0)}}, path, _use_new_zipfile_serialization=False)
    assert torch.equal(read_state_dict(path)["w"], torch.arange(3.0))


def test_torchscript_archive_is_refused_clearly(tmp_path):
    path = tmp_path / "jit.pt"
    torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2)), path)
    with pytest.raises(CheckpointError, match="TorchScript"):
        read_state_dict(path)


def test_safetensors_round_trip_shared_storage_and_corruption(tmp_path):
    base = torch.randn(4, 4)
    path = save_safetensors({"a": base, "b": base[0]}, tmp_path / "w.safetensors", {"k": "v"})
    sd = read_state_dict(path)
    assert torch.equal(sd["a"], base) and torch.equal(sd["b"], base[0])
    assert not list(tmp_path.glob("*.tmp"))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="w.safetensors"):
        read_state_dict(path)


def test_storage_of_an_unknown_type_is_refused(tmp_path):
    path = tmp_path / "m.ckpt"
    torch.save({"w": torch.ones(2)}, path)
    with zipfile.ZipFile(path) as z:  # rewrite through zipfile: the CRC covers data.pkl
        members = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    members[pkl] = members[pkl].replace(b"FloatStorage", b"EvilxStorage")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, content in members.items():
            z.writestr(name, content)
    with pytest.raises(CheckpointError, match="m.ckpt.*unsupported persistent id"):
        read_checkpoint(path)


# Hand-written pickles: what a malicious file could contain, beyond what torch.save writes.
P = pickle


def _glob(module, name):
    return P.GLOBAL + f"{module}\n{name}\n".encode()


def _str(text):
    return P.SHORT_BINUNICODE + bytes([len(text)]) + text.encode()


def _int_tuple(*values):
    return P.MARK + b"".join(P.BININT + v.to_bytes(4, "little") for v in values) + P.TUPLE


def _tensor(size, stride, key="0"):
    """Opcodes that rebuild a float tensor over storage <key>, as torch.save writes them."""
    storage = (P.MARK + _str("storage") + _glob("torch", "FloatStorage") + _str(key) + _str("cpu")
               + P.BININT1 + b"\x04" + P.TUPLE + P.BINPERSID)
    return (_glob("torch._utils", "_rebuild_tensor_v2") + P.MARK + storage + P.BININT1 + b"\x00"
            + _int_tuple(*size) + _int_tuple(*stride) + P.NEWFALSE
            + _glob("collections", "OrderedDict") + P.EMPTY_TUPLE + P.REDUCE + P.TUPLE + P.REDUCE)


def _archive(path, body, data=b"\x00" * 16, compress=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", P.PROTO + b"\x04" + body + P.STOP)
        z.writestr("archive/byteorder", "little")
        z.writestr(zipfile.ZipInfo("archive/data/0"), data, compress_type=compress)
    return path


def test_hand_written_tensor_record_reads(tmp_path):
    path = _archive(tmp_path / "ok.ckpt", _tensor((2, 2), (2, 1)), data=torch.arange(4.0).numpy().tobytes())
    assert torch.equal(read_checkpoint(path), torch.arange(4.0).reshape(2, 2))


@pytest.mark.parametrize("body, reason", [
    # ADDITEMS calls obj.add(item): on a real tensor that is tensor.add, which allocates
    (_tensor((4,), (1,)) + P.MARK + P.BININT1 + b"\x01" + P.ADDITEMS, "has no attribute 'add'"),
    # SETITEM would call tensor.__setitem__; BUILD would call Tensor.__setstate__
    (_tensor((4,), (1,)) + P.BININT1 + b"\x00" + P.BININT1 + b"\x01" + P.SETITEM, "item assignment"),
    (_tensor((4,), (1,)) + P.EMPTY_DICT + _str("x") + P.NONE + P.SETITEM + P.BUILD, "__dict__"),
    # BUILD with slot state would setattr on our own functions, e.g. their __defaults__
    (_glob("_codecs", "encode") + P.NONE + P.EMPTY_DICT + _str("__defaults__") + _str("punycode")
     + P.TUPLE1 + P.SETITEM + P.TUPLE2 + P.BUILD, "no attribute '__defaults__'"),
    # codecs other than latin1 can cost quadratic time (punycode) or worse
    (_glob("_codecs", "encode") + _str("abc") + _str("punycode") + P.TUPLE2 + P.REDUCE, "latin1"),
    # a stride-0 view of one element claiming 2**29: 2 GiB once copied, from a tiny file
    (_tensor((2 ** 29,), (0,)), "does not fit its storage"),
    (_tensor((5,), (1,)), "does not fit its storage"),
    # hashing a dict key of tuples nested a million deep would crash CPython itself
    (P.EMPTY_DICT + P.EMPTY_TUPLE + P.TUPLE1 * 1_000_000 + P.NONE + P.SETITEM, "nested more than 100"),
])
def test_hostile_pickles_are_refused(tmp_path, body, reason):
    with pytest.raises(CheckpointError, match=reason):
        read_checkpoint(_archive(tmp_path / "evil.ckpt", body))
    assert _ALLOWED[("_codecs", "encode")]("x") == b"x"  # our callables are unchanged


def test_compressed_members_are_refused(tmp_path):
    path = _archive(tmp_path / "bomb.ckpt", _tensor((4,), (1,)), compress=zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError, match="bomb.ckpt: compressed"):
        read_checkpoint(path)


def test_only_the_state_dict_tensors_are_built(tmp_path):
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "optimizer_states": [torch.zeros(1000)]}, path)
    with zipfile.ZipFile(path) as z:
        stored = [n for n in z.namelist() if "/data/" in n]
    assert len(stored) == 2
    import vqclip.checkpoints as ckpt_module

    reads = []
    real = ckpt_module._Materializer.storage
    monkey = pytest.MonkeyPatch()
    monkey.setattr(ckpt_module._Materializer, "storage", lambda self, ref: reads.append(ref) or real(self, ref))
    try:
        assert set(read_state_dict(path)) == {"w"}
    finally:
        monkey.undo()
    assert len(reads) == 1


def test_big_endian_archives_are_refused_clearly(tmp_path):
    path = _archive(tmp_path / "be.ckpt", _tensor((4,), (1,)))
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members["archive/byteorder"] = b"big"
    with zipfile.ZipFile(path, "w") as z:
        for name, content in members.items():
            z.writestr(name, content)
    with pytest.raises(CheckpointError, match="be.ckpt: written on a big-endian machine"):
        read_checkpoint(path)
