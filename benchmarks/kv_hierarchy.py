"""Prefix-cache hit rate against cache capacity for every eviction policy, on both Mooncake FAST'25
traces, beside a separate LRU replay of the same hashes (no engine) and Belady's offline optimum.

    python benchmarks/kv_hierarchy.py                    # both traces, every shipped policy
    python benchmarks/kv_hierarchy.py --traces conversation --policies lru belady --capacities 1000 20000
    python benchmarks/kv_hierarchy.py --resume           # run only the points the rows log lacks

Requests are admitted in arrival order and one at a time (``max_num_seqs = 1``, a token budget as large
as the context, no watermark): the condition under which the engine's LRU must equal the replay (the
test suite checks it; ``tests/unit/test_kv_oracle.py``). Capacity is counted in cache blocks of 512
tokens, Mooncake's own block (``replica.block_size_tokens = 512``, so a trace hash is a cache block);
to fit up to 50,000 of them the replica is Llama-3.2-1B at tensor-parallel 8 on H200s (4 KiB of KV per
token per GPU). The hit rate does not depend on the model or GPU here, only on the block sequence;
times are priced by the roofline (they do not enter the figure).

Writes ``benchmarks/results/kv_hierarchy.json`` and ``.csv`` (one row per trace, policy and capacity:
token-weighted hit rate, request hit fraction, evictions) and ``kv_hierarchy.png``. Each finished run is
appended to ``kv_hierarchy.rows.jsonl`` as it ends; ``--plot-only`` writes the rest from those rows (an
interrupted sweep keeps what it ran).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections import OrderedDict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRACES = {"conversation": "mooncake-conversation", "synthetic": "mooncake-synthetic"}
POLICIES = ("lru", "lfu", "fifo", "arc", "2q", "ttl", "cost-aware", "belady")
CAPACITIES = (1000, 2000, 5000, 10000, 20000, 50000)
BLOCK = 512
# Mooncake (arXiv 2407.00079 v3, section 4.2 and Table 1): one global cache pool over their sample trace
# (average input 7,590 tokens; not the FAST'25 release), 512-token blocks; "increasing the cache capacity
# from 1,000 to 50,000 blocks boosts the cache hit ratio from 30% to 50%", LRU best of LRU/LFU/LengthAware.
MOONCAKE_REPORTED = {1000: 0.30, 50000: 0.50}


def config(trace: str, policy: str, capacity: int) -> dict:
    return {"trace.bundled": TRACES[trace], "model.name": "llama-3.2-1b", "hardware.gpu": "h200",
            "replica.tensor_parallel_size": 8, "costs.backend": "roofline", "replica.block_size_tokens": BLOCK,
            "replica.num_hbm_blocks": capacity, "replica.dram_kv_bytes": 0,
            "policies.scheduling.max_num_seqs": 1, "policies.scheduling.watermark": 0.0,
            "policies.eviction.name": policy, "metrics.step_log": False}


def run_one(args: tuple[str, str, int]) -> dict:
    trace, policy, capacity = args
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    from sim.config import SimConfig, with_overrides
    from sim.engine import Simulation

    t0 = time.process_time()
    res = Simulation(with_overrides(SimConfig(), config(trace, policy, capacity))).run()
    kv, kt = res.summary["kv"], res.summary["kv_tiers"]
    return {"trace": trace, "policy": policy, "capacity_blocks": capacity,
            "capacity_tokens": capacity * BLOCK, "token_hit_rate": kv["hbm_prefix_hit_rate"],
            "request_hit_fraction": kt["request_hit_fraction"]["hbm"],
            "requests_with_hits": kt["requests_with_hits"]["hbm"], "evicted_blocks": kv["hbm_evicted_blocks"],
            "rejected": res.summary["requests"]["rejected"], "cpu_s": time.process_time() - t0}


def lru_replay(trace: str, capacity: int) -> float:
    """The test suite's oracle (tests/unit/test_kv_oracle.py), at 512-token blocks."""
    import traces
    from sim.memory.tiers import prefix_keys
    from sim.specs import load_model

    tr = traces.load_trace(traces.bundled_path(TRACES[trace]))
    max_len = load_model("llama-3.2-1b").max_context_tokens
    lru, hit, looked = OrderedDict(), 0, 0
    for i in range(len(tr)):
        p, o = int(tr.prompt_tokens[i]), int(tr.output_tokens[i])
        keys = prefix_keys(tr.block_hashes(i), tr.hash_block_tokens, p, BLOCK).tolist()
        total = -(-(p + o - 1) // BLOCK)
        if p + o > max_len or total > capacity:
            continue
        limit = min(len(keys), (p - 1) // BLOCK)
        h = 0
        while h < limit and keys[h] in lru:
            h += 1
        hit, looked = hit + h, looked + limit
        for k in keys[:h]:
            del lru[k]
        while capacity - len(lru) < -(-p // BLOCK):
            lru.popitem(last=False)
        full = min(len(keys), p // BLOCK)
        mine = set(keys[:h]) | {k for k in keys[h:full] if k not in lru}
        while capacity - len(lru) < total:
            lru.popitem(last=False)
        for k in reversed(keys[:full]):
            if k in mine:
                lru[k] = None
    return hit / looked if looked else 0.0


def ideal(trace: str) -> float:
    """Prompt tokens an unbounded cache serves (the trace's reuse; ``tiersim trace describe``)."""
    import traces

    tr = traces.load_trace(traces.bundled_path(TRACES[trace]))
    seen, hit, looked = set(), 0, 0
    for i in range(len(tr)):
        h = tr.block_hashes(i).tolist()
        limit = min(len(h), (int(tr.prompt_tokens[i]) - 1) // BLOCK)
        k = 0
        while k < limit and h[k] in seen:
            k += 1
        hit, looked = hit + k, looked + limit
        seen.update(h[:int(tr.prompt_tokens[i]) // BLOCK])
    return hit / looked


def plot(rows: list[dict], oracle: dict, ideals: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({r["trace"] for r in rows}, key=list(TRACES).index)
    fig, axes = plt.subplots(1, len(names), figsize=(6.2 * len(names), 4.4), squeeze=False)
    colours = {"lru": "tab:blue", "lfu": "tab:olive", "fifo": "tab:orange", "arc": "tab:green", "2q": "tab:red",
               "ttl": "tab:purple", "cost-aware": "tab:brown", "belady": "black"}
    styles = {p: dict(color=c, lw=2.2 if p in ("belady", "lru") else 1.1) for p, c in colours.items()}
    for ax, name in zip(axes[0], names):
        for policy in [p for p in POLICIES if any(r["policy"] == p and r["trace"] == name for r in rows)]:
            pts = sorted((r["capacity_blocks"], r["token_hit_rate"]) for r in rows
                         if r["trace"] == name and r["policy"] == policy)
            ax.plot([c for c, _ in pts], [100 * h for _, h in pts], marker="o", ms=3.5, label=policy,
                    **styles.get(policy, dict(lw=1.1, color="tab:gray")))
        pts = sorted((c, h) for (t, c), h in oracle.items() if t == name)
        ax.plot([c for c, _ in pts], [100 * h for _, h in pts], ls="none", marker="x", ms=9, color="tab:red",
                label="LRU replay (oracle, no engine)")
        ax.axhline(100 * ideals[name], color="gray", ls=":", lw=1, label="unbounded cache")
        if name == "conversation":
            ax.plot(list(MOONCAKE_REPORTED), [100 * v for v in MOONCAKE_REPORTED.values()], ls="none",
                    marker="s", mfc="none", color="tab:green", ms=8, label="Mooncake paper (its own trace)")
        ax.set_xscale("log")
        ax.set_xlabel("cache capacity (512-token blocks)")
        ax.set_ylabel("prefix hit rate (% of prompt tokens)")
        ax.set_title(f"Mooncake {name} trace, one request at a time")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--traces", nargs="*", default=list(TRACES), choices=list(TRACES))
    p.add_argument("--policies", nargs="*", default=list(POLICIES))
    p.add_argument("--capacities", nargs="*", type=int, default=list(CAPACITIES))
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--resume", action="store_true",
                   help="keep the rows an earlier run logged and run only the (trace, policy, capacity) points missing")
    p.add_argument("--plot-only", action="store_true",
                   help="write the JSON, CSV and plot from the rows an earlier (perhaps interrupted) run logged")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "kv_hierarchy.rows.jsonl"       # one line per finished run, so an interrupted sweep keeps them
    if args.plot_only:
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    else:
        jobs = [(t, pol, c) for t in args.traces for pol in args.policies for c in args.capacities]
        rows = []
        if args.resume and log.exists():
            rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            done = {(r["trace"], r["policy"], r["capacity_blocks"]) for r in rows}
            jobs = [j for j in jobs if j not in done]
            print(f"resuming: {len(rows)} rows logged, {len(jobs)} points to run", flush=True)
        else:
            log.write_text("")
        with ProcessPoolExecutor(args.jobs) as ex:
            for row in ex.map(run_one, jobs):
                rows.append(row)
                with open(log, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(f"{row['trace']:13}{row['policy']:11}{row['capacity_blocks']:>8,}  "
                      f"hit {100 * row['token_hit_rate']:5.1f} %  ({row['cpu_s']:.1f} cpu s)", flush=True)
    names = sorted({r["trace"] for r in rows}, key=list(TRACES).index)
    oracle = {(t, c): lru_replay(t, c) for t in names for c in sorted({r["capacity_blocks"] for r in rows})}
    ideals = {t: ideal(t) for t in names}
    for r in rows:
        r["lru_replay_hit_rate"] = oracle[(r["trace"], r["capacity_blocks"])]
    (out / "kv_hierarchy.json").write_text(json.dumps({"rows": rows, "unbounded_cache_hit_rate": ideals,
                                                        "mooncake_reported": MOONCAKE_REPORTED,
                                                        "configs": {t: config(t, "<policy>", 0) for t in names}},
                                                       indent=2) + "\n")
    with open(out / "kv_hierarchy.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, oracle, ideals, out / "kv_hierarchy.png")
    print(f"results: {out / 'kv_hierarchy.json'}, {out / 'kv_hierarchy.csv'}, {out / 'kv_hierarchy.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
