"""Request state: a slotted record per request, its progress counters and its state machine.

Progress model (the same for prefill, decode and recompute): a request knows ``num_tokens`` =
prompt + generated tokens, and ``num_computed`` of them have KV in cache. A step processes ``n`` of the
missing tokens; when it reaches ``num_tokens`` the step samples one new token (``num_generated += 1``).
So a request is *decoding* when exactly one token (the last sampled one) lacks KV, and *prefilling*
when more do. Recompute preemption sets ``num_computed`` to 0 (:meth:`Request.restart`); the whole
prompt-plus-generated sequence is then prefilled again. A request finishes when ``num_generated ==
output_tokens``; its KV then holds ``prompt + output - 1`` tokens (the last sampled token is never fed
back).

Ownership: ``state`` changes only through :meth:`Request.to`, which refuses transitions the life cycle
does not have. The KV placement fields (``blocks``, ``dram_blocks``, ``num_cached_blocks``,
``lower_hit_tokens``) are written only by ``sim.memory`` (the KV owner); progress counters and the
load-stall times by the replica that runs the request.

Token emission is kept as runs of consecutive engine steps (``seg_start``/``seg_end``, inclusive) that
each produced the same number of tokens (``seg_tokens``: 1, or 1 + accepted drafts under speculative
decoding). Step ids are global: ``replica << STEP_ID_BITS | local step``, so a request's runs stay
meaningful if it moves between replicas, and consecutive steps of one replica stay consecutive ids.

Speculative decoding with a drafter that keeps KV of its own (a draft model, an EAGLE head) also
tracks ``num_draft_computed``: tokens whose draft KV is in cache (0 <= num_draft_computed <=
num_computed; the drafter's KV shares the target's blocks, so the KV owner's blocks cover both).

Invariants: 0 <= num_computed <= num_tokens; 0 <= num_generated <= output_tokens;
len(blocks) == ceil(num_computed / block_size) while RUNNING (between steps).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from policies.base import RequestState

STEP_ID_BITS = 40            # local step ids below 2**40 (a trillion steps per replica)

W, R, SO, S, SI, F, X, L, H = (RequestState.WAITING, RequestState.RUNNING, RequestState.SWAPPING_OUT,
                               RequestState.SWAPPED, RequestState.SWAPPING_IN, RequestState.FINISHED,
                               RequestState.REJECTED, RequestState.LOADING, RequestState.HANDING_OFF)
# the life cycle: which states each state may move to
TRANSITIONS: dict[int, frozenset] = {
    W: frozenset({R, L, X}),             # admitted (with a prefix still loading); or rejected
    L: frozenset({R}),                   # its prefix has landed
    R: frozenset({W, SO, F, H}),         # recompute-preempted; swapped out; finished; prefilled on a
                                         # prefill replica, handed off to a decode replica
    H: frozenset({R}),                   # its KV has landed on the decode replica
    SO: frozenset({S}),
    S: frozenset({SI, W, X}),            # swapped in; DRAM copy dropped (recompute); rejected
    SI: frozenset({R}),
    F: frozenset(),
    X: frozenset(),
}


@dataclass(slots=True, eq=False)
class Request:
    idx: int                     # position in the trace (arrival order); indexes metric arrays
    req_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    priority: int = 0
    tenant: str | None = None
    session_id: str | None = None
    hash_keys: np.ndarray | None = None   # engine-block prefix keys of the prompt's full blocks
    acceptance_rate: float = float("nan")  # the trace's acceptance_rate column, when it has one
    # progress
    state: int = RequestState.WAITING
    num_computed: int = 0
    num_draft_computed: int = 0  # tokens with drafter KV (drafters that keep KV)
    num_generated: int = 0
    num_prefix_hit: int = 0
    total_prefix_hit: int = 0    # summed over (re)admissions
    num_preemptions: int = 0
    num_swaps: int = 0
    replica: int = -1
    # KV placement (written by sim.memory only)
    blocks: list = field(default_factory=list)        # HBM block table
    dram_blocks: list = field(default_factory=list)   # while swapped out
    num_cached_blocks: int = 0   # leading blocks registered in the prefix cache
    lower_hit_tokens: int = 0    # prompt tokens loaded from a lower tier (summed over admissions)
    kv_wait_since_s: float = -1.0   # when it started waiting for its prefix to load (LOADING)
    kv_stall_s: float = 0.0      # seconds spent LOADING (summed over admissions)
    # times (seconds, simulated)
    first_scheduled_s: float = -1.0
    first_token_s: float = -1.0
    finish_s: float = -1.0
    # token emission: runs of consecutive engine steps that each produced one token for this request
    seg_start: list = field(default_factory=list)
    seg_end: list = field(default_factory=list)        # inclusive global step id
    seg_tokens: list = field(default_factory=list)     # tokens each step of the run emitted
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

    def to(self, state: int) -> None:
        """Move to ``state``; a transition the life cycle does not have is a bug in the caller."""
        if state not in TRANSITIONS[self.state]:
            raise RuntimeError(f"request {self.req_id}: no transition from {RequestState(self.state).name} "
                               f"to {RequestState(state).name}")
        self.state = state

    def restart(self) -> None:
        """Recompute preemption: nothing computed any more (the KV owner has released the blocks)."""
        self.num_computed = 0
        self.num_draft_computed = 0

    def record_tokens(self, first_step: int, last_step: int, extra: int = 0) -> None:
        """Steps ``first_step..last_step`` (inclusive, global ids) each emitted ``1 + extra`` tokens
        of this request (``extra``: accepted drafts, speculative decoding; a run of several steps
        has ``extra = 0``)."""
        m = 1 + extra
        self.extra_tokens += extra
        if self.seg_end and self.seg_end[-1] == first_step - 1 and self.seg_tokens[-1] == m:
            self.seg_end[-1] = last_step
        else:
            self.seg_start.append(first_step)
            self.seg_end.append(last_step)
            self.seg_tokens.append(m)


class PolicyMutationError(RuntimeError):
    """A policy wrote to something a view showed it (a bug in the policy)."""


class FrozenRequest:
    """A request as a guarded view shows it: every field readable, nothing writable."""

    __slots__ = ("_r",)

    def __init__(self, req: Request) -> None:
        object.__setattr__(self, "_r", req)

    def __getattr__(self, name: str):
        value = getattr(object.__getattribute__(self, "_r"), name)
        if isinstance(value, list):
            return tuple(value)
        if isinstance(value, np.ndarray):
            value = value.view()
            value.flags.writeable = False
        return value

    def __setattr__(self, name: str, value) -> None:
        r = object.__getattribute__(self, "_r")
        raise PolicyMutationError(f"a policy tried to set {name!r} of request {r.req_id}; "
                                  f"policies only read what views show and return plans")

    def __repr__(self) -> str:
        return f"FrozenRequest({object.__getattribute__(self, '_r')!r})"


def unwrap(req):
    """The request behind a guarded view's proxy (or the request itself)."""
    return object.__getattribute__(req, "_r") if type(req) is FrozenRequest else req
