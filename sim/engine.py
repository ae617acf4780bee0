"""The simulation: owns the SimPy environment and the run loop, builds the cluster from a config,
replays the trace and assembles the results.

    from sim.config import KV_DTYPE_BYTES, SimConfig
    from sim.engine import Simulation
    results = Simulation(SimConfig()).run()       # the bundled Azure conv trace, Llama-3.1-8B on H100
    results.write("out/")

The cluster (``sim.cluster``) feeds arrivals from the pre-sorted trace arrays and routes each request
to a replica; each replica runs its own engine-step process (``sim.replica``); transfers run as
processes of their own on the links (``sim.memory.transfers``). Nothing in a run reads a wall clock
except the progress display.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import simpy

import traces
from policies import registry
from sim.cluster import Cluster, policy_rng
from sim.config import KV_DTYPE_BYTES, SimConfig
from sim.costs.model import TransformerOps
from sim.costs.recipe import load_recipe
from sim.costs.roofline import RooflineBackend
from sim.costs.step import StepCostModel
from sim.costs.table import CostTable, TableBackend, resolve_table_dir
from sim.errors import ConfigError, PolicyError
from sim.hardware.gpu import hbm_budget
from sim.metrics import Results, build_results, spill_dir
from sim.replica.drafting import drafter_footprint
from sim.specs import load_gpu, load_model, load_server, spec_to_dict
from sim.workload import load_trace_for

VERSION = "0.1.0"


@dataclass(frozen=True, slots=True)
class Progress:
    finished: int
    total: int
    sim_time_s: float
    trace_span_s: float
    wall_s: float


class Simulation:
    """A configured cluster and trace, ready to run once.

    ``guarded=True`` shows every policy immutable views (tests use it to prove that policies only
    read); ``check_invariants=True`` has every replica check its invariants after every step.
    """

    def __init__(self, config: SimConfig, trace: traces.Trace | None = None,
                 progress: Callable[[Progress], None] | None = None, *, guarded: bool = False,
                 check_invariants: bool = False) -> None:
        self.config = config
        self.progress = progress
        self.guarded = guarded
        self.check_invariants = check_invariants
        rc = config.replica
        self.model = load_model(config.model.name)
        if rc.kv_dtype:
            # one KV element size everywhere: capacity, transfer bytes and attention time
            self.model = dataclasses.replace(self.model, bytes_per_kv=KV_DTYPE_BYTES[rc.kv_dtype])
        self.gpu = load_gpu(config.hardware.gpu)
        self.server = load_server(config.hardware.server)
        tp = rc.tensor_parallel_size
        self.ops = TransformerOps(self.model, tp)
        budget = hbm_budget(self.gpu, self.model, tp=tp, utilization=rc.gpu_memory_utilization,
                            activation_reserve_bytes=rc.activation_reserve_bytes)
        self.max_model_len = rc.max_model_len or self.model.max_context_tokens
        if self.max_model_len > self.model.max_context_tokens:
            raise ConfigError(f"replica.max_model_len={rc.max_model_len} exceeds the context window of "
                              f"{self.model.name} ({self.model.max_context_tokens} tokens)")
        # ---- policies: validated now (a bad name or parameter fails before anything runs), built
        # per replica when the cluster is; the config's plugins register theirs first
        for plugin in config.plugins:
            registry.load_plugin(plugin)
        probes = {kind: self.build_policy(kind, -1) for kind in registry.KINDS}
        self.eviction_needs_future = registry.lookup("eviction", config.policies.eviction.name).needs_future
        if rc.lanes == "decoupled":
            self._check_decoupled(probes)
        # ---- the speculation policy's drafter: priced on this GPU, its weights and KV in this HBM
        self.drafter = probes["speculation"].drafter()
        self.speculating = not probes["speculation"].emits_one_token
        cc = config.cluster
        if cc.prefill_replicas:
            if self.speculating:
                raise ConfigError(f"cluster.prefill_replicas: speculative decoding (policies.speculation.name = "
                                  f"{config.policies.speculation.name!r}) is not modelled in a disaggregated "
                                  f"cluster (the drafter's KV is not handed off); set policies.speculation.name = "
                                  f"'none', or cluster.prefill_replicas = 0")
            try:
                registry.lookup("routing", cc.decode_routing)
            except PolicyError as exc:     # name the config key that chose it
                raise ConfigError(f"cluster.decode_routing: {str(exc).split(': ', 1)[-1]}") from None
        self.draft_footprint = drafter_footprint(self.drafter, self.model, tp)
        # ---- costs: one backend per model (the target, and drafters named by speculation plans)
        self.table = None
        if config.costs.backend == "table":
            self.table = CostTable(resolve_table_dir(config.costs.table))
        self._backends: dict[str, object] = {}
        self.backend = self._backend(self.model.name)
        # ---- KV geometry
        bs = rc.block_size_tokens
        kv_token_gpu = 2 * self.model.num_layers * self.ops.kv_heads * self.model.head_dim * self.model.bytes_per_kv
        self.target_kv_bytes_per_token = kv_token_gpu
        fp = self.draft_footprint
        kv_bytes = budget.kv_bytes - fp.weight_bytes
        if kv_bytes <= 0:
            raise ConfigError(f"policies.speculation: the {self.drafter.kind} drafter's {fp.weight_bytes / 1e9:.1f} GB "
                              f"of weights per GPU leave no HBM for KV on {self.gpu.name} (the target left "
                              f"{budget.kv_bytes / 1e9:.1f} GB)")
        # a drafter that keeps KV stores it in the target's blocks: each block holds both
        self.hbm_bytes_per_block = int(round(bs * (kv_token_gpu + fp.kv_bytes_per_token)))
        self.host_bytes_per_block = self.hbm_bytes_per_block * tp
        self.hbm_blocks = kv_bytes // self.hbm_bytes_per_block
        if rc.num_hbm_blocks:
            if rc.num_hbm_blocks > self.hbm_blocks:
                raise ConfigError(f"replica.num_hbm_blocks={rc.num_hbm_blocks} exceeds the {self.hbm_blocks} "
                                  f"blocks that fit in HBM on {self.gpu.name}")
            self.hbm_blocks = rc.num_hbm_blocks
        if self.hbm_blocks < 1:
            raise ConfigError(f"replica: no room for a single KV block of {self.hbm_bytes_per_block} bytes "
                              f"after weights and activations on {self.gpu.name}")
        if rc.dram_kv_bytes > self.server.dram_bytes * tp:
            raise ConfigError(f"replica.dram_kv_bytes={rc.dram_kv_bytes} exceeds the host DRAM of "
                              f"{tp} GPU(s) on {self.server.name} ({self.server.dram_bytes * tp} bytes)")
        if rc.nvme_kv_bytes > self.server.nvme.capacity_bytes * tp:
            raise ConfigError(f"replica.nvme_kv_bytes={rc.nvme_kv_bytes} exceeds the NVMe capacity of "
                              f"{tp} drive(s) on {self.server.name}")
        self.dram_blocks = rc.dram_kv_bytes // self.host_bytes_per_block
        self.nvme_blocks = rc.nvme_kv_bytes // self.host_bytes_per_block
        self._check_tiers_named(probes["residency"])
        self.budget = budget
        # ---- trace
        self.trace = trace if trace is not None else load_trace_for(config)
        self._ran = False

    def _check_tiers_named(self, residency) -> None:
        """A tier the config sends KV to must exist: swap needs DRAM, and an explicit tier in the config
        residency's parameters (not ``auto``, which picks among those configured) needs that tier; else
        the KV would silently be dropped or recomputed."""
        from policies.residency.config import ConfigResidency

        rc, bpb = self.config.replica, self.host_bytes_per_block
        cc = self.config.cluster
        size = {"dram": ("replica.dram_kv_bytes", rc.dram_kv_bytes, self.dram_blocks),
                "nvme": ("replica.nvme_kv_bytes", rc.nvme_kv_bytes, self.nvme_blocks),
                "store": ("cluster.shared_kv_bytes", cc.shared_kv_bytes, cc.shared_kv_bytes // bpb)}
        if rc.preemption_mode == "swap" and not self.dram_blocks:
            raise ConfigError(f"replica.preemption_mode = 'swap' needs DRAM to swap to, but replica.dram_kv_bytes = "
                              f"{rc.dram_kv_bytes} holds no {bpb}-byte block; raise it, or preempt by 'recompute'")
        if not (self.dram_blocks or self.nvme_blocks or size["store"][2]) and \
                self.config.policies.residency.name != "config":
            raise ConfigError(f"policies.residency.name = {self.config.policies.residency.name!r} places KV below "
                              "HBM, and no lower tier is sized (replica.dram_kv_bytes, replica.nvme_kv_bytes, "
                              "cluster.shared_kv_bytes hold no block); size one, or use the default 'config'")
        if not isinstance(residency, ConfigResidency):
            return
        for key in ("offload_to", "hbm_evict_to", "dram_evict_to", "nvme_evict_to"):
            tier = getattr(residency.p, key)
            if tier in size and not size[tier][2]:
                name, nbytes, _ = size[tier]
                raise ConfigError(f"policies.residency.{key} = {tier!r}, but {name} = {nbytes} holds no {bpb}-byte "
                                  f"block: no {tier} tier; size it, or use 'auto' (the next tier configured below)")

    # ------------------------------------------------------------------ building
    def _lanes_summary(self) -> dict:
        """``summary["lanes"]``: the decoupled lanes' partition and HBM sharing, per replica."""
        rc = self.config.replica
        reps = self.replicas
        return {"mode": "decoupled", "partition": rc.lanes_partition, "prefill_sm_fraction": rc.prefill_sm_fraction,
                "itl_slo_s": rc.lanes_itl_slo_s, "hbm_peak_bytes_per_s": reps[0].lanes.hbm.peak,
                "replicas": [r.lanes.summary() for r in reps]}

    def _check_decoupled(self, probes: dict) -> None:
        """What decoupled lanes (``replica.lanes = "decoupled"``, ``sim.replica.lanes``) run with."""
        pc = self.config.policies
        if pc.scheduling.name not in ("chunked-prefill", "fcfs"):
            raise ConfigError(f"policies.scheduling.name={pc.scheduling.name!r}: decoupled lanes "
                              "(replica.lanes = 'decoupled') run with 'chunked-prefill' or 'fcfs'")
        if not probes["speculation"].emits_one_token or probes["speculation"].drafter().kind != "none":
            raise ConfigError(f"policies.speculation.name={pc.speculation.name!r}: decoupled lanes "
                              "(replica.lanes = 'decoupled') do not model speculative decoding; use 'none'")
        if not probes["sparsity"].is_dense:
            raise ConfigError(f"policies.sparsity.name={pc.sparsity.name!r}: decoupled lanes "
                              "(replica.lanes = 'decoupled') price dense attention only; use 'dense'")
        if self.config.cluster.prefill_replicas:
            raise ConfigError(f"cluster.prefill_replicas={self.config.cluster.prefill_replicas}: decoupled lanes "
                              "(replica.lanes = 'decoupled') run on mixed replicas, not in a disaggregated "
                              "cluster; set cluster.prefill_replicas = 0, or replica.lanes = 'lockstep'")

    def build_policy(self, kind: str, replica: int, tier: int = 0):
        """A fresh instance of the configured policy of ``kind`` for one replica (-1: cluster-wide);
        ``tier`` > 0: an eviction policy for a lower KV tier (1 DRAM, 2 NVMe, 3 the shared store)."""
        pc = getattr(self.config.policies, kind)
        policy = registry.build(kind, pc.name, pc.params)
        policy.attach(policy_rng(self.config.seed, kind, replica, tier))
        return policy

    def _backend(self, model_name: str):
        got = self._backends.get(model_name)
        if got is not None:
            return got
        model = self.model if model_name == self.model.name else load_model(model_name)
        ops = self.ops if model is self.model else TransformerOps(model, self.config.replica.tensor_parallel_size)
        roofline = RooflineBackend(ops, self.gpu)
        if self.table is None:
            backend = roofline
        else:
            backend = TableBackend(ops, self.gpu, self.table,
                                   roofline if self.config.costs.fallback == "roofline" else None,
                                   generalise=self.config.costs.fallback == "generalise",
                                   recipe=load_recipe(self.config.costs.recipe))
        self._backends[model_name] = backend
        return backend

    def cost_model(self, model_name: str, execution) -> StepCostModel:
        """Step pricing for ``model_name`` on this GPU under ``execution`` (the target model, or a
        drafter a speculation plan names)."""
        backend = self._backend(model_name)
        return StepCostModel(backend.ops, backend, execution)

    def pcie_params(self) -> tuple[float, float, float]:
        """(H2D bandwidth, D2H bandwidth, latency) of one GPU's PCIe link: measured when the cost
        table has them, else the GPU preset's."""
        spec = self.gpu.pcie
        h2d = (spec.latency_s, spec.h2d_bandwidth_bytes_per_s)
        d2h = (spec.latency_s, spec.d2h_bandwidth_bytes_per_s)
        if self.table is not None:
            h2d = self.table.link("pcie_h2d") or h2d
            d2h = self.table.link("pcie_d2h") or d2h
        return h2d[1], d2h[1], max(h2d[0], d2h[0])

    # ------------------------------------------------------------------ running
    def run(self) -> Results:
        if self._ran:
            raise RuntimeError("a Simulation runs once; build a new one")
        self._ran = True
        wall0 = time.perf_counter()
        env = simpy.Environment()
        self.env = env
        self.spill = spill_dir()
        self.run_metadata = self.metadata()    # known before the run: the step logs' spill files carry it
        self.cluster = Cluster(self, env, guarded=self.guarded)
        self.replicas = self.cluster.replicas
        for r in self.replicas:
            r.check_invariants = self.check_invariants
        self.requests = self.cluster.requests
        self.cluster.start()
        span = float(self.trace.arrival_s[-1]) if len(self.trace) else 0.0
        n = len(self.trace)
        # env.run() with an event counter and, when asked, a wall-clock check every 1024 events
        # (env.run(until=...) in chunks would leave its stop events queued)
        step, peek, inf = env.step, env.peek, float("inf")
        progress = self.progress
        last_report, events = 0.0, 0
        while peek() < inf:
            step()
            events += 1
            if progress is not None and not events & 1023:
                wall = time.perf_counter() - wall0
                if wall - last_report >= 0.5:
                    last_report = wall
                    progress(Progress(self.requests.num_done, n, env.now, span, wall))
        if progress is not None:
            progress(Progress(self.requests.num_done, n, env.now, span, time.perf_counter() - wall0))
        self.events = events
        wall_run = time.perf_counter() - wall0
        for r in self.replicas:
            if r.has_work():
                raise RuntimeError(f"replica {r.replica_id} still has work after the event queue drained")
        return self._results(wall0, wall_run)

    def _speculation_summary(self) -> dict:
        """``summary["speculation"]``: what the drafts cost and bought, summed over replicas (the
        per-step ITL, vLLM's definition, is added by ``build_results``)."""
        reps = self.replicas
        tot = {k: sum(getattr(r.spec, k) for r in reps) for k in (
            "steps", "verify_steps", "drafting_decodes", "decodes", "depth", "proposed", "accepted", "verify_rows",
            "draft_s", "verify_s", "kv_byte_seconds", "rolled_back_blocks", "shortened")}
        fp = self.draft_footprint
        d = self.drafter
        busy = sum(r.steps.busy_s for r in reps)
        rejected = tot["proposed"] - tot["accepted"]
        per_draft_token = 2.0 * fp.params / (d.heads if d.kind == "medusa" else 1)
        hbm_tokens = self.hbm_blocks * self.config.replica.block_size_tokens
        kv_only = (self.budget.kv_bytes // (self.config.replica.block_size_tokens * self.target_kv_bytes_per_token)
                   * self.config.replica.block_size_tokens)

        def ratio(a, b):
            return a / b if b else None

        return {
            "policy": self.config.policies.speculation.name,
            "drafter": {"kind": d.kind, "model": d.model, "layers": d.layers, "heads": d.heads, "host_s": d.host_s,
                        "params": fp.params, "weight_bytes_per_gpu": fp.weight_bytes,
                        "kv_bytes_per_token_per_gpu": fp.kv_bytes_per_token},
            "steps": tot["steps"], "verify_steps": tot["verify_steps"],
            "decode_request_steps": tot["decodes"], "drafting_request_steps": tot["drafting_decodes"],
            "draft_depth_tokens": tot["depth"], "proposed_tokens": tot["proposed"],
            "accepted_tokens": tot["accepted"],
            "acceptance_rate": ratio(tot["accepted"], tot["depth"]),
            "mean_accepted_length": ratio(tot["accepted"], tot["drafting_decodes"]),
            "tokens_per_target_step": ratio(tot["drafting_decodes"] + tot["accepted"], tot["drafting_decodes"]),
            "tokens_per_decode_step": ratio(tot["decodes"] + tot["accepted"], tot["decodes"]),
            "draft_s": tot["draft_s"], "verify_s": tot["verify_s"],
            "draft_s_per_verify_step": ratio(tot["draft_s"], tot["verify_steps"]),
            "verify_s_per_verify_step": ratio(tot["verify_s"], tot["verify_steps"]),
            "draft_share_of_busy": ratio(tot["draft_s"], busy),
            "wasted_draft_tokens": rejected,
            "wasted_verify_flops": 2.0 * self.model.param_count * rejected,
            "wasted_draft_flops": per_draft_token * rejected if d.kind in ("model", "eagle", "medusa") else 0.0,
            "lookahead_kv_peak_bytes": max(r.spec.kv_peak_bytes for r in reps),
            "lookahead_kv_mean_bytes": ratio(tot["kv_byte_seconds"], busy),
            "rolled_back_blocks": tot["rolled_back_blocks"], "shortened_drafts": tot["shortened"],
            "hbm_kv_tokens_per_replica": hbm_tokens, "hbm_kv_tokens_without_drafter": kv_only,
        }

    def metadata(self) -> dict:
        cfg = self.config
        config = cfg.to_dict()
        config.pop("output", None)    # where results are written does not change them
        return {
            "tiersim_version": VERSION,
            "config": config,
            "config_hash": cfg.hash(),
            "cost_table": self.backend.identity,
            "trace": self.trace.identity(),
            "specs": {"model": spec_to_dict(self.model), "gpu": spec_to_dict(self.gpu),
                      "server": spec_to_dict(self.server)},
        }

    def _kv_tiers(self) -> dict:
        """The KV hierarchy's figures, summed over replicas (``summary["kv_tiers"]``): hits per tier
        (token-weighted, and per request), loads and the load-or-recompute choices, write-backs,
        evictions, prefetch, and the time requests waited for their prefix to land."""
        reps = self.replicas
        for r in reps:
            r.kv.hbm.untag_unused()         # prefetched blocks never used are wasted
        per = [r.kv.stats() for r in reps]

        def add(a, b):
            if isinstance(a, dict):
                return {k: add(a.get(k, 0), b.get(k, 0)) for k in {*a, *b}}
            return a + b

        tot = per[0]
        for st in per[1:]:
            tot = add(tot, st)
        rc = self.config.replica
        looked = int(sum(r.kv.lookup_tokens for r in reps))
        admissions = tot.pop("admissions")
        ratio = np.sum([r.kv.tier_ratio_sum for r in reps], axis=0)
        tot.pop("hit_ratio_sum")
        hits = tot["hit_tokens"]
        bpb = self.host_bytes_per_block
        stalls = [r.moves for r in reps]
        n_stalled = sum(m.num_stalled for m in stalls)
        stall_s = sum(m.stall_s for m in stalls)
        store = self.cluster.store
        out = {
            "mode": rc.kv_tier_mode, "bytes_per_kv": self.model.bytes_per_kv,
            "blocks_per_replica": {"hbm": self.hbm_blocks, "dram": self.dram_blocks, "nvme": self.nvme_blocks},
            "store_blocks": store.pool.num_blocks if store is not None else 0,
            "lookup_tokens": looked,
            "token_hit_rate": {t: (v / looked if looked else None) for t, v in sorted(hits.items())},
            "token_hit_rate_all": (sum(hits.values()) / looked if looked else None),
            "request_hit_fraction": {t: (float(ratio[i]) / admissions if admissions else None)
                                     for i, t in enumerate(("hbm", "dram", "nvme", "store"))},
            "requests_with_hits": tot["hit_requests"],
            "prefill_tokens_saved": int(sum(hits.values())),
            "writeback_bytes": int(sum(tot["write_blocks"].values()) * bpb),
            "stall": {"requests": n_stalled, "total_s": stall_s, "mean_s": stall_s / n_stalled if n_stalled else 0.0,
                      "max_s": max((m.max_stall_s for m in stalls), default=0.0),
                      "writeback_wait_s": sum(m.writeback_wait_s for m in stalls)},
            **tot,
        }
        out["admissions"] = admissions
        return out

    def _execution_summary(self, engine: dict) -> dict:
        """How the steps were launched, per output token: what the execution presets compare."""
        ex = self.config.policies.execution
        tokens = int(self.requests.generated.sum())
        per = (lambda n: n / tokens) if tokens else (lambda n: None)
        reserved = self.gpu.sm_count - round(self.replicas[0].builder.sm_share * self.gpu.sm_count)
        return {"mode": ex.name, "params": dict(ex.params), "reserved_sms": int(reserved),
                "model_sms": int(self.gpu.sm_count - reserved), "output_tokens": tokens,
                "launches_per_token": per(engine["launches"]), "syncs_per_token": per(engine["syncs"]),
                "padded_tokens": engine["padded_tokens"],
                # what a fused (persistent) step drops per kernel, and where that figure came from
                "graph_gap_s": self.backend.launch.graph_gap_s,
                "graph_gap_source": self.backend.launch.graph_gap_source}

    def _results(self, wall0: float, wall_run: float) -> Results:
        reps = self.replicas
        kv0 = reps[0].kv
        kv_info = {
            "block_size_tokens": kv0.block_size,
            "hbm_blocks_per_replica": self.hbm_blocks, "dram_blocks_per_replica": self.dram_blocks,
            "nvme_blocks_per_replica": self.nvme_blocks,
            "hbm_bytes_per_block": self.hbm_bytes_per_block, "host_bytes_per_block": self.host_bytes_per_block,
            "hbm_kv_bytes_per_gpu": self.hbm_blocks * self.hbm_bytes_per_block,
            "weight_bytes_per_gpu": self.budget.weight_bytes,
            "draft_weight_bytes_per_gpu": self.draft_footprint.weight_bytes,
            "draft_kv_bytes_per_block": self.draft_footprint.kv_bytes_per_token * kv0.block_size,
            "prefix_hit_tokens": int(sum(r.kv.hit_tokens for r in reps)),
            "prefix_lookup_tokens": int(sum(r.kv.lookup_tokens for r in reps)),
            "hbm_evicted_blocks": int(sum(r.kv.hbm.num_evicted for r in reps)),
        }
        looked = kv_info["prefix_lookup_tokens"]
        hbm_hits = int(sum(int(r.kv.tier_hit_tokens[0]) for r in reps))
        kv_info["hbm_prefix_hit_rate"] = hbm_hits / looked if looked else None
        kv_info["prefix_hit_rate"] = kv_info["prefix_hit_tokens"] / looked if looked else None
        stats = self.cluster.link_stats()
        link_bytes = {
            "pcie_h2d_bytes": int(stats["pcie_h2d"]["bytes"]), "pcie_d2h_bytes": int(stats["pcie_d2h"]["bytes"]),
            "pcie_h2d_transfers": int(stats["pcie_h2d"]["transfers"]),
            "pcie_d2h_transfers": int(stats["pcie_d2h"]["transfers"]),
            "nvme_read_bytes": int(stats["nvme_read"]["bytes"]), "nvme_write_bytes": int(stats["nvme_write"]["bytes"]),
        }
        engine = {
            "replicas": len(reps), "launches": int(sum(r.num_launches for r in reps)),
            "syncs": int(sum(r.num_syncs for r in reps)), "decode_runs": int(sum(r.runs.num_runs for r in reps)),
            "decode_run_steps": int(sum(r.runs.run_steps for r in reps)),
            "swaps_out": int(sum(r.preemption.num_out for r in reps)),
            "swaps_in": int(sum(r.preemption.num_in for r in reps)),
            "swap_copies_dropped": int(sum(r.preemption.num_drops for r in reps)),
            "sm_share": reps[0].builder.sm_share,
            "padded_tokens": int(sum(r.num_padded_tokens for r in reps)),
        }
        cost_notes = self.backend.lookup_report(execution=self.config.policies.execution.name)
        timing = {"wall_s": wall_run, "simulated_s": float(self.env.now), "events": self.events,
                  "events_per_wall_s": self.events / wall_run if wall_run > 0 else None,
                  "requests_per_wall_s": len(self.trace) / wall_run if wall_run > 0 else None,
                  "steps_per_wall_s": sum(r.steps.n for r in reps) / wall_run if wall_run > 0 else None,
                  "decode_runs": engine["decode_runs"]}
        mc = self.config.metrics
        handoffs = self.cluster.handoffs
        extra = None
        if handoffs is not None:
            handoffs.link_starts(self.cluster.transfer_log)
            extra = handoffs.columns()
            link_bytes["network_bytes"] = int(stats.get("network", {}).get("bytes", 0))
        res = build_results(requests=self.requests, trace=self.trace, step_logs=[r.steps for r in reps],
                            token_log=self.cluster.tokens, metadata=self.run_metadata, kv_info=kv_info,
                            link_bytes=link_bytes, link_stats=stats, transfer_log=self.cluster.transfer_log,
                            engine_counts=engine, cost_notes=cost_notes, slo_ttft_s=mc.slo_ttft_s,
                             slo_tpot_s=mc.slo_tpot_s, timing=timing, spill=self.spill, kv_tiers=self._kv_tiers(),
                             speculation=self._speculation_summary() if self.speculating else None,
                             slo_itl_s=mc.slo_itl_s, slo_itl_stat=mc.slo_itl_stat, extra_columns=extra)
        res.summary["execution"] = self._execution_summary(engine)
        if self.config.replica.lanes == "decoupled":
            res.summary["lanes"] = self._lanes_summary()
        if handoffs is not None:
            res.summary["handoff"] = handoffs.summary(res.summary["time"]["makespan_s"],
                                                      [r.steps.busy_s for r in reps])
        res.timing["wall_total_s"] = time.perf_counter() - wall0
        res.timing["sim_to_wall_ratio"] = (res.summary["time"]["makespan_s"] / res.timing["wall_total_s"])
        return res
