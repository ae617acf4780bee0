"""What each eviction policy keeps, on one run: a prompt reused several times, then a scan of one-off
prompts larger than the cache, then the reused prompt again.

Requests run one at a time (``max_num_seqs = 1``) on a 40-block HBM. A (256 tokens: 16 blocks, 15 of
them looked up) runs four times, so its blocks have hits; six one-off prompts of the same size follow,
96 blocks in all, which must evict 56; then A again. Recency-only policies (``lru``, ``fifo``) evict
A's blocks, the oldest, for the scan and the last A misses. Policies that keep reused blocks over
one-hit ones (``lfu``: hit counts; ``2q``: A's blocks moved to Am, the scan passes through A1in, nearly;
``arc``: A's blocks in T2, the scan in T1 with no ghost hits to grow T1; ``cost-aware``: (1 + hits)
times the recompute seconds per byte, while its inflation clock has not caught up) and the offline
optimum (``belady``: A is the next use) keep A.
``ttl`` keeps A while its turn is inside ``ttl_s`` (pinned blocks go newest first) and is LRU once it
has expired.
"""
from __future__ import annotations

import pytest

from tests.conftest import make_trace, run_checked, small_config

A = [1, 2, 3, 4]                      # four 64-token hash blocks: 256 tokens, 16 engine blocks


def _trace(gap_s: float = 0.5, uses: int = 4):
    scan = [[100 + 10 * i + j for j in range(4)] for i in range(6)]
    hashes = [A] * uses + scan + [A]
    return make_trace([gap_s * i for i in range(len(hashes))], [256] * len(hashes), [2] * len(hashes), hashes, 64)


def _last_hit_tokens(policy: str, trace, **params) -> int:
    cfg = small_config(**{"model.name": "llama-3.2-1b", "replica.block_size_tokens": 16,
                          "replica.num_hbm_blocks": 40, "replica.dram_kv_bytes": 0,
                          "policies.scheduling.max_num_seqs": 1, "policies.scheduling.watermark": 0.0,
                          "policies.eviction.name": policy,
                          **{f"policies.eviction.{k}": v for k, v in params.items()}})
    _, res = run_checked(cfg, trace)
    req = res.requests.set_index("request_id")
    uses = len(trace) - 7
    assert list(req.loc[1:uses - 1, "prefix_hit_tokens"]) == [240] * (uses - 1)   # A's repeats hit, any policy
    assert res.summary["kv"]["hbm_evicted_blocks"] >= 56
    return int(req.loc[len(trace) - 1, "prefix_hit_tokens"])


@pytest.mark.parametrize("policy,hit_tokens", [
    ("lru", 0), ("fifo", 0),            # A's blocks are the oldest: the scan evicts them
    ("lfu", 240), ("arc", 240), ("belady", 240),
    # the second scan prompt evicts 9 blocks: A1in's 7 oldest bring it down to its quarter (10 blocks),
    # then 2 from Am's LRU end, A's tail: 13 of A's 15 looked-up blocks are left
    ("2q", 208),
])
def test_which_policies_keep_a_reused_prompt_through_a_scan(policy, hit_tokens):
    assert _last_hit_tokens(policy, _trace()) == hit_tokens


def test_cost_aware_keeps_a_prompt_by_its_hits_until_the_inflation_clock_ages_it_out():
    # each scan prompt's evictions raise L by about one block's value, so A's (1 + hits) outlasts six
    # scan prompts with 5 hits, and not with 3
    assert _last_hit_tokens("cost-aware", _trace(uses=6)) == 240
    assert _last_hit_tokens("cost-aware", _trace(uses=4)) == 0


def test_ttl_keeps_a_turn_inside_its_ttl_and_is_lru_after_it():
    assert _last_hit_tokens("ttl", _trace(), ttl_s=60.0) == 240         # the scan comes within 60 s of A
    assert _last_hit_tokens("ttl", _trace(gap_s=5.0), ttl_s=2.0) == 0   # A expired before the scan evicted
