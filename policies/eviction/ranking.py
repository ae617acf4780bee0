"""Selection helpers shared by the ranking eviction policies: the ``n`` best blocks by a score in
linear time, ties in the view's order (least recently used first)."""
from __future__ import annotations

import numpy as np


def smallest(score: np.ndarray, n: int, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Indices of the ``n`` smallest ``score`` values; among equal scores at the cut, the smallest
    ``tiebreak`` first, then the lowest index. O(len) (a partition, not a sort)."""
    m = score.shape[0]
    if n >= m:
        return (np.lexsort((np.arange(m), tiebreak, score)) if tiebreak is not None
                else np.argsort(score, kind="stable"))
    if n <= 0:
        return np.empty(0, dtype=np.int64)
    kth = np.partition(score, n - 1)[n - 1]
    less = np.flatnonzero(score < kth)
    tie = np.flatnonzero(score == kth)
    need = n - less.shape[0]
    if tiebreak is not None and need < tie.shape[0]:
        tie = tie[np.argsort(tiebreak[tie], kind="stable")]
    return np.concatenate([less, tie[:need]])
