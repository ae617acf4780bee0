"""Per-request outcome columns, preallocated for the whole trace and filled when a request finishes or
is rejected (the request object is then released)."""
from __future__ import annotations

import numpy as np

from sim.request import Request

REJECT_REASONS = ("", "exceeds max_model_len", "exceeds KV capacity", "exceeds scheduler token budget",
                  "could not be scheduled")
REASON_CODE = {r: i for i, r in enumerate(REJECT_REASONS)}


class RequestLog:
    """Preallocated per-request columns, filled when a request finishes or is rejected."""

    def __init__(self, n: int) -> None:
        self.n = n
        f = lambda: np.full(n, np.nan)  # noqa: E731
        self.replica = np.full(n, -1, dtype=np.int16)
        self.status = np.zeros(n, dtype=np.int8)       # 0 pending, 1 finished, 2 rejected
        self.reason = np.zeros(n, dtype=np.int8)
        self.first_scheduled_s, self.first_token_s, self.finish_s = f(), f(), f()
        self.generated = np.zeros(n, dtype=np.int64)
        self.extra_tokens = np.zeros(n, dtype=np.int64)
        self.seg_off = np.zeros(n, dtype=np.int64)     # where the request's token runs start in its
        self.seg_cnt = np.zeros(n, dtype=np.int32)     # replica's token log, and how many there are
        self.preemptions = np.zeros(n, dtype=np.int32)
        self.swaps = np.zeros(n, dtype=np.int32)
        self.prefix_hit_tokens = np.zeros(n, dtype=np.int64)
        self.lower_hit_tokens = np.zeros(n, dtype=np.int64)     # of those, loaded from a lower tier
        self.kv_stall_s = np.zeros(n)                           # waiting for the prefix to land
        self.num_done = 0

    def finish(self, req: Request) -> None:
        i = req.idx
        if self.status[i] != 0:
            raise RuntimeError(f"request {req.req_id} finished twice")
        if req.num_generated != req.output_tokens:
            raise RuntimeError(f"request {req.req_id} finished with {req.num_generated} of "
                               f"{req.output_tokens} output tokens")
        self.status[i] = 1
        self.replica[i] = req.replica
        self.first_scheduled_s[i] = req.first_scheduled_s
        self.first_token_s[i] = req.first_token_s
        self.finish_s[i] = req.finish_s
        self.generated[i] = req.num_generated
        self.extra_tokens[i] = req.extra_tokens
        self.preemptions[i] = req.num_preemptions
        self.swaps[i] = req.num_swaps
        self.prefix_hit_tokens[i] = req.total_prefix_hit
        self.lower_hit_tokens[i] = req.lower_hit_tokens
        self.kv_stall_s[i] = req.kv_stall_s
        self.num_done += 1

    def reject(self, req: Request, reason: int, now: float) -> None:
        i = req.idx
        if self.status[i] != 0:
            raise RuntimeError(f"request {req.req_id} rejected after it was already done")
        self.status[i] = 2
        self.reason[i] = reason
        self.replica[i] = req.replica
        self.finish_s[i] = now
        self.generated[i] = req.num_generated
        self.num_done += 1
