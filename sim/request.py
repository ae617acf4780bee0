"""Request state: a slotted record per request, owned by the replica that admitted it.

Progress model (the same for prefill, decode and recompute): a request knows ``num_tokens`` =
prompt + generated tokens, and ``num_computed`` of them have KV in cache. A step processes ``n`` of the
missing tokens; when it reaches ``num_tokens`` the step samples one new token (``num_generated += 1``).
So a request is *decoding* when exactly one token (the last sampled one) lacks KV, and *prefilling*
when more do. Recompute preemption sets ``num_computed`` to 0; the whole prompt-plus-generated sequence
is then prefilled again. A request finishes when ``num_generated == output_tokens``; its KV then holds
``prompt + output - 1`` tokens (the last sampled token is never fed back).

Invariants: 0 <= num_computed <= num_tokens; 0 <= num_generated <= output_tokens;
len(blocks) == ceil(num_computed_reserved / block_size) while RUNNING.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from policies.base import RequestState


@dataclass(slots=True, eq=False)
class Request:
    idx: int                     # position in the trace (arrival order); indexes metric arrays
    req_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    priority: int = 0
    hash_keys: np.ndarray | None = None   # engine-block prefix keys of the prompt's full blocks
    # progress
    state: int = RequestState.WAITING
    num_computed: int = 0
    num_generated: int = 0
    num_prefix_hit: int = 0
    total_prefix_hit: int = 0    # summed over (re)admissions
    num_preemptions: int = 0
    num_swaps: int = 0
    replica: int = -1
    # KV placement
    blocks: list = field(default_factory=list)        # HBM block table
    dram_blocks: list = field(default_factory=list)   # while swapped out
    num_cached_blocks: int = 0   # leading blocks registered in the prefix cache
    # times (seconds, simulated)
    first_scheduled_s: float = -1.0
    first_token_s: float = -1.0
    finish_s: float = -1.0
    # token emission: runs of consecutive engine steps that each produced one token for this request
    seg_start: list = field(default_factory=list)
    seg_end: list = field(default_factory=list)        # inclusive step index
    extra_tokens: int = 0        # tokens beyond one per step (accepted speculative drafts)

    @property
    def num_tokens(self) -> int:
        return self.prompt_tokens + self.num_generated

    @property
    def tokens_to_compute(self) -> int:
        return self.prompt_tokens + self.num_generated - self.num_computed

    @property
    def finished(self) -> bool:
        return self.num_generated >= self.output_tokens

    def record_tokens(self, first_step: int, last_step: int, extra: int = 0) -> None:
        """Steps ``first_step..last_step`` (inclusive) each emitted one token of this request; ``extra``
        more tokens came out together with them (speculative decoding)."""
        self.extra_tokens += extra
        if self.seg_end and self.seg_end[-1] == first_step - 1:
            self.seg_end[-1] = last_step
        else:
            self.seg_start.append(first_step)
            self.seg_end.append(last_step)
