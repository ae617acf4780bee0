"""The crash-safety layer: a directory is complete only when its marker verifies; partial files and the
spill directories of dead processes are cleaned up."""
import os
import subprocess
import sys

from sim import results_io


def test_marker_verifies_sizes_and_checksums_and_marks_volatile_files(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"x" * 100)
    (tmp_path / "timing.json").write_text("{}")
    assert results_io.verify(tmp_path) == "no DONE marker"
    results_io.write_marker(tmp_path, ["a.parquet"], volatile=["timing.json"], config_hash="h")
    assert results_io.verify(tmp_path) is None
    (tmp_path / "timing.json").write_text('{"wall_s": 3}')          # volatile: its bytes may change
    assert results_io.verify(tmp_path) is None
    (tmp_path / "a.parquet").write_bytes(b"y" * 100)
    assert results_io.verify(tmp_path) == "a.parquet does not match its checksum"
    (tmp_path / "a.parquet").write_bytes(b"y")
    assert "has 1 bytes" in results_io.verify(tmp_path, checksums=False)
    (tmp_path / "DONE").write_text('{"files": ')                      # a half-written marker
    assert results_io.verify(tmp_path) == "unreadable DONE marker"


def test_atomic_writes_leave_nothing_on_failure_and_partial_files_are_cleared(tmp_path):
    try:
        with results_io.atomic_path(tmp_path / "f.parquet") as tmp:
            tmp.write_bytes(b"half")
            raise OSError("disk full")
    except OSError:
        pass
    assert list(tmp_path.iterdir()) == []
    (tmp_path / ".steps.parquet.tmp-12345").write_bytes(b"left by a kill")
    assert [p.name for p in results_io.clear_partial(tmp_path)] == [".steps.parquet.tmp-12345"]


def test_spill_dirs_of_dead_processes_are_reaped_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f"tiersim-steps-{dead}-abc").mkdir()
    (tmp_path / f"tiersim-steps-{os.getpid()}-def").mkdir()
    gone = results_io.reap_spill_dirs(tmp_path)
    assert [p.name for p in gone] == [f"tiersim-steps-{dead}-abc"]
    assert (tmp_path / f"tiersim-steps-{os.getpid()}-def").exists()
