"""The README's commands and code must keep matching the CLI and the API."""

import ast
import re
import shlex
from pathlib import Path

import pytest

import vqclip
from vqclip.cli import build_parser

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
def test_every_cli_line_parses(argv):
    if "--help" in argv:
        with pytest.raises(SystemExit) as info:
            build_parser().parse_args(argv)
        assert info.value.code == 0
    else:
        build_parser().parse_args(argv)


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
