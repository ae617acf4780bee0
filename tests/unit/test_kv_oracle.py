"""The prefix cache against a trivially simple oracle: an LRU replay of a trace's prefix hashes, with no
engine (about 30 lines), and the offline optimum above every online policy.

The comparison holds when requests are admitted in arrival order and alone: ``max_num_seqs = 1`` (one
request in the batch at a time, so the next is admitted only after the previous finished and released
its blocks), a token budget as large as the context (a whole prompt in one step) and no watermark. The
engine then sees exactly the oracle's sequence of block uses: a request takes its leading cached blocks,
evicts least recently used blocks for the rest of its prompt, registers the prompt's full blocks (a key
still cached beyond a miss keeps its place), evicts again for its decode tokens, and releases its blocks
tail first.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

import traces
from sim.memory.tiers import prefix_keys
from tests.conftest import examples, make_trace, run_checked, small_config

BS = 16


def lru_replay(keys_per_request, prompt, output, capacity: int, max_len: int) -> float:
    """Token-weighted prefix hit rate of an LRU cache of ``capacity`` blocks over the requests in order."""
    lru, hit_tokens, looked = OrderedDict(), 0, 0
    for keys, p, o in zip(keys_per_request, prompt, output):
        total = -(-(p + o - 1) // BS)
        if p + o > max_len or total > capacity:
            continue                                    # rejected on arrival
        limit = min(len(keys), (p - 1) // BS)
        h = 0
        while h < limit and keys[h] in lru:
            h += 1
        hit_tokens, looked = hit_tokens + h * BS, looked + limit * BS
        for k in keys[:h]:
            del lru[k]                                  # held while the request runs
        prompt_blocks = -(-p // BS)
        while capacity - len(lru) < prompt_blocks:      # its prompt's blocks, evicting LRU first
            lru.popitem(last=False)
        full = min(len(keys), p // BS)
        mine = set(keys[:h]) | {k for k in keys[h:full] if k not in lru}   # what it registers
        while capacity - len(lru) < total:              # its decode tokens' blocks
            lru.popitem(last=False)
        for k in reversed(keys[:full]):                 # released tail first
            if k in mine:
                lru[k] = None
    return hit_tokens / looked if looked else 0.0


def _keys(trace):
    return [prefix_keys(trace.block_hashes(i), trace.hash_block_tokens, int(trace.prompt_tokens[i]), BS).tolist()
            for i in range(len(trace))]


def _one_at_a_time(**kw):
    return small_config(**{"model.name": "llama-3.1-8b", "replica.block_size_tokens": BS,
                           "policies.scheduling.max_num_seqs": 1, "policies.scheduling.watermark": 0.0,
                           "replica.dram_kv_bytes": 0, **kw})


@pytest.mark.parametrize("capacity", [2_000, 8_000, 24_000])
def test_lru_hit_rate_equals_an_lru_replay_of_the_hashes(capacity):
    from sim.engine import Simulation

    tr = traces.head(traces.load_trace("mooncake-conversation"), 600)
    sim = Simulation(_one_at_a_time(**{"replica.num_hbm_blocks": capacity}), trace=tr)
    got = sim.run().summary["kv"]["hbm_prefix_hit_rate"]
    want = lru_replay(_keys(tr), tr.prompt_tokens.tolist(), tr.output_tokens.tolist(), capacity,
                      sim.max_model_len)
    assert got > 0.03
    assert abs(got - want) < 0.005, (got, want)


def _random_trace(rng: np.random.Generator, n: int):
    prompt = rng.integers(40, 700, n)
    output = rng.integers(1, 40, n)
    hashes = []
    for p in prompt:     # prompts grow out of a few conversations' shared histories
        conv, nblk = int(rng.integers(0, 4)), -(-int(p) // 64)
        shared = int(rng.integers(0, nblk + 1))
        hashes.append([conv * 1000 + j for j in range(shared)] + [10**6 + len(hashes) * 100 + j
                                                                  for j in range(nblk - shared)])
    return make_trace(np.arange(n) * 0.5, prompt, output, hashes, 64)


@pytest.mark.parametrize("seed", range(examples(6)))
def test_belady_is_at_or_above_every_online_policy(seed):
    rng = np.random.default_rng(seed)
    tr = _random_trace(rng, 60)
    blocks = int(rng.integers(60, 160))
    rates = {}
    for policy in ("belady", "lru", "lfu", "fifo", "arc", "2q", "ttl", "cost-aware"):
        cfg = _one_at_a_time(**{"model.name": "llama-3.2-1b", "replica.num_hbm_blocks": blocks,
                                "policies.eviction.name": policy})
        sim, res = run_checked(cfg, tr)
        rates[policy] = res.summary["kv"]["hbm_prefix_hit_rate"] or 0.0
    assert all(rates["belady"] >= v for v in rates.values()), rates
    # and LRU agrees with the replay on these traces too
    want = lru_replay(_keys(tr), tr.prompt_tokens.tolist(), tr.output_tokens.tolist(), blocks, sim.max_model_len)
    assert abs(rates["lru"] - want) < 0.005, (rates["lru"], want)
