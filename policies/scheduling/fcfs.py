"""``fcfs``: vLLM-style continuous batching (vLLM v0's default scheduler without chunked prefill).

Each step is either a prefill step or a decode step. Waiting requests are admitted in arrival order
while the step's token budget, the sequence limit and free HBM blocks (above a small watermark) allow;
a whole prompt runs in one step, and a step that admits anything runs only prefills (prefill first).
Otherwise every running request decodes one token; when a decode needs a block and none is free, the
most recently admitted request is preempted (recompute or swap, per ``replica.preemption_mode``).
Swapped requests come back before new ones are admitted.
"""
from __future__ import annotations

from dataclasses import dataclass

from policies.base import SchedulerView, SchedulingPolicy, StepPlan
from policies.registry import register


def check_batch_limits(p, min_batched_tokens: int) -> None:
    """Validate the batch limits shared by the schedulers in this package (messages name the key)."""
    if p.max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1 (got {p.max_num_seqs})")
    if p.max_num_batched_tokens < min_batched_tokens:
        raise ValueError(f"max_num_batched_tokens must be >= {min_batched_tokens} (got {p.max_num_batched_tokens})")
    if not 0 <= p.watermark < 1:
        raise ValueError(f"watermark must be in [0, 1) (got {p.watermark})")


@dataclass(frozen=True, slots=True, kw_only=True)
class FCFSParams:
    max_num_seqs: int = 256           # most sequences in one step (vLLM max_num_seqs)
    max_num_batched_tokens: int = 0   # 0: the model context window (a whole prompt fits one step)
    watermark: float = 0.01           # fraction of HBM blocks kept free at admission

    def __post_init__(self) -> None:
        check_batch_limits(self, 0)


def split_running(running: list) -> tuple[list, list]:
    """(decoding, still prefilling) running requests, each in running order. A request decodes when
    exactly one token is left to compute: its prompt is done and the next token is sampled."""
    decoding = [r for r in running if r.prompt_tokens + r.num_generated - r.num_computed == 1]
    if len(decoding) == len(running):       # the common case: every running request decodes
        return decoding, []
    return decoding, [r for r in running if r.prompt_tokens + r.num_generated - r.num_computed != 1]


def plan_decodes(view: SchedulerView, candidates: list, free: int, plan: StepPlan, budget: int) -> int:
    """Give each candidate (in order) one decode token, preempting from the tail of ``candidates``
    when blocks run out; returns the free blocks left. Shared by the schedulers in this package."""
    needs = view.decode_blocks_needed(candidates)
    total = sum(needs)
    if total <= free and budget >= len(candidates):      # the common case: everyone fits
        plan.decode.extend(candidates)
        return free - total
    pending = list(candidates)
    pending_needs = list(needs)
    i = 0
    while i < len(pending):
        req = pending[i]
        if budget <= 0:
            break
        need = pending_needs[i]
        while need > free and len(pending) - 1 > i:
            victim = pending.pop()
            pending_needs.pop()
            plan.preempt.append(victim)
            free += view.blocks_freed_by_release(victim)
        if need > free:
            plan.preempt.append(req)
            free += view.blocks_freed_by_release(req)
            pending.pop(i)
            pending_needs.pop(i)
            continue
        free -= need
        budget -= 1
        plan.decode.append(req)
        i += 1
    return free


def plan_swap_ins(view: SchedulerView, free: int, watermark: int, seats: int, plan: StepPlan) -> int:
    for req in view.swapped:
        if seats <= 0:
            break
        need = view.swap_in_blocks(req)
        if free - need < watermark:
            break
        plan.swap_in.append(req)
        free -= need
        seats -= 1
    return free


@register("scheduling", "fcfs")
class FCFS(SchedulingPolicy):
    """Continuous batching, prefill-first, FCFS admission (vLLM default without chunked prefill)."""

    Params = FCFSParams

    def token_budget(self, view: SchedulerView) -> int:
        return self.p.max_num_batched_tokens or view.max_model_len

    def max_prompt_tokens(self, max_model_len: int) -> int:
        """Longest prompt this scheduler can ever run (a whole prompt must fit one step)."""
        return self.p.max_num_batched_tokens or max_model_len

    def schedule(self, view: SchedulerView, now: float) -> StepPlan:
        plan = StepPlan()
        free = view.num_free_blocks
        watermark = int(self.p.watermark * view.num_blocks)
        seats = self.p.max_num_seqs - len(view.running) - view.num_swapping_in
        decoding, unfinished = split_running(view.running)   # unfinished: still lack part of their prompt
        if not view.swapped:
            budget = self.token_budget(view)
            # a running request may still lack part of its prompt (its prefix hits shrank at admission)
            for req in unfinished:
                n = view.tokens_to_compute(req)
                need = view.blocks_needed(req, n)
                if n <= budget and need <= free:
                    plan.prefill.append((req, n))
                    free -= need
                    budget -= n
            for req in view.waiting:
                if seats <= 0:
                    break
                n = view.tokens_to_compute(req)
                if n > budget:
                    break
                need = view.blocks_needed(req, n)
                if free - need < watermark:
                    break
                plan.prefill.append((req, n))
                free -= need
                budget -= n
                seats -= 1
            if plan.prefill:
                return plan
        free = plan_decodes(view, decoding, free, plan, len(decoding))
        if not plan.preempt and view.swapped:
            plan_swap_ins(view, free, watermark, seats, plan)
        return plan

    def steady_through_finishes(self, view: SchedulerView) -> bool:
        # nothing waits and nothing is swapped: a smaller batch still only decodes
        return not view.waiting and not view.swapped and not view.num_swapping_in

    def steady_decode(self, view: SchedulerView) -> bool:
        running = view.running
        if not running:
            return False
        for r in running:
            if r.prompt_tokens + r.num_generated - r.num_computed != 1:
                return False
        free = view.num_free_blocks
        watermark = int(self.p.watermark * view.num_blocks)
        seats = self.p.max_num_seqs - len(running) - view.num_swapping_in
        if view.swapped:
            if seats <= 0:
                return True
            return view.swap_in_blocks(view.swapped[0]) > free - watermark
        if not view.waiting or seats <= 0:
            return True
        head = view.waiting[0]
        n = view.tokens_to_compute(head)
        return n > self.token_budget(view) or view.blocks_needed(head, n) > free - watermark
