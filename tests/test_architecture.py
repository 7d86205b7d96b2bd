"""The layout that docs/architecture.md describes: who may import whom, and parts that read in a
screen. Read from the source with ``ast``, so a lazy import inside a function counts too."""

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "vqclip"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 80


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, relative imports resolved; ``from m import a`` gives both
    ``m`` and ``m.a`` (``a`` may be a submodule)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return found


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def within(name: str, part: str) -> bool:
    return name == part or name.startswith(part + ".")


def is_core(name: str) -> bool:
    return not any(within(name, p) for p in ("vqclip.shapes", "vqclip.cli", "vqclip.web",
                                             "vqclip.__main__"))


def test_the_module_names_are_resolved():
    # the checks below would pass vacuously if relative imports were misread
    assert "vqclip.shapes.world" in imports(MODULES["vqclip.shapes.judge"])
    assert "vqclip.generator" in imports(MODULES["vqclip.shapes.loop_trainer"])
    assert "vqclip.shapes.clip_trainer" in imports(MODULES["vqclip.cli.train"])


@pytest.mark.parametrize("name", [n for n in MODULES if is_core(n)])
def test_the_core_imports_neither_the_shapes_world_nor_the_cli_nor_the_web_app_nor_scripts(name):
    bad = [m for m in imports(MODULES[name]) if any(within(m, part) for part in (
        "vqclip.shapes", "vqclip.cli", "vqclip.web", "scripts", "gradio"))]
    assert bad == [], f"{name} imports {bad}"


@pytest.mark.parametrize("name", [n for n in MODULES if within(n, "vqclip.web")])
def test_the_web_app_stands_on_the_core_alone(name):
    bad = [m for m in imports(MODULES[name]) if within(m, "vqclip.shapes") or within(m, "vqclip.cli")]
    assert bad == [], f"{name} imports {bad}"


def test_only_the_layout_knows_the_web_framework():
    for name in (n for n in MODULES if within(n, "vqclip.web") and n != "vqclip.web.layout"):
        assert not [m for m in imports(MODULES[name]) if within(m, "gradio")], name


@pytest.mark.parametrize("path", [*(p for n, p in MODULES.items() if not within(n, "vqclip.cli")
                                    and n != "vqclip.__main__"),
                                  *sorted((ROOT / "scripts").glob("*.py"))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_imports_the_cli(path):
    assert not [m for m in imports(path) if within(m, "vqclip.cli")]


@pytest.mark.parametrize("path", sorted((ROOT / "scripts").glob("*.py")), ids=lambda p: p.name)
def test_scripts_import_only_public_names(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vqclip"):
            public = importlib.import_module(node.module).__all__
            private = [a.name for a in node.names if a.name not in public]
            assert private == [], f"{path.name}: {node.module} does not export {private}"


def test_every_command_module_is_registered():
    from vqclip import cli

    modules = {n for n in MODULES if within(n, "vqclip.cli")} - {"vqclip.cli", "vqclip.cli.common",
                                                                 "vqclip.cli.__main__"}
    assert {c.__name__ for c in cli.COMMANDS} == modules


@pytest.mark.parametrize("name", list(MODULES))
def test_modules_and_functions_read_in_a_screen(name):
    source = MODULES[name].read_text()
    assert source.count("\n") <= MAX_MODULE_LINES, f"{name}: {source.count(chr(10))} lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            lines = node.end_lineno - node.lineno + 1
            assert lines <= MAX_FUNCTION_LINES, f"{name}.{node.name}: {lines} lines"
