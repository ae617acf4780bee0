"""Small refusals: each bad input gets one line naming the file, the config key or the option, not a
silent default or another part's error."""
from __future__ import annotations

from tests.unit.test_cli import run_cli


def test_trace_describe_refuses_a_file_with_only_a_header(tmp_path, capsys):
    path = tmp_path / "empty.csv"
    path.write_text("arrival_s,prompt_tokens,output_tokens\n")
    rc, out, err = run_cli(capsys, "trace", "describe", str(path))
    assert rc == 2 and out == ""
    assert err == "tiersim: error: empty.csv: the file holds no requests\n"   # as tiersim run says it
