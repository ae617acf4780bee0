"""Numba, imported once for the whole simulator, without its BLAS probe.

On its first compiled call Numba imports ``numba.np.arraymath``, which probes for a BLAS by importing
``scipy.linalg.cython_blas``: on the development VM 0.12 s of a 4 s ``tiersim run``, spent loading SciPy's
linear algebra for code that never calls it. No ``njit`` function in tiersim uses ``np.dot``, ``@`` or
``np.linalg`` (their NumPy callers run uncompiled), so the probe is answered "no BLAS" and its cost
skipped. The module blocks the import only while ``arraymath`` itself loads, and not at all when
SciPy's BLAS was imported already, so code outside tiersim that imports SciPy is unaffected; a compiled
function that did need BLAS would fail at compile time with Numba's "scipy 0.16+ is required" error.

Every module of tiersim that compiles imports Numba from here: ``from sim.jit import numba``.
"""
from __future__ import annotations

import sys

import numba

_BLAS = "scipy.linalg.cython_blas"

if "numba.np.arraymath" not in sys.modules and _BLAS not in sys.modules:
    sys.modules[_BLAS] = None            # type: ignore[assignment]   # import fails: "no BLAS"
    try:
        import numba.np.arraymath  # noqa: F401
    finally:
        del sys.modules[_BLAS]


# np.searchsorted for the compiled hot paths. Numba's own overload (NaN-aware comparisons, every dtype)
# is slow to compile, and each distinct use compiles it again on a first run; this takes a sorted array
# without NaN and a non-NaN value, and returns what np.searchsorted does for them.
@numba.njit(cache=True, nogil=True)
def searchsorted(a, x, right=False):
    """``np.searchsorted(a, x, side="right" if right else "left")``: the number of elements of ``a``
    less than ``x`` (at most ``x`` with ``right``)."""
    lo = 0
    hi = a.shape[0]
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] < x or (right and a[mid] == x):
            lo = mid + 1
        else:
            hi = mid
    return lo


__all__ = ["numba", "searchsorted"]
