"""Every notebook runs as a notebook (nbclient, a real Python kernel), top to bottom, on small data
(``TIERSIM_NOTEBOOK_QUICK=1``), writing only into a temporary directory (``TIERSIM_NOTEBOOK_OUT``)."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_there_is_a_notebook_for_each_use():
    assert [p.stem for p in NOTEBOOKS] == ["replay_compare_policies", "sweep_chunked_prefill_budget",
                                           "validate_cost_tables"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    import nbformat

    out = tmp_path / "out"
    monkeypatch.setenv("TIERSIM_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("TIERSIM_NOTEBOOK_OUT", str(out))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(path, as_version=4)
    before = sorted(p.name for p in (ROOT / "notebooks").iterdir())
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert sorted(p.name for p in (ROOT / "notebooks").iterdir()) == before, "the notebook wrote beside itself"
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, "the notebook drew no figure"
