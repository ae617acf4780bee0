"""Selection helpers shared by the ranking eviction policies: the ``n`` best blocks by a score in
linear time, ties in the view's order (least recently used first)."""
from __future__ import annotations

import numpy as np


def _cut(score: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(indices strictly below the n-th smallest score, indices equal to it, how many of those to take)."""
    kth = np.partition(score, n - 1)[n - 1]
    less = np.flatnonzero(score < kth)
    return less, np.flatnonzero(score == kth), n - less.shape[0]


def smallest(score: np.ndarray, n: int, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Indices of the ``n`` smallest ``score`` values, in the order ``n`` choices of one would take
    them: by score, then the smallest ``tiebreak``, then the lowest index (a run's allocations give
    the k-th victim to the k-th allocation, so the order is part of the answer). O(len + n log n):
    partitions, then a sort of the chosen only."""
    m = score.shape[0]
    if n >= m:
        return (np.lexsort((np.arange(m), tiebreak, score)) if tiebreak is not None
                else np.argsort(score, kind="stable"))
    if n <= 0:
        return np.empty(0, dtype=np.int64)
    less, tie, need = _cut(score, n)
    if tiebreak is not None and need < tie.shape[0]:
        less2, tie2, need2 = _cut(tiebreak[tie], need)
        got = np.concatenate([less, tie[less2], tie[tie2[:need2]]])
    else:
        got = np.concatenate([less, tie[:need]])
    keys = (got, score[got]) if tiebreak is None else (got, tiebreak[got], score[got])
    return got[np.lexsort(keys)]
