"""The simulation: owns the SimPy environment, builds the cluster from a config, replays the trace.

    from sim.config import SimConfig
    from sim.engine import Simulation
    results = Simulation(SimConfig()).run()       # the bundled Azure conv trace, Llama-3.1-8B on H100
    results.write("out/")

One process feeds arrivals from the pre-sorted trace arrays and routes each request to a replica;
each replica runs its own engine-step process (``sim.replica``); transfers run as processes of their
own on the hardware links. Nothing in a run reads a wall clock except the progress display.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import simpy

import traces
from policies import registry
from sim.config import SimConfig
from sim.costs.model import TransformerOps
from sim.costs.roofline import RooflineBackend
from sim.costs.step import StepCostModel
from sim.costs.table import CostTable, TableBackend, resolve_table_dir
from sim.errors import ConfigError
from sim.hardware.gpu import GPUGroup, hbm_budget
from sim.hardware.links import PCIeLink
from sim.hardware.storage import HostDRAM, NVMeDrive
from sim.memory.tiers import TieredKV, prefix_keys
from sim.metrics import RequestLog, Results, StepLog, TokenLog, build_results, spill_dir
from sim.replica import Replica, exact_delay
from sim.request import Request
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
    """A configured cluster and trace, ready to run once."""

    def __init__(self, config: SimConfig, trace: "traces.Trace | None" = None,
                 progress: Callable[[Progress], None] | None = None) -> None:
        self.config = config
        self.progress = progress
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
        # ---- policies (one instance per kind, shared by replicas: policies are pure)
        pc = config.policies
        self.scheduler = registry.build("scheduling", pc.scheduling.name, pc.scheduling.params)
        self.eviction = registry.build("eviction", pc.eviction.name, pc.eviction.params)
        self.speculation = registry.build("speculation", pc.speculation.name, pc.speculation.params)
        self.execution = registry.build("execution", pc.execution.name, pc.execution.params)
        self.routing = registry.build("routing", pc.routing.name, pc.routing.params)
        self.sparsity = registry.build("sparsity", pc.sparsity.name, pc.sparsity.params)
        # ---- costs
        roofline = RooflineBackend(self.ops, self.gpu)
        self.table = None
        if config.costs.backend == "roofline":
            backend = roofline
        else:
            self.table = CostTable(resolve_table_dir(config.costs.table))
            backend = TableBackend(self.ops, self.gpu, self.table,
                                   roofline if config.costs.fallback == "roofline" else None)
        self.backend = backend
        self.cost = StepCostModel(self.ops, backend, self.execution)
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
    def _pcie_params(self) -> tuple[float, float, float]:
        spec = self.gpu.pcie
        h2d = (spec.latency_s, spec.h2d_bandwidth_bytes_per_s)
        d2h = (spec.latency_s, spec.d2h_bandwidth_bytes_per_s)
        if self.table is not None:
            h2d = self.table.link("pcie_h2d") or h2d
            d2h = self.table.link("pcie_d2h") or d2h
        return h2d[1], d2h[1], max(h2d[0], d2h[0])

    def _build(self, env: simpy.Environment) -> None:
        rc = self.config.replica
        n = len(self.trace)
        self.requests = RequestLog(n)
        self.spill = spill_dir()
        self.replicas: list[Replica] = []
        h2d_bw, d2h_bw, lat = self._pcie_params()
        max_prompt = getattr(self.scheduler, "max_prompt_tokens", lambda m: m)(self.max_model_len)
        for i in range(self.config.cluster.num_replicas):
            kv = TieredKV(block_size=rc.block_size_tokens, hbm_blocks=self.hbm_blocks,
                          dram_blocks=self.dram_blocks, nvme_blocks=self.nvme_blocks,
                          hbm_bytes_per_block=self.hbm_bytes_per_block,
                          host_bytes_per_block=self.host_bytes_per_block,
                          prefix_caching=rc.prefix_caching, eviction=self.eviction)
            gpu = GPUGroup(env, self.gpu, rc.tensor_parallel_size)
            reserved = self.execution.reserved_sms(self.gpu.sm_count)
            if reserved:
                gpu.sms.get(reserved)
            pcie = PCIeLink(env, f"replica{i}.pcie", h2d_bw, d2h_bw, lat, lanes=rc.tensor_parallel_size)
            replica = Replica(
                env=env, replica_id=i, kv=kv, cost=self.cost, gpu=gpu, pcie=pcie, scheduler=self.scheduler,
                speculation=self.speculation, sparsity=self.sparsity, preemption_mode=rc.preemption_mode,
                max_model_len=self.max_model_len, max_prompt_tokens=max_prompt, requests=self.requests,
                step_log=StepLog(self.config.metrics.step_log, i, self.spill / f"steps-replica{i}.parquet",
                                 tuple(p.num_blocks * p.bytes_per_block for p in kv.pools)),
                token_log=TokenLog(),
                rng=np.random.default_rng([self.config.seed, i]), bulk_decode=rc.bulk_decode)
            replica.dram = HostDRAM(env, f"replica{i}", self.server)
            replica.nvme = NVMeDrive(env, f"replica{i}", self.server)
            self.replicas.append(replica)

    def _arrivals(self, env: simpy.Environment):
        tr = self.trace
        t = tr.arrival_s
        n = len(tr)
        prompt, output, rid = tr.prompt_tokens, tr.output_tokens, tr.request_id
        prio = tr.priority
        hashed = tr.hash_offsets is not None and self.config.replica.prefix_caching
        hbt = tr.hash_block_tokens or 0
        bs = self.config.replica.block_size_tokens
        replicas = self.replicas
        views = [r.state_view for r in replicas]
        cursor = [0]

        def next_arrival() -> float:
            return float(t[cursor[0]]) if cursor[0] < n else float("inf")

        for r in replicas:
            r.next_arrival_s = next_arrival
        route = self.routing.route
        needs_state = getattr(self.routing, "needs_state", False)
        i = 0
        while i < n:
            target = float(t[i])
            if target > env.now:
                yield env.timeout(exact_delay(env.now, target))
            now = env.now
            while i < n and t[i] <= now:
                keys = None
                if hashed:
                    keys = prefix_keys(tr.block_hashes(i), hbt, int(prompt[i]), bs)
                req = Request(idx=i, req_id=int(rid[i]), arrival_s=float(t[i]), prompt_tokens=int(prompt[i]),
                              output_tokens=int(output[i]), priority=int(prio[i]) if prio is not None else 0,
                              hash_keys=keys)
                if needs_state:
                    for r in replicas:
                        r.sync(now)
                k = route(req, views, now)
                if not 0 <= k < len(replicas):
                    raise RuntimeError(f"routing policy {self.routing.name!r} chose replica {k} of "
                                       f"{len(replicas)}")
                replicas[k].submit(req)
                i += 1
                cursor[0] = i

    # ------------------------------------------------------------------ running
    def run(self) -> Results:
        if self._ran:
            raise RuntimeError("a Simulation runs once; build a new one")
        self._ran = True
        wall0 = time.perf_counter()
        env = simpy.Environment()
        self.env = env
        self._build(env)
        env.process(self._arrivals(env))
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
        results = self._results(wall0, wall_run)
        return results

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
        link_bytes = {
            "pcie_h2d_bytes": int(sum(r.pcie.h2d.bytes_moved for r in reps)),
            "pcie_d2h_bytes": int(sum(r.pcie.d2h.bytes_moved for r in reps)),
            "pcie_h2d_transfers": int(sum(r.pcie.h2d.num_transfers for r in reps)),
            "pcie_d2h_transfers": int(sum(r.pcie.d2h.num_transfers for r in reps)),
            "nvme_read_bytes": int(sum(r.nvme.read.bytes_moved for r in reps)),
            "nvme_write_bytes": int(sum(r.nvme.write.bytes_moved for r in reps)),
        }
        engine = {
            "replicas": len(reps), "launches": int(sum(r.num_launches for r in reps)),
            "syncs": int(sum(r.num_syncs for r in reps)), "decode_runs": int(sum(r.num_runs for r in reps)),
            "decode_run_steps": int(sum(r.run_steps for r in reps)),
            "swaps_out": int(sum(r.num_swaps_out for r in reps)), "swaps_in": int(sum(r.num_swaps_in for r in reps)),
            "swap_copies_dropped": int(sum(r.num_swap_drops for r in reps)),
        }
        cost_notes = {"extrapolated_lookups": dict(sorted(self.backend.extrapolations.items()))}
        timing = {"wall_s": wall_run, "simulated_s": float(self.env.now), "events": self.events,
                  "events_per_wall_s": self.events / wall_run if wall_run > 0 else None,
                  "requests_per_wall_s": len(self.trace) / wall_run if wall_run > 0 else None,
                  "steps_per_wall_s": sum(r.steps.n for r in reps) / wall_run if wall_run > 0 else None,
                  "decode_runs": engine["decode_runs"]}
        mc = self.config.metrics
        res = build_results(requests=self.requests, trace=self.trace, step_logs=[r.steps for r in reps],
                            token_logs=[r.tokens for r in reps], metadata=self.metadata(), kv_info=kv_info,
                            link_bytes=link_bytes, engine_counts=engine, cost_notes=cost_notes,
                            slo_ttft_s=mc.slo_ttft_s, slo_tpot_s=mc.slo_tpot_s, timing=timing, spill=self.spill)
        res.timing["wall_total_s"] = time.perf_counter() - wall0
        res.timing["sim_to_wall_ratio"] = (res.summary["time"]["makespan_s"] / res.timing["wall_total_s"])
        return res
