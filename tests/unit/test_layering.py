"""sim and policies never import numba.cuda (only calibration/kernels may)."""
import subprocess
import sys

CODE = """
import importlib, pkgutil, sys
import sim, policies
for pkg in (sim, policies):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):
        importlib.import_module(m.name)
import sim.cli
sim.cli.build_parser()
from sim.engine import Simulation
bad = sorted(m for m in sys.modules if m == 'numba.cuda' or m.startswith('numba.cuda.'))
print(bad)
raise SystemExit(1 if bad else 0)
"""


def test_sim_and_policies_do_not_import_numba_cuda():
    r = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
