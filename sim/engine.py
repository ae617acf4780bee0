"""The simulation: owns the SimPy environment and the run loop, builds the cluster from a config,
replays the trace and assembles the results.

    from sim.config import SimConfig
    from sim.engine import Simulation
    results = Simulation(SimConfig()).run()       # the bundled Azure conv trace, Llama-3.1-8B on H100
    results.write("out/")

The cluster (``sim.cluster``) feeds arrivals from the pre-sorted trace arrays and routes each request
to a replica; each replica runs its own engine-step process (``sim.replica``); transfers run as
processes of their own on the links (``sim.memory.transfers``). Nothing in a run reads a wall clock
except the progress display.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import simpy

import traces
from policies import registry
from sim.cluster import Cluster, policy_rng
from sim.config import SimConfig
from sim.costs.model import TransformerOps
from sim.costs.recipe import load_recipe
from sim.costs.roofline import RooflineBackend
from sim.costs.step import StepCostModel
from sim.costs.table import CostTable, TableBackend, resolve_table_dir
from sim.errors import ConfigError
from sim.hardware.gpu import hbm_budget
from sim.metrics import Results, build_results, spill_dir
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
        for kind in registry.KINDS:
            self.build_policy(kind, -1)
        # ---- costs: one backend per model (the target, and drafters named by speculation plans)
        self.table = None
        if config.costs.backend == "table":
            self.table = CostTable(resolve_table_dir(config.costs.table))
        self._backends: dict[str, object] = {}
        self.backend = self._backend(self.model.name)
        # ---- KV geometry
        bs = rc.block_size_tokens
        kv_token_gpu = 2 * self.model.num_layers * self.ops.kv_heads * self.model.head_dim * self.model.bytes_per_kv
        self.hbm_bytes_per_block = bs * kv_token_gpu
        self.host_bytes_per_block = self.hbm_bytes_per_block * tp
        self.hbm_blocks = budget.kv_bytes // self.hbm_bytes_per_block
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
        self.budget = budget
        # ---- trace
        self.trace = trace if trace is not None else load_trace_for(config)
        self._ran = False

    # ------------------------------------------------------------------ building
    def build_policy(self, kind: str, replica: int):
        """A fresh instance of the configured policy of ``kind`` for one replica (-1: cluster-wide)."""
        pc = getattr(self.config.policies, kind)
        policy = registry.build(kind, pc.name, pc.params)
        policy.attach(policy_rng(self.config.seed, kind, replica))
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
        self.cluster = Cluster(self, env, guarded=self.guarded)
        self.replicas = self.cluster.replicas
        for r in self.replicas:
            r.check_invariants = self.check_invariants
        self.requests = self.cluster.requests
        env.process(self.cluster.arrivals())
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
            "prefix_hit_tokens": int(sum(r.kv.hit_tokens for r in reps)),
            "prefix_lookup_tokens": int(sum(r.kv.lookup_tokens for r in reps)),
            "hbm_evicted_blocks": int(sum(r.kv.hbm.num_evicted for r in reps)),
        }
        looked = kv_info["prefix_lookup_tokens"]
        kv_info["hbm_prefix_hit_rate"] = kv_info["prefix_hit_tokens"] / looked if looked else None
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
        }
        cost_notes = self.backend.lookup_report(execution=self.config.policies.execution.name)
        timing = {"wall_s": wall_run, "simulated_s": float(self.env.now), "events": self.events,
                  "events_per_wall_s": self.events / wall_run if wall_run > 0 else None,
                  "requests_per_wall_s": len(self.trace) / wall_run if wall_run > 0 else None,
                  "steps_per_wall_s": sum(r.steps.n for r in reps) / wall_run if wall_run > 0 else None,
                  "decode_runs": engine["decode_runs"]}
        mc = self.config.metrics
        res = build_results(requests=self.requests, trace=self.trace, step_logs=[r.steps for r in reps],
                            token_log=self.cluster.tokens, metadata=self.metadata(), kv_info=kv_info,
                            link_bytes=link_bytes, link_stats=stats, transfer_log=self.cluster.transfer_log,
                            engine_counts=engine, cost_notes=cost_notes, slo_ttft_s=mc.slo_ttft_s,
                            slo_tpot_s=mc.slo_tpot_s, timing=timing, spill=self.spill,
                            slo_itl_s=mc.slo_itl_s, slo_itl_stat=mc.slo_itl_stat)
        res.timing["wall_total_s"] = time.perf_counter() - wall0
        res.timing["sim_to_wall_ratio"] = (res.summary["time"]["makespan_s"] / res.timing["wall_total_s"])
        return res
