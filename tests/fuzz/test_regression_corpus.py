"""Every hostile input that failed before issue 13 (a traceback, a silent run, a vague message) now gets
a clear one-line error or a correct run. The cases live in ``tests/data/fuzz`` (files plus
``manifest.json``, written by ``python -m tests.fuzz.corpus_gen write-fixtures``); each runs the
``tiersim`` command in-process, so a traceback fails the test with its stack."""
from __future__ import annotations

from pathlib import Path

import pytest

from sim.cli import main
from tests.fuzz.corpus_gen import Outcome, argv_for, classify, read_fixtures, write_files

CORPUS = Path(__file__).resolve().parents[1] / "data" / "fuzz"
CASES = read_fixtures(CORPUS)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_known_bad_input_gets_a_clear_error_or_a_correct_run(case, tmp_path, capsys):
    write_files(case, tmp_path)
    rc = main(argv_for(case, tmp_path))
    got = capsys.readouterr()
    outcome, why = classify(case, Outcome(rc, got.out, got.err, tmp_path / "out"), tmp_path)
    assert outcome in ("clear", "ok"), f"{outcome}: {why}"


def test_the_corpus_covers_every_reader_and_the_config():
    groups = {c.id.split("/")[0] for c in CASES}
    assert {"azure", "burstgpt", "burstgpt-v3", "csv", "mooncake", "parquet", "set", "config-file", "out"} <= groups
