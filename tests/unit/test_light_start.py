"""A run that needs no pandas imports none, nor the calibration package or matplotlib (issue 14): the
trace from the npz cache, the cost table,
the error bars and the results files all go through NumPy and pyarrow; and the Arrow columns built
without pandas equal the ones pandas builds."""
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa

from sim.arrow import categorical, from_numpy, strings, to_numpy

RUN = """
import sys
from sim.cli import main
rc = main(["run", "--trace", "azure-code", "--set", "trace.end_s=120", "--out", sys.argv[1], "--quiet"])
heavy = [m for m in sys.modules if m.split(".")[0] in ("pandas", "calibration", "matplotlib")]
print(heavy == [], rc, *heavy)
"""


def test_a_cached_bundled_run_imports_no_pandas_calibration_or_matplotlib(tmp_path):
    warm = subprocess.run([sys.executable, "-c", "import traces; traces.load_trace('azure-code')"],
                          capture_output=True, text=True)
    assert warm.returncode == 0, warm.stderr
    r = subprocess.run([sys.executable, "-c", RUN, str(tmp_path / "r")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["True", "0"], r.stdout + r.stderr     # no pandas, calibration, matplotlib
    assert (tmp_path / "r" / "DONE").exists()


def test_arrow_columns_equal_the_pandas_route():
    x = np.array([0.5, np.nan, 2.0, np.nan, 4.0])
    assert from_numpy(x, nan_is_null=True).equals(pa.Array.from_pandas(pd.Series(x)))
    assert from_numpy(x[::2]).equals(pa.array(x[::2])) and from_numpy(x).null_count == 0
    ints = np.arange(7, dtype=np.int16)[::2]                 # not contiguous
    assert from_numpy(ints).equals(pa.array(ints))
    codes = np.array([2, 0, 1, 1], dtype=np.int8)
    cats = ["pending", "finished", "rejected"]
    want = pa.Table.from_pandas(pd.DataFrame({"s": pd.Categorical.from_codes(codes, cats)})).column("s").chunk(0)
    assert categorical(codes, cats).equals(want) and categorical(codes, cats).type == want.type
    assert strings(["a", "bcd", ""]).to_pylist() == ["a", "bcd", ""]
    for arr in (pa.array([1.0, None, 3.0]), pa.array([1, None, 3]), pa.array([4, 5, 6]).slice(1),
                pa.chunked_array([pa.array(["x", "y"]), pa.array(["z"])]),
                pa.array([1.0, 2.0, None, 4.0]).slice(1, 2)):
        got, ref = to_numpy(arr), arr.to_pandas().to_numpy()
        assert got.dtype == ref.dtype and (np.array_equal(got, ref, equal_nan=True) if got.dtype.kind == "f"
                                           else (got == ref).all())
