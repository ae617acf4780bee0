"""Every notebook's code cells run top to bottom (small sizes, non-interactive plotting)."""
import json
from pathlib import Path

import matplotlib
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.setenv("TIERSIM_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("TIERSIM_NOTEBOOK_OUT", str(tmp_path / "out"))
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    scope: dict = {}
    for cell in cells:
        exec(compile("".join(cell["source"]), f"{path.name}", "exec"), scope)
