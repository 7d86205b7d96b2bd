"""The registry, the cache, and downloads against a real HTTP server on 127.0.0.1."""

import hashlib
import socket

import pytest

from vqclip import pretrained
from vqclip.pretrained import (
    ChecksumError,
    DownloadError,
    RemoteFile,
    download,
    download_file,
    get_cache_dir,
    list_models,
    resolve,
)

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, several read chunks
SHA = hashlib.sha256(PAYLOAD).hexdigest()


def test_registry_is_complete_data():
    for name, entry in pretrained.VQGAN_MODELS.items():
        assert set(entry["files"]) == {"config", "ckpt"}, name
    for name, entry in pretrained.CLIP_MODELS.items():
        # a custom architecture ships its open_clip config beside the weights
        files = {"weights", "config"} if entry.get("bundled") else {"weights"}
        assert name == f"{entry['arch']}/{entry['pretrained']}" and set(entry["files"]) == files
    for entry in [*pretrained.VQGAN_MODELS.values(), *pretrained.CLIP_MODELS.values()]:
        assert entry["license"] and entry["description"]
        for f in entry["files"].values():
            if entry.get("bundled"):  # in checkpoints/, never fetched: checksum and size known
                assert f.url == "" and len(f.sha256) == 64 and f.size > 0
            else:
                assert f.url.startswith(("https://", "http://")) and f.filename
                assert f.sha256 is None or len(f.sha256) == 64
    assert {"imagenet_f16_1024", "imagenet_f16_16384", "gumbel_f8_8192", "wikiart_16384"} <= set(
        pretrained.VQGAN_MODELS)


def test_cache_dir_order(tmp_path, monkeypatch):
    monkeypatch.setenv("VQCLIP_CACHE", str(tmp_path / "env"))
    assert get_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert get_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("VQCLIP_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert get_cache_dir() == tmp_path / "home" / ".cache" / "vqclip"


def test_download_then_cache_hit_makes_no_request(server, tmp_path):
    server.files["/w.bin"] = PAYLOAD
    remote = RemoteFile(server.url + "/w.bin", "w.bin", SHA, len(PAYLOAD))
    dest = download_file(remote, tmp_path / "w.bin", progress=False)
    assert dest.read_bytes() == PAYLOAD and len(server.requests) == 1
    download_file(remote, tmp_path / "w.bin", progress=False)
    assert len(server.requests) == 1


def test_checksum_mismatch_leaves_nothing_and_says_both_hashes(server, tmp_path):
    server.files["/w.bin"] = PAYLOAD[:-1] + b"x"
    remote = RemoteFile(server.url + "/w.bin", "w.bin", SHA, None)
    with pytest.raises(ChecksumError, match=f"expected {SHA}, got [0-9a-f]{{64}}") as info:
        download_file(remote, tmp_path / "w.bin", progress=False)
    assert str(tmp_path / "w.bin") in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no final file, no partial file to resume from


def test_interrupted_download_resumes_with_range(server, tmp_path):
    server.files["/w.bin"] = PAYLOAD
    server.cut_once["/w.bin"] = 300_000
    remote = RemoteFile(server.url + "/w.bin", "w.bin", SHA, len(PAYLOAD))
    with pytest.raises(DownloadError, match="resume"):
        download_file(remote, tmp_path / "w.bin", progress=False)
    assert not (tmp_path / "w.bin").exists()
    assert (tmp_path / "w.bin.part").stat().st_size == 300_000

    download_file(remote, tmp_path / "w.bin", progress=False)
    assert server.requests[-1] == ("/w.bin", "bytes=300000-")
    assert (tmp_path / "w.bin").read_bytes() == PAYLOAD and not (tmp_path / "w.bin.part").exists()


def test_server_without_range_support_restarts_cleanly(server, tmp_path):
    server.files["/w.bin"] = PAYLOAD
    (tmp_path / "w.bin.part").write_bytes(b"stale bytes from elsewhere")
    handler_get = server.httpd.RequestHandlerClass.do_GET

    def ignore_range(self):
        del self.headers["Range"]
        handler_get(self)

    server.httpd.RequestHandlerClass.do_GET = ignore_range
    download_file(RemoteFile(server.url + "/w.bin", "w.bin", SHA), tmp_path / "w.bin", progress=False)
    assert (tmp_path / "w.bin").read_bytes() == PAYLOAD


def _unused_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _register(monkeypatch, base_url, name="test-vqgan", sha=SHA):
    entry = {"description": "test", "license": "test", "files": {
        "config": RemoteFile(f"{base_url}/model.yaml", "model.yaml"),
        "ckpt": RemoteFile(f"{base_url}/last.ckpt", "last.ckpt", sha, len(PAYLOAD))}}
    monkeypatch.setitem(pretrained.VQGAN_MODELS, name, entry)
    return name


def test_unreachable_server_says_what_to_download_and_where(monkeypatch, isolated_cache):
    url = f"http://127.0.0.1:{_unused_port()}"
    name = _register(monkeypatch, url)
    with pytest.raises(DownloadError) as info:
        download(name, progress=False)
    message = str(info.value)
    assert f"vqclip download {name}" in message and f"{url}/model.yaml" in message
    assert str(isolated_cache / name) in message


def test_download_by_name_and_resolve(server, monkeypatch, isolated_cache):
    server.files.update({"/model.yaml": b"model: {}\n", "/last.ckpt": PAYLOAD})
    name = _register(monkeypatch, server.url)
    with pytest.raises(DownloadError, match="not downloaded"):
        resolve(name, allow_download=False)
    assert next(r for r in list_models() if r["name"] == name)["path"] is None

    paths = download(name, progress=False)
    assert paths["ckpt"] == isolated_cache / name / "last.ckpt"
    assert resolve(name, allow_download=False) == paths
    assert next(r for r in list_models() if r["name"] == name)["path"] == str(isolated_cache / name)


def test_offline_mode_never_connects(server, monkeypatch):
    server.files.update({"/model.yaml": b"x", "/last.ckpt": PAYLOAD})
    name = _register(monkeypatch, server.url)
    monkeypatch.setenv("VQCLIP_OFFLINE", "1")
    with pytest.raises(DownloadError, match="VQCLIP_OFFLINE=1.*vqclip download"):
        download(name, progress=False)
    assert server.requests == []


def test_project_checkpoints_folder_is_searched(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "PROJECT_CHECKPOINTS", tmp_path / "checkpoints")
    name = _register(monkeypatch, "http://127.0.0.1:9")
    folder = tmp_path / "checkpoints" / name
    folder.mkdir(parents=True)
    (folder / "model.yaml").write_text("x")
    (folder / "last.ckpt").write_bytes(PAYLOAD)
    assert resolve(name, allow_download=False)["ckpt"] == folder / "last.ckpt"


def test_unknown_name_lists_the_registry():
    with pytest.raises(ValueError, match="unknown model 'nope'.*imagenet_f16_16384.*ViT-B-32/openai"):
        download("nope")


def test_a_wrong_sized_file_in_place_is_fetched_again(server, tmp_path):
    server.files["/w.bin"] = PAYLOAD
    (tmp_path / "w.bin").write_bytes(b"<html>Link does not exist.</html>")  # what some hosts serve
    remote = RemoteFile(server.url + "/w.bin", "w.bin", SHA, len(PAYLOAD))
    assert download_file(remote, tmp_path / "w.bin", progress=False).read_bytes() == PAYLOAD


def test_a_complete_partial_file_is_finished_on_416(server, tmp_path):
    server.files["/w.bin"] = PAYLOAD
    (tmp_path / "w.bin.part").write_bytes(PAYLOAD)  # interrupted just before the rename
    remote = RemoteFile(server.url + "/w.bin", "w.bin", SHA, len(PAYLOAD))
    assert download_file(remote, tmp_path / "w.bin", progress=False).read_bytes() == PAYLOAD
    assert server.requests == [("/w.bin", f"bytes={len(PAYLOAD)}-")]


def test_force_discards_file_and_partial_file(server, monkeypatch, isolated_cache):
    server.files.update({"/model.yaml": b"model: {}\n", "/last.ckpt": PAYLOAD})
    name = _register(monkeypatch, server.url)
    folder = isolated_cache / name
    folder.mkdir(parents=True)
    (folder / "model.yaml").write_bytes(b"old")
    (folder / "last.ckpt.part").write_bytes(b"garbage that must not be resumed")
    download(name, progress=False, force=True)
    assert (folder / "model.yaml").read_bytes() == b"model: {}\n"
    assert (folder / "last.ckpt").read_bytes() == PAYLOAD
    assert all(rng is None for _, rng in server.requests)


def test_offline_mode_uses_files_in_the_checkpoints_folder(server, tmp_path, monkeypatch):
    server.files.update({"/model.yaml": b"x", "/last.ckpt": PAYLOAD})
    monkeypatch.setattr(pretrained, "PROJECT_CHECKPOINTS", tmp_path / "checkpoints")
    name = _register(monkeypatch, server.url)
    folder = tmp_path / "checkpoints" / name
    folder.mkdir(parents=True)
    (folder / "model.yaml").write_text("x")
    (folder / "last.ckpt").write_bytes(PAYLOAD)
    monkeypatch.setenv("VQCLIP_OFFLINE", "1")
    assert download(name, progress=False)["ckpt"] == folder / "last.ckpt"
    assert server.requests == []
