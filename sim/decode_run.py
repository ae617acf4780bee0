"""Compiled arithmetic of decode runs (see ``sim.replica.Replica._decode_run``).

A decode run is K consecutive decode-only steps of a fixed batch of B requests. Request r starts
with ``nc[r]`` tokens of KV and processes one token per step; step s (0-based) writes token
``nc[r] + s``, which needs a new block when ``(nc[r] + s) % bs == 0``. Step 0's blocks are allocated
before the run is planned, so the run only plans steps 1..K-1. Everything here is exact integer
arithmetic, shared by the single-step and the run paths, so that they agree bit for bit.
"""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def plan_run(nc, rem, bs, avail, max_steps):
    """Plan a run: (K, allocs, who, when, held0).

    K is at most the steps until the first request finishes (``rem`` = output tokens still to
    produce) and ``max_steps``, and steps 1..K-1 may not need more new blocks than ``avail`` in total.
    ``allocs[s]`` = blocks step s allocates (``allocs[0]`` = 0: step 0's were allocated before the
    run); ``who``/``when`` list those allocations in step order and batch order; ``held0`` = blocks
    the batch holds at the start (each request holds ceil((nc + 1) / bs) once step 0 is allocated)."""
    B = nc.shape[0]
    k_max = max_steps
    held0 = 0
    for r in range(B):
        if rem[r] < k_max:
            k_max = rem[r]
        held0 += (nc[r] + bs) // bs
    allocs = np.zeros(k_max, np.int64)
    for r in range(B):
        s = (bs - nc[r] % bs) % bs
        if s == 0:
            s = bs
        while s < k_max:
            allocs[s] += 1
            s += bs
    cum = 0
    K = k_max
    for s in range(1, k_max):
        cum += allocs[s]
        if cum > avail:
            K = s
            cum -= allocs[s]
            break
    who = np.empty(cum, np.int64)
    when = np.empty(cum, np.int64)
    i = 0
    for s in range(1, K):
        for r in range(B):
            if (nc[r] + s) % bs == 0:
                who[i] = r
                when[i] = s
                i += 1
    return K, allocs[:K], who, when, held0


@numba.njit(cache=True, nogil=True)
def run_ends(now, durations, t_next):
    """End time of every planned step (accumulated left to right, as single steps add up), and how
    many steps to keep: all, or up to the one in progress when the next request arrives at
    ``t_next`` (where that arrival's interrupt would end the run)."""
    K = durations.shape[0]
    ends = np.empty(K)
    t = now
    for s in range(K):
        t = t + durations[s]
        ends[s] = t
    keep = K
    if t_next <= ends[K - 1]:
        k_arr = np.searchsorted(ends, t_next, side="right") + 1
        if k_arr < K:
            keep = k_arr
    return ends, keep
