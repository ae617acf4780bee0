"""``NUMBA_ENABLE_CUDASIM=1 tiersim calibrate --quick --out DIR`` (what CI runs) yields a well-formed
table that the simulator can load; pricing a model the table does not cover fails with a precise error."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def table_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cal") / "t"
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", "import sys; from sim.cli import main; sys.exit(main())",
                        "calibrate", "--quick", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out


def test_calibrate_writes_raw_metadata_and_a_fitted_table(table_dir):
    assert (table_dir / "metadata.json").exists()
    assert len(list((table_dir / "raw").glob("*.parquet"))) >= 9
    t = json.loads((table_dir / "table.json").read_text())
    assert t["format"] == "tiersim-cost-table/1"
    assert t["gpu"]["simulated"] is True
    assert set(t["raw_files"]) >= {"launch.parquet", "hbm_stream.parquet", "decode_attention.parquet"}
    assert "sync_s" in t["launch"]


def test_the_simulator_loads_it_and_names_what_it_lacks(table_dir):
    from sim.costs.model import TransformerOps
    from sim.costs.table import CostTable, TableBackend
    from sim.errors import CostTableError
    from sim.specs import load_gpu, load_model

    table = CostTable(table_dir)
    assert len(table.identity["sha256"]) == 64
    keys = [key for op, key in table.groups if op == "attn_decode"]   # from the Numba paged kernel
    assert keys and table.has("attn_decode", keys[0])
    if table.has("gemm", "dtype=bf16,k=4096,n=6144"):
        pytest.skip("PyTorch is installed here: the quick suite measured the vendor parts on the CPU")
    with pytest.raises(CostTableError) as err:      # exact entries only: names what is missing
        TableBackend(TransformerOps(load_model("llama-3.1-8b")), load_gpu("h100"), table, generalise=False)
    msg = str(err.value)
    assert "has no entry for" in msg and "gemm dtype=bf16,k=4096,n=6144" in msg
    assert "tiersim calibrate --models llama-3.1-8b" in msg


def test_budget_s_refuses_a_negative_budget(tmp_path, capsys):
    from sim.cli import main

    assert main(["calibrate", "--out", str(tmp_path / "c"), "--budget-s", "-5"]) == 2
    assert "--budget-s -5: must be >= 0 seconds (0: no budget)" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
