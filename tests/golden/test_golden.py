"""Canonical runs reproduce their stored metrics within ``REL_TOL`` (see tests/golden/cases.py)."""
import json
import math

import pytest

from tests.golden.cases import CASES, HERE, REL_TOL, metrics


def _compare(got, want, path=""):
    if isinstance(want, dict):
        assert set(got) == set(want), f"{path}: keys differ"
        for k in want:
            _compare(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, float):
        assert math.isclose(got, want, rel_tol=REL_TOL, abs_tol=1e-12), f"{path}: {got!r} != {want!r}"
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name):
    want = json.loads((HERE / f"{name}.json").read_text())
    _compare(json.loads(json.dumps(metrics(CASES[name]))), want, name)
