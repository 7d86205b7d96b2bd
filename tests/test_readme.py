"""The README's commands and code must keep matching the CLI and the API."""

import ast
import re
import shlex
from pathlib import Path

import pytest

import vqclip
from vqclip.cli import generate_config, parse_args

README = (Path(__file__).parent.parent / "README.md").read_text()


def blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def vqclip_commands():
    for block in blocks("bash"):
        for line in block.splitlines():
            line = line.split("#")[0].strip()
            if line.startswith("vqclip "):
                yield shlex.split(line)[1:]


def test_readme_has_the_ci_blocks():
    assert "<!-- ci:install -->" in README and "<!-- ci:test -->" in README


@pytest.mark.parametrize("argv", list(vqclip_commands()), ids=" ".join)
def test_every_cli_line_parses(argv, tmp_path, monkeypatch):
    if "--help" in argv:
        with pytest.raises(SystemExit) as info:
            parse_args(argv)
        assert info.value.code == 0
        return
    args = parse_args(argv)
    if args.command == "generate":  # the settings must be valid too, not only the flags
        monkeypatch.chdir(tmp_path)
        from PIL import Image

        for path in [args.init_image, *(args.image_prompts or [])]:
            if path:  # input images the example names: stand-ins, so that only settings are tested
                Image.new("RGB", (8, 8)).save(tmp_path / path.split(":")[0])
        cfg = generate_config(args)
        assert cfg.output.path


def test_python_blocks_compile_and_import_only_public_names():
    for block in blocks("python"):
        tree = ast.parse(block)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "vqclip":
                assert all(alias.name in vqclip.__all__ for alias in node.names)


def test_registry_names_in_the_model_table_exist():
    from vqclip import pretrained

    table = re.findall(r"^\| `([^`]+)` \|", README, flags=re.M)
    assert set(table) == {*pretrained.VQGAN_MODELS, *pretrained.CLIP_MODELS}
