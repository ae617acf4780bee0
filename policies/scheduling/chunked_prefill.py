"""``chunked-prefill``: Sarathi-Serve-style stall-free batching (Agrawal et al., OSDI 2024).

Every step has a token budget. Running decodes go first (one token each); then partially prefilled
requests continue with chunks; then swapped requests come back; then waiting requests are admitted
with a first chunk of whatever budget is left. Prefills never stall decodes, and long prompts are cut
into chunks. Preemption on block shortage takes the most recently admitted request.

``admission`` says what a waiting request must find free to be admitted. ``"chunk"`` (the default,
vLLM's chunked prefill): the blocks of its first chunk. ``"prompt"`` (Sarathi-Serve's and Vidur's
scheduler): the blocks of its whole prompt, over and above the rest of the prompts still being
prefilled, so that an admitted prompt never waits for memory between its chunks. Blocks are still
allocated chunk by chunk; ``"prompt"`` only holds the remainder back from later admissions.
"""
from __future__ import annotations

from dataclasses import dataclass

from policies.base import SchedulerView, SchedulingPolicy, StepPlan
from policies.registry import register
from policies.scheduling.fcfs import check_batch_limits, plan_decodes, plan_swap_ins, split_running


@dataclass(frozen=True, slots=True, kw_only=True)
class ChunkedPrefillParams:
    max_num_seqs: int = 256            # most sequences in one step (vLLM max_num_seqs)
    max_num_batched_tokens: int = 2048   # the per-step token budget (Sarathi-Serve's chunk size)
    watermark: float = 0.01            # fraction of HBM blocks kept free at admission
    admission: str = "chunk"             # "chunk" | "prompt": see the module docstring

    def __post_init__(self) -> None:
        check_batch_limits(self, 1)
        if self.admission not in ("chunk", "prompt"):
            raise ValueError(f"admission must be 'chunk' or 'prompt' (got {self.admission!r})")


@register("scheduling", "chunked-prefill")
class ChunkedPrefill(SchedulingPolicy):
    """Token-budgeted steps: decodes first, then prefill chunks fill the rest (Sarathi-Serve)."""

    Params = ChunkedPrefillParams

    def max_prompt_tokens(self, max_model_len: int) -> int:
        return max_model_len

    def schedule(self, view: SchedulerView, now: float) -> StepPlan:
        plan = StepPlan()
        budget = self.p.max_num_batched_tokens
        free = view.num_free_blocks
        watermark = int(self.p.watermark * view.num_blocks)
        decoding, prefilling = split_running(view.running)
        free = plan_decodes(view, decoding + prefilling, free, plan, min(budget, len(decoding)))
        # plan_decodes stops before the prefilling requests (its budget is the decode count); the ones
        # it preempted from the tail may include them.
        preempted = set(map(id, plan.preempt))
        budget -= len(plan.decode)
        whole = self.p.admission == "prompt"
        if whole:
            # what the prompts already in prefill still need, held back from new admissions
            held = free - sum(view.blocks_needed(r, view.tokens_to_compute(r))
                              for r in prefilling if id(r) not in preempted)
        for req in prefilling:
            if budget <= 0:
                break
            if id(req) in preempted:
                continue
            n = min(view.tokens_to_compute(req), budget)
            need = view.blocks_needed(req, n)
            if need > free:
                # shrink the chunk to what the free blocks hold
                room = free * view.block_size + view.block_slack_tokens(req)
                n = min(n, room)
                if n <= 0:
                    continue
                need = view.blocks_needed(req, n)
            plan.prefill.append((req, n))
            free -= need
            budget -= n
        seats = self.p.max_num_seqs - len(view.running) - view.num_swapping_in + len(plan.preempt)
        if plan.preempt:
            return plan
        if view.swapped:
            plan_swap_ins(view, free, watermark, seats, plan)
            return plan
        if whole:
            free = min(free, held)
        for req in view.waiting:
            if seats <= 0 or budget <= 0:
                break
            todo = view.tokens_to_compute(req)
            n = min(todo, budget)
            need = view.blocks_needed(req, todo if whole else n)
            if free - need < watermark:
                break
            plan.prefill.append((req, n))
            free -= need
            budget -= n
            seats -= 1
        return plan

    def steady_through_finishes(self, view: SchedulerView) -> bool:
        # nothing waits and nothing is swapped: a smaller batch still only decodes
        return not view.waiting and not view.swapped and not view.num_swapping_in

    def steady_chunk(self, view: SchedulerView):
        """One request in prefill, every other running request decoding, and the decodes plus a
        full-budget chunk filling the step: no budget is left for admissions, so while the prompt has
        more than a chunk left the plan repeats (free blocks are checked by the replica as it plans
        the run). Swapped requests that could come back would change it."""
        decoding, prefilling = split_running(view.running)
        if len(prefilling) != 1:
            return None
        chunk = self.p.max_num_batched_tokens - len(decoding)
        req = prefilling[0]
        if chunk < 1 or view.tokens_to_compute(req) <= chunk:
            return None
        if view.swapped and self.p.max_num_seqs - len(view.running) - view.num_swapping_in > 0:
            watermark = int(self.p.watermark * view.num_blocks)
            if view.swap_in_blocks(view.swapped[0]) <= view.num_free_blocks - watermark:
                return None
        return req, chunk

    def steady_decode(self, view: SchedulerView) -> bool:
        running = view.running
        if not running or len(running) > self.p.max_num_batched_tokens:
            return False
        for r in running:
            if r.prompt_tokens + r.num_generated - r.num_computed != 1:
                return False
        free = view.num_free_blocks
        watermark = int(self.p.watermark * view.num_blocks)
        seats = self.p.max_num_seqs - len(running) - view.num_swapping_in
        if seats <= 0:
            return True
        if view.swapped:
            return view.swap_in_blocks(view.swapped[0]) > free - watermark
        if not view.waiting:
            return True
        left = self.p.max_num_batched_tokens - len(running)
        if left <= 0:
            return True
        head = view.waiting[0]
        todo = view.tokens_to_compute(head)
        n = todo if self.p.admission == "prompt" else min(todo, left)
        return view.blocks_needed(head, n) > free - watermark

