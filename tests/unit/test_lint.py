"""The linter (ruff, configured in pyproject.toml) passes on the whole tree: CI runs it through here,
so the README's one test command checks style too."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_passes():
    exe = shutil.which("ruff")
    if exe is None:
        pytest.fail("ruff is not installed; it is in the test extra: pip install -e '.[test]'")
    out = subprocess.run([exe, "check", "--no-cache", "--output-format", "concise", str(ROOT)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
