"""The `vqclip` command: registry listing, downloads, and one-line errors with exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vqclip import pretrained
from vqclip.cli import main
from vqclip.pretrained import RemoteFile


def test_models_lists_every_registry_entry(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in [*pretrained.VQGAN_MODELS, *pretrained.CLIP_MODELS]:
        assert name in out
    assert "not downloaded" in out and "934.7 MiB" in out  # imagenet_f16_16384's published size


def test_models_json_schema(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == {*pretrained.VQGAN_MODELS, *pretrained.CLIP_MODELS}
    assert all(set(r) == {"name", "family", "description", "license", "size", "check", "path"}
               for r in rows)


def test_download_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["download", "--help"])
    assert info.value.code == 0
    assert "resumes" in capsys.readouterr().out


def test_download_from_a_local_server_then_models_shows_it(server, monkeypatch, isolated_cache, capsys):
    server.files.update({"/a.yaml": b"model: {}\n", "/a.ckpt": b"0" * 5000})
    monkeypatch.setitem(pretrained.VQGAN_MODELS, "test-model", {
        "description": "test", "license": "test", "files": {
            "config": RemoteFile(server.url + "/a.yaml", "model.yaml"),
            "ckpt": RemoteFile(server.url + "/a.ckpt", "last.ckpt", size=5000)}})
    assert main(["-q", "download", "test-model"]) == 0
    assert (isolated_cache / "test-model" / "last.ckpt").stat().st_size == 5000
    capsys.readouterr()
    main(["models"])
    line = next(row for row in capsys.readouterr().out.splitlines() if row.startswith("test-model"))
    assert str(isolated_cache / "test-model") in line


@pytest.mark.parametrize("argv, message", [
    (["download", "nope"], "unknown model 'nope'; available: imagenet_f16_1024"),
    (["download", "imagenet_f16_16384"], "VQCLIP_OFFLINE=1: imagenet_f16_16384 is not downloaded"),
])
def test_user_errors_are_one_line_with_exit_code_2(argv, message, monkeypatch, capsys):
    monkeypatch.setenv("VQCLIP_OFFLINE", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vqclip: error: {message}") and err.count("\n") == 1
    assert "Traceback" not in err


def test_console_script_and_module_entry_points(tmp_path):
    script = Path(sys.executable).parent / "vqclip"
    for cmd in ([str(script), "models"], [sys.executable, "-m", "vqclip", "download", "nope"]):
        result = subprocess.run(cmd, capture_output=True, text=True)
        assert result.returncode == (0 if "models" in cmd else 2), result.stderr
        assert "Traceback" not in result.stderr


def test_unusable_cache_dir_is_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["download", "imagenet_f16_1024", "--cache-dir", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vqclip: error:") and err.count("\n") == 1


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path, monkeypatch, capsys):
    class ClosedPipe:  # stdout after `| head` has exited
        def __init__(self, fd):
            self.fd = fd

        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            return self.fd

    with open(tmp_path / "stdout", "w") as f:
        monkeypatch.setattr(sys, "stdout", ClosedPipe(f.fileno()))
        code = main(["models"])
    assert code == 1 and capsys.readouterr().err == ""  # no traceback, no "error:" line
