"""A few corpus cases through a fresh ``python -m sim.cli`` process each, as a user runs them: exit
status 2 and one line on stderr, or a correct run; and what the CLI does with its output directory."""
from __future__ import annotations

import json

import pytest

from sim.cli import main
from tests.fuzz import corpus_gen as cg

BY_ID = {c.id: c for c in cg.all_cases()}
# one of each kind of failure before issue 13 (the rest of the corpus runs in-process, much faster)
CHOSEN = ["azure/gzip-truncated", "mooncake/deep-nesting", "out/existing-file", "config-file/directory",
          "features/csv-columns-ms"]


@pytest.mark.parametrize("case_id", CHOSEN)
def test_case_in_a_fresh_process(case_id):
    outcome, why = cg.run_case(BY_ID[case_id], mode="exec")
    assert outcome in ("clear", "ok"), f"{outcome}: {why}"


def test_dropped_rows_are_printed_and_in_the_summary(tmp_path, capsys):
    path = tmp_path / "bg.csv"
    path.write_bytes(BY_ID["burstgpt/Response tokens='0'"].files["burstgpt.csv"])
    rc = main(["run", "--trace", str(path), "--out", str(tmp_path / "out"), *cg.BASE])
    out = capsys.readouterr().out
    assert rc == 0
    assert "trace: the reader dropped 3 failed rows of the file" in out
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["trace"]["dropped_rows"] == {"failed": 3}


def test_a_run_that_fails_leaves_no_empty_output_directory(tmp_path, capsys):
    out = tmp_path / "new" / "dir"
    rc = main(["run", "--out", str(out), "--set", "trace.start_s=1e6", *cg.BASE])
    assert rc == 2 and "trace.start_s" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
