"""The notebooks in notebooks/: the quickstart runs offline (so a broken API breaks the build), and
the one that needs downloaded weights at least uses the API as it is."""

from pathlib import Path

import nbformat
import pytest
from conftest import api_misuse
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


def code_cells(name):
    return [c.source for c in nbformat.read(NOTEBOOKS / name, as_version=4).cells
            if c.cell_type == "code"]


def test_quickstart_runs_offline(tmp_path, monkeypatch):
    """Every cell runs, and the notebook's own assertions hold: generation with live progress, the
    video, four ranked candidates, classification, search and an animation, all with the bundled
    preset."""
    monkeypatch.setenv("VQCLIP_CACHE", str(tmp_path / "cache"))  # the kernel inherits this
    monkeypatch.setenv("VQCLIP_OFFLINE", "1")
    nb = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    out = tmp_path / "quickstart-outputs"
    assert (out / "red-circle.mp4").stat().st_size > 0
    assert sorted(p.name for p in out.glob("blue-square-?.png")) == [f"blue-square-{k}.png"
                                                                        for k in range(4)]
    shown = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in shown)  # the live figure was drawn
    assert any("<video" in o.get("data", {}).get("text/html", "") for o in shown)
    assert any("image/gif" in o.get("data", {}) for o in shown)  # the animation, inline
    assert len(list((tmp_path / "quickstart-animation").glob("frame-*.png"))) == 8


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.name)
def test_stored_notebooks_have_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code" and "keep-output" not in cell.metadata.get("tags", []):
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def test_real_weights_notebook_uses_the_api_as_it_is():
    """It needs a download and a GPU, so CI cannot run it; instead every import must be public and
    every keyword given to Generator.load / generate must be a setting they take."""
    cells = code_cells("real_weights.ipynb")
    assert sum(c.count(".generate(") + c.count(".load(") for c in cells) >= 4
    assert [p for c in cells for p in api_misuse(c)] == []
