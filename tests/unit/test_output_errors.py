"""Bad results directories and output paths for plot, compare, report and validate: one line naming the
file, the column or the option, and nothing written before the check."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sim import results_io
from sim.cli import main
from sim.errors import TiersimError

ROOT = Path(__file__).resolve().parents[2]
MEASURED = ROOT / "calibration" / "tables" / "h100-sxm-80gb" / "raw" / "validation.parquet"
READ_ONLY = Path("/proc")     # a folder nobody can create files in, even root (the tests may run as root)


def run_cli(capsys, *args):
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "base"
    assert main(["run", "--out", str(out), "--set", "costs.backend=roofline", "--set", "trace.max_requests=10",
                 "--quiet", "--no-progress"]) == 0
    return out


def _copy(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest)
    return dest


def _remark(run: Path, format_: int = results_io.MARKER_FORMAT) -> None:
    """Rewrite the DONE marker over the files as they are now, in results format ``format_``."""
    m = json.loads((run / "DONE").read_text())
    text = results_io.marker_text(run, m["files"], m["volatile"], config_hash=m["config_hash"])
    (run / "DONE").write_text(text.replace(f'"format": {results_io.MARKER_FORMAT}', f'"format": {format_}'))


def test_a_run_of_another_results_format_or_without_a_column_is_refused_by_name(base, tmp_path, capsys):
    import pyarrow.parquet as pq

    old = _copy(base, tmp_path / "v0")
    _remark(old, 0)
    for cmd in (["report", old], ["plot", old], ["compare", old, "--out", "none"]):
        rc, _, err = run_cli(capsys, *cmd)
        assert rc == 2 and err.strip() == (f"tiersim: error: {old}: written by an incompatible tiersim (results "
                                           "format 0; this version reads 1); rerun it"), cmd
    assert results_io.verify(old) is not None    # a sweep reruns such a run rather than keeping it
    renamed = _copy(base, tmp_path / "renamed")
    t = pq.read_table(renamed / "requests.parquet")
    pq.write_table(t.rename_columns(["ttft" if c == "ttft_s" else c for c in t.column_names]),
                   renamed / "requests.parquet")
    _remark(renamed)
    for cmd in (["report", renamed], ["plot", renamed], ["compare", renamed, "--out", tmp_path / "c.png"]):
        rc, _, err = run_cli(capsys, *cmd)
        assert rc == 2 and f"{renamed / 'requests.parquet'}: no column ttft_s" in err and "rerun" in err, cmd
        assert "Traceback" not in err
    assert not (tmp_path / "c.png").exists()


def test_a_damaged_file_of_the_same_size_is_refused_by_its_checksum(base, tmp_path, capsys):
    cr = _copy(base, tmp_path / "cr")
    p = cr / "requests.parquet"
    b = bytearray(p.read_bytes())
    b[8:len(b) // 2] = bytes(x ^ 0x55 for x in b[8:len(b) // 2])
    p.write_bytes(bytes(b))
    for cmd in (["report", cr], ["plot", cr], ["compare", cr, "--out", tmp_path / "c.png"]):
        rc, _, err = run_cli(capsys, *cmd)
        assert rc == 2 and err.strip() == (f"tiersim: error: {p}: cannot be read: it does not match its checksum "
                                           "in DONE (damaged since the run wrote it); rerun the run"), cmd
    s = cr / "summary.json"
    s.write_bytes(s.read_bytes().replace(b"{", b"[", 1))
    rc, _, err = run_cli(capsys, "compare", cr, "--out", "none")
    assert rc == 2 and f"{s}: cannot be read: it does not match its checksum" in err


def test_compare_of_a_file_says_it_is_a_file(tmp_path, capsys):
    (tmp_path / "good.csv").write_text("a,b\n")
    rc, _, err = run_cli(capsys, "compare", tmp_path / "good.csv", "--out", "none")
    assert rc == 2 and f"{tmp_path / 'good.csv'}: is a file, not a results directory" in err


@pytest.mark.skipif(not READ_ONLY.is_dir(), reason="needs Linux's /proc as a folder nobody can write")
def test_outputs_that_cannot_be_written_are_refused_before_any_work(base, tmp_path, capsys):
    run = _copy(base, tmp_path / "r")
    for cmd in (["plot", run, "--out", READ_ONLY / "x.png"], ["compare", run, "--out", READ_ONLY / "x.png"],
                ["report", run, "--out", READ_ONLY / "x.html"]):
        rc, out, err = run_cli(capsys, *cmd)
        assert rc == 2 and f"--out {cmd[-1]}: cannot write there (" in err and "choose another --out" in err, cmd
        assert out == ""
    (tmp_path / "afile").write_text("x\n")
    rc, _, err = run_cli(capsys, "plot", run, "--out", tmp_path / "afile" / "x.png")
    assert rc == 2 and f"{tmp_path / 'afile'} is a file, not a folder" in err
    with pytest.raises(TiersimError, match="afile is a file, not a folder"):     # --figures below a file
        results_io.check_output_dir(tmp_path / "afile" / "sub", "--figures")
    rc, _, err = run_cli(capsys, "report", run, "--figures", tmp_path / "afile" / "sub")
    assert rc == 2 and "--figures" in err and "afile is a file, not a folder" in err
    assert not (run / "report.html").exists()
    for out in (READ_ONLY / "va", tmp_path / "afile"):
        rc, _, err = run_cli(capsys, "validate", "--out", out)
        assert rc == 2 and f"--out {out}: " in err and "Traceback" not in err, out
    assert "cannot write there" in run_cli(capsys, "validate", "--out", READ_ONLY / "va")[2]
    assert "is a file; name a folder" in run_cli(capsys, "validate", "--out", tmp_path / "afile")[2]
    assert results_io.check_output_dir(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()     # checking creates nothing


def test_validate_names_a_bad_predictions_file_and_what_it_lacks(tmp_path, capsys):
    import pandas as pd

    out = tmp_path / "va"
    nope = tmp_path / "nope.parquet"
    rc, _, err = run_cli(capsys, "validate", "--predictions", nope, "--out", out)   # the file, not the table
    assert rc == 2 and f"--predictions {nope}: no such file" in err
    rc, _, err = run_cli(capsys, "validate", "--predictions", nope, "--measurements", MEASURED, "--out", out)
    assert rc == 2 and f"--predictions {nope}: no such file" in err
    csv = tmp_path / "p.csv"
    csv.write_text("point,mode,predicted_s\nx,graph,1\n")
    rc, _, err = run_cli(capsys, "validate", "--predictions", csv, "--measurements", MEASURED, "--out", out)
    assert rc == 2 and f"--predictions {csv}: cannot read as Parquet" in err
    rc, _, err = run_cli(capsys, "validate", "--predictions", MEASURED, "--measurements", MEASURED, "--out", out)
    assert rc == 2 and f"--predictions {MEASURED}: not a predictions file (no column point, mode, predicted_s)" in err
    other = tmp_path / "other.parquet"
    pd.DataFrame({"point": ["x"], "mode": ["graph"], "predicted_s": [1e-3]}).to_parquet(other)
    rc, _, err = run_cli(capsys, "validate", "--predictions", other, "--out", out)   # what is missing, correctly
    assert rc == 2 and "no validation measurements" not in err
    assert "no measurements of unseen_steps, unfused_steps, tp_steps" in err and "--measurements" in err
    rc, _, err = run_cli(capsys, "validate", "--predictions", other, "--measurements", MEASURED, "--out", out)
    assert rc == 2 and f"--predictions {other}: none of the" in err and "has a prediction there" in err
    assert not out.exists()


def test_validate_refuses_options_it_would_ignore(tmp_path, capsys):
    out = tmp_path / "va"
    rc, _, err = run_cli(capsys, "validate", "--gpu", "h200", "--cases", "foo", "--out", out)
    assert rc == 2 and "--gpu, --cases: only with --e2e RUN_DIR" in err
    for opt in (["--execution", "cuda-graph"], ["--costs", "roofline"]):
        rc, _, err = run_cli(capsys, "validate", *opt, "--out", out)
        assert rc == 2 and f"{opt[0]}: only with --e2e RUN_DIR" in err
    rc, _, err = run_cli(capsys, "validate", "--e2e", tmp_path, "--measurements", MEASURED, "--out", out)
    assert rc == 2 and "--measurements: not used with --e2e" in err
    assert not out.exists()
