"""Run configuration: frozen, slotted, keyword-only dataclasses loaded from TOML; validated, no I/O.

A config file mirrors these sections (every key optional; defaults reproduce ``tiersim run``)::

    seed = 0
    [trace]      bundled = "azure-conv" | path = "..." + format = "azure"; rate_scale, max_requests, ...;
                 for csv/parquet files columns = {arrival_s = "ts", ...}, time_unit, time_format
    [model]      name = "llama-3.1-8b"
    [hardware]   gpu = "h100-sxm-80gb", server = "dgx-h100"
    [cluster]    num_replicas = 1; prefill_replicas = N for N prefill-only replicas (the rest decode), the
                 hand-off link (handoff_bandwidth_bytes_per_s, handoff_latency_s), decode_routing
    [replica]    block_size_tokens, gpu_memory_utilization, preemption_mode, tensor_parallel_size, ...
    [costs]      backend = "table" | "roofline", table = "h100-sxm-80gb" or a directory,
                 fallback = "generalise" | "roofline" | "error", recipe = "fused" | "torch-unfused" | a .toml
    [policies.scheduling] name = "fcfs", plus that policy's own keys (and likewise for every kind)
    [metrics]    SLO thresholds for goodput, step log on/off
    [output]     dir

Sweeps derive variants with :func:`with_overrides` (dotted keys) or ``dataclasses.replace``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from policies.registry import DEFAULTS as DEFAULT_POLICIES
from policies.registry import KINDS as POLICY_KINDS
from sim.errors import ConfigError, did_you_mean

# bytes per KV element; int4 carries an fp16 scale and zero point per group of 32 (KIVI, ICML 2024)
KV_DTYPE_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int4": 0.5 + 4.0 / 32}


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _finite(key: str, value: float) -> None:
    _check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), key,
           f"must be a finite number (got {value!r})")


# A change of rate beyond a million-fold either way is a typo, not an experiment: compressed further,
# inter-arrival gaps of real traces (~1e-7 s) fall below the resolution of simulated time near a step;
# stretched further, an hour-long trace spans more than the 1e9 s that float64 time resolves steps in.
RATE_SCALE_RANGE = (1e-6, 1e6)
MAX_BLOCK_SIZE_TOKENS = 2**20                       # more than any model's context window
MAX_ACTIVATION_RESERVE_BYTES = 2**40                # 1 TiB: more memory than any GPU has
MAX_TENSOR_PARALLEL_SIZE = 64
MAX_NUM_REPLICAS = 1024                             # each replica is a full engine with its own block pools


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceConfig:
    """Which requests to replay. ``bundled`` names a trace shipped with tiersim; ``path`` overrides it.

    ``columns``, ``time_unit`` and ``time_format`` read any CSV or Parquet file (format "csv" or
    "parquet", implied by ``columns``): ``columns`` maps canonical names (arrival_s, prompt_tokens,
    output_tokens, and optionally request_id, session_id, tenant, priority, block_hashes) to the file's
    columns. ``hash_block_tokens`` is the prefix-hash block size of a mooncake or parquet file.
    ``columns`` is a plain dict (so config files and ``--set trace.columns.arrival_s=...`` can build it);
    treat it as read-only.
    """

    bundled: str = "azure-conv"     # a trace shipped with tiersim (tiersim list traces)
    path: str = ""                   # a trace file (or a bundled name); overrides bundled
    format: str = ""                 # azure, mooncake, burstgpt, csv, parquet; "" = detected from the file
    rate_scale: float = 1.0          # time compression: 8.0 replays the trace at 8x its rate
    max_requests: int = 0            # 0 = all
    start_s: float = 0.0             # time window [start_s, end_s) of the trace; end 0 = to the end
    end_s: float = 0.0               # end of the time window, seconds; 0 = to the end of the trace
    repeat: int = 1                  # concatenate the trace this many times, shifted in time
    max_total_tokens: int = 0        # > 0: shorten prompts so prompt + output fits, as Vidur's trace
                                     # replay does (its default is 4096); 0 = leave requests as they are
    synthetic: str = ""              # e.g. "poisson rate=5 n=1000 prompt=lognormal:1024:0.8 output=fixed:128"
    columns: dict[str, str] = field(default_factory=dict)   # csv/parquet: canonical name -> the file's column
    time_unit: str = ""              # csv/parquet arrival column: "s" (the default), "ms", "us", "ns", "datetime"
    time_format: str = ""            # with time_unit = "datetime": a strptime format ("" infers it)
    hash_block_tokens: int = 0       # tokens per prefix-hash block; 0 = the file's (parquet metadata, mooncake 512)

    def __post_init__(self) -> None:
        from traces.io import FORMATS
        from traces.schema import CANONICAL_NAMES as CANONICAL_COLUMNS
        from traces.schema import MAX_ARRIVAL_S, MAX_TOKENS, TIME_UNITS

        for key in ("rate_scale", "start_s", "end_s"):
            _finite(f"trace.{key}", getattr(self, key))
        lo, hi = RATE_SCALE_RANGE
        _check(self.rate_scale > 0, "trace.rate_scale", f"must be > 0 (got {self.rate_scale})")
        _check(lo <= self.rate_scale <= hi, "trace.rate_scale",
               f"must be in [{lo:g}, {hi:g}] (got {self.rate_scale:g}): a change of rate beyond a million-fold "
               "collapses inter-arrival gaps or stretches the trace past the 1e9 s float64 time resolves steps in")
        _check(self.max_requests >= 0, "trace.max_requests", f"must be >= 0 (got {self.max_requests})")
        if self.synthetic:      # a run replays one workload: a synthetic one does not quietly replace a named trace
            named = self.path or (self.bundled if self.bundled != "azure-conv" else "")
            _check(not named, "trace.synthetic",
                   f"is set and so is the trace {named!r} (trace.{'path' if self.path else 'bundled'}); a run "
                   "replays one workload: drop --trace (or set trace.path = \"\") to run the synthetic one")
        _check(self.start_s >= 0, "trace.start_s", f"must be >= 0 (got {self.start_s})")
        _check(self.end_s >= 0, "trace.end_s", f"must be >= 0 (got {self.end_s})")
        for key in ("start_s", "end_s"):
            _check(getattr(self, key) <= MAX_ARRIVAL_S, f"trace.{key}",
                   f"must be <= {MAX_ARRIVAL_S:.0e} s, the longest a trace may span (got {getattr(self, key):g})"
                   .replace("e+0", "e"))
        _check(self.end_s == 0 or self.end_s > self.start_s, "trace.end_s",
               f"must be > trace.start_s ({self.start_s}) (got {self.end_s})")
        _check(self.repeat >= 1, "trace.repeat", f"must be >= 1 (got {self.repeat})")
        _check(self.max_total_tokens == 0 or self.max_total_tokens >= 2, "trace.max_total_tokens",
               f"must be 0 (off) or >= 2 (got {self.max_total_tokens})")
        _check(self.repeat <= 10**6, "trace.repeat", f"must be <= 1,000,000 (got {self.repeat:,})")
        _check(isinstance(self.columns, Mapping), "trace.columns",
               'expected a table such as {arrival_s = "ts", prompt_tokens = "in", output_tokens = "out"} '
               f"(got {self.columns!r})")
        for canonical, source in self.columns.items():
            _check(canonical in CANONICAL_COLUMNS, f"trace.columns.{canonical}",
                   f"unknown canonical column (known: {', '.join(CANONICAL_COLUMNS)})")
            _check(isinstance(source, str) and source != "", f"trace.columns.{canonical}",
                   f"expected the name of a column in the file (got {source!r})")
        object.__setattr__(self, "columns", dict(self.columns))
        _check(self.time_unit in ("", *TIME_UNITS), "trace.time_unit",
               f"must be one of {', '.join(TIME_UNITS)} (got {self.time_unit!r})")
        _check(not self.time_format or self.time_unit == "datetime", "trace.time_format",
               f'is only used with trace.time_unit = "datetime" (got trace.time_unit = {self.time_unit!r})')
        _check(0 <= self.hash_block_tokens <= MAX_TOKENS, "trace.hash_block_tokens",
               f"must be 0 (the file's) or a block size in [1, {MAX_TOKENS:,}] tokens (got {self.hash_block_tokens})")
        _check(self.format in ("", *FORMATS), "trace.format",
               f"must be one of {', '.join(FORMATS)} (got {self.format!r})")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    name: str = "llama-3.1-8b"      # a model preset (tiersim list models) or a path to your own TOML


@dataclass(frozen=True, slots=True, kw_only=True)
class HardwareConfig:
    gpu: str = "h100-sxm-80gb"      # a GPU preset (tiersim list gpus): SMs, HBM, PCIe
    server: str = "dgx-h100"        # a server preset (tiersim list servers): host DRAM and NVMe per GPU


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterConfig:
    """Replicas, and the KV store they share (Mooncake Store / LMCache-like; 0 bytes = none): every
    replica looks it up after its own tiers and reads or writes it over its NIC (``net_read`` /
    ``net_write``, at the store bandwidth per replica, then PCIe).

    Prefill/decode disaggregation (DistServe, OSDI 2024; Splitwise, ISCA 2024; Mooncake, FAST 2025):
    with ``prefill_replicas`` = N > 0 the first N replicas only prefill (the router picks among them)
    and the other ``num_replicas - N`` only decode. A prefilled request samples its first token on its
    prefill replica, then its KV crosses the network to a decode replica (``decode_routing`` picks one
    with room) as one transfer at ``handoff_bandwidth_bytes_per_s`` per GPU (``sim.handoff``).
    """

    num_replicas: int = 1           # serving instances behind the router
    shared_kv_bytes: int = 0                         # capacity of the KV store the replicas share (0: none)
    shared_kv_bandwidth_bytes_per_s: float = 50e9    # one 400 Gb/s NIC per GPU (DGX H100's ConnectX-7)
    shared_kv_latency_s: float = 10e-6               # per copy to or from the store (one RDMA round trip)
    prefill_replicas: int = 0       # > 0: the first N replicas prefill only, the rest decode only; 0 = mixed
    handoff_bandwidth_bytes_per_s: float = 0.0       # KV hand-off link per GPU; 0 = the GPU's NVLink (one node,
                                                     # as DistServe places its pairs; 50e9 if the preset has
                                                     # none); across nodes RDMA: 25e9-50e9 (200-400 Gb/s NICs,
                                                     # Mooncake's Transfer Engine)
    handoff_latency_s: float = 5e-6                  # per hand-off transfer (a peer copy's setup, a few us)
    decode_routing: str = "most-free-kv"             # routing policy that picks the decode replica of a hand-off
                                                     # among those with room (tiersim list policies)
    decode_max_running: int = 256   # requests a decode replica holds (running + arriving) before hand-offs
                                    # to it wait (vLLM's max_num_seqs)

    def __post_init__(self) -> None:
        _check(1 <= self.num_replicas <= MAX_NUM_REPLICAS, "cluster.num_replicas",
               f"must be in [1, {MAX_NUM_REPLICAS}] (got {self.num_replicas:,})")
        _check(self.prefill_replicas >= 0, "cluster.prefill_replicas",
               f"must be >= 0 (0 = every replica serves whole requests) (got {self.prefill_replicas})")
        _check(self.prefill_replicas < self.num_replicas, "cluster.prefill_replicas",
               f"{self.prefill_replicas} prefill replicas of cluster.num_replicas = {self.num_replicas} leave no "
               f"decode replica: raise cluster.num_replicas above {self.prefill_replicas}, or set "
               f"cluster.prefill_replicas = 0 for mixed replicas")
        _finite("cluster.handoff_bandwidth_bytes_per_s", self.handoff_bandwidth_bytes_per_s)
        _check(self.handoff_bandwidth_bytes_per_s >= 0, "cluster.handoff_bandwidth_bytes_per_s",
               f"must be >= 0 (0 = the GPU's NVLink) (got {self.handoff_bandwidth_bytes_per_s})")
        _finite("cluster.handoff_latency_s", self.handoff_latency_s)
        _check(self.handoff_latency_s >= 0, "cluster.handoff_latency_s",
               f"must be >= 0 (got {self.handoff_latency_s})")
        _check(isinstance(self.decode_routing, str) and bool(self.decode_routing), "cluster.decode_routing",
               f"must name a routing policy (got {self.decode_routing!r})")
        _check(self.decode_max_running >= 1, "cluster.decode_max_running",
               f"must be >= 1 (got {self.decode_max_running})")
        _check(self.shared_kv_bytes >= 0, "cluster.shared_kv_bytes", f"must be >= 0 (got {self.shared_kv_bytes})")
        _check(self.shared_kv_bandwidth_bytes_per_s > 0, "cluster.shared_kv_bandwidth_bytes_per_s",
               f"must be > 0 (got {self.shared_kv_bandwidth_bytes_per_s})")
        _check(self.shared_kv_latency_s >= 0, "cluster.shared_kv_latency_s",
               f"must be >= 0 (got {self.shared_kv_latency_s})")
        if self.prefill_replicas == 0:      # hand-off settings would be silently unused
            for f in dataclasses.fields(self):
                if f.name.startswith(("handoff_", "decode_")) and getattr(self, f.name) != f.default:
                    raise ConfigError(f"cluster.{f.name}: configures the KV hand-off from prefill to decode "
                                      "replicas, and cluster.prefill_replicas = 0 (mixed replicas) makes none; "
                                      "set cluster.prefill_replicas, or remove the key")


@dataclass(frozen=True, slots=True, kw_only=True)
class ReplicaConfig:
    """One serving instance: memory layout and engine limits.

    HBM left for KV = hbm_bytes * gpu_memory_utilization - weights/tp - activation_reserve_bytes.
    ``dram_kv_bytes``/``nvme_kv_bytes`` size the lower KV tiers (swap space, and the prefix cache's
    lower tiers when the residency policy keeps blocks there). ``kv_tier_mode``: ``"inclusive"`` (a lower
    tier keeps a copy of what it pushed up) or ``"exclusive"`` (a block lives in one tier at a time).
    ``kv_dtype`` overrides the model's KV element size everywhere (capacity, transfer bytes, attention
    time): ``"bf16"``/``"fp16"`` 2 bytes, ``"fp8"`` 1, ``"int4"`` 0.625 (4 bits plus an fp16 scale and an
    fp16 zero point per group of 32 elements, KIVI's layout: Liu et al., ICML 2024); ``""`` keeps the
    model's.
    """

    tensor_parallel_size: int = 1           # GPUs per replica (weights and KV heads split across them)
    block_size_tokens: int = 16             # tokens per paged-KV block
    gpu_memory_utilization: float = 0.90    # fraction of HBM the engine may use (weights + KV + activations)
    activation_reserve_bytes: int = 2 * 1024**3   # HBM kept for activations, per GPU
    max_model_len: int = 0                  # 0 = the model's context window
    preemption_mode: str = "recompute"      # or "swap" (to DRAM over PCIe)
    prefix_caching: bool = True             # needs block hashes in the trace to hit
    dram_kv_bytes: int = 64 * 1024**3       # host DRAM for KV (swap space, offload target), per replica
    nvme_kv_bytes: int = 0                  # NVMe for KV, per replica; 0 = no NVMe tier
    num_hbm_blocks: int = 0                 # > 0: use exactly this many HBM KV blocks (like vLLM's
                                            # num_gpu_blocks_override), capped by what fits
    bulk_decode: bool = True                # advance predictable decode steps together (exact)
    kv_tier_mode: str = "inclusive"         # or "exclusive"
    kv_dtype: str = ""                      # "" (the model's), "bf16", "fp16", "fp8", "int4"
    prefill_sm_fraction: float = 0.0        # > 0: a mixed step's prefill runs on this share of the SMs
                                            # while its decodes run on the rest, concurrently (Nexus-style
                                            # lanes); 0: one stream, the phases time-multiplexed
    # how the lanes run: "lockstep" (each mixed step's two lanes end together: StepCostModel.lanes_step)
    # or "decoupled" (Nexus-style, Shi et al. arXiv 2507.06608: a prefill lane and a decode lane, two
    # independent step streams over one KV pool, sharing HBM bandwidth: sim.replica.lanes)
    lanes: str = "lockstep"
    lanes_partition: str = "static"         # decoupled lanes' SM split: "static" (prefill_sm_fraction) or
                                            # "adaptive" (chosen per prefill step from the decode batch)
    lanes_itl_slo_s: float = 0.05           # adaptive: the decode step time the decode lane's share must
                                            # meet (a 50 ms TBT SLO: our choice; set your own SLO)

    def __post_init__(self) -> None:
        _check(math.isfinite(self.prefill_sm_fraction) and 0.0 <= self.prefill_sm_fraction < 1.0,
               "replica.prefill_sm_fraction",
               f"must be in [0, 1): the prefill lane's share of the SMs, 0 for none (got {self.prefill_sm_fraction})")
        _check(self.lanes in ("lockstep", "decoupled"), "replica.lanes",
               f"must be 'lockstep' or 'decoupled' (got {self.lanes!r})")
        _check(self.lanes_partition in ("static", "adaptive"), "replica.lanes_partition",
               f"must be 'static' or 'adaptive' (got {self.lanes_partition!r})")
        _check(self.lanes_partition == "static" or self.lanes == "decoupled", "replica.lanes_partition",
               "'adaptive' partitions decoupled lanes: set replica.lanes = 'decoupled'")
        _check(math.isfinite(self.lanes_itl_slo_s) and self.lanes_itl_slo_s > 0, "replica.lanes_itl_slo_s",
               f"must be a positive number of seconds (got {self.lanes_itl_slo_s})")
        slo_default = next(f.default for f in dataclasses.fields(self) if f.name == "lanes_itl_slo_s")
        _check(self.lanes_partition == "adaptive" or self.lanes_itl_slo_s == slo_default, "replica.lanes_itl_slo_s",
               "is the step time an adaptive partition holds decodes to; with replica.lanes_partition = "
               "'static' it is unused: set lanes_partition = 'adaptive', or remove the key")
        if self.lanes == "decoupled":
            if self.lanes_partition == "static":
                _check(self.prefill_sm_fraction > 0.0, "replica.prefill_sm_fraction",
                       "decoupled lanes with a static partition need the prefill lane's share of the SMs, in "
                       "(0, 1) (or set replica.lanes_partition = 'adaptive')")
            else:
                _check(self.prefill_sm_fraction == 0.0, "replica.prefill_sm_fraction",
                       "is chosen per prefill step by replica.lanes_partition = 'adaptive': leave it 0")
            _check(self.preemption_mode == "recompute", "replica.preemption_mode",
                   "decoupled lanes support 'recompute' only (a swap-out would race the other lane's step)")
        _check(1 <= self.tensor_parallel_size <= MAX_TENSOR_PARALLEL_SIZE, "replica.tensor_parallel_size",
               f"must be in [1, {MAX_TENSOR_PARALLEL_SIZE}] (got {self.tensor_parallel_size})")
        _check(self.block_size_tokens >= 1, "replica.block_size_tokens",
               f"must be >= 1 (got {self.block_size_tokens})")
        _check(self.block_size_tokens <= MAX_BLOCK_SIZE_TOKENS, "replica.block_size_tokens",
               f"must be <= {MAX_BLOCK_SIZE_TOKENS:,}, longer than any model's context window "
               f"(got {self.block_size_tokens:,})")
        _finite("replica.gpu_memory_utilization", self.gpu_memory_utilization)
        _check(0 < self.gpu_memory_utilization <= 1, "replica.gpu_memory_utilization",
               f"must be in (0, 1] (got {self.gpu_memory_utilization})")
        _check(0 <= self.activation_reserve_bytes <= MAX_ACTIVATION_RESERVE_BYTES, "replica.activation_reserve_bytes",
               f"must be in [0, {MAX_ACTIVATION_RESERVE_BYTES:,}] (1 TiB) (got {self.activation_reserve_bytes:,})")
        _check(self.max_model_len >= 0, "replica.max_model_len", f"must be >= 0 (got {self.max_model_len})")
        _check(self.preemption_mode in ("recompute", "swap"), "replica.preemption_mode",
               f"must be 'recompute' or 'swap' (got {self.preemption_mode!r})")
        _check(self.dram_kv_bytes >= 0, "replica.dram_kv_bytes", f"must be >= 0 (got {self.dram_kv_bytes})")
        _check(self.nvme_kv_bytes >= 0, "replica.nvme_kv_bytes", f"must be >= 0 (got {self.nvme_kv_bytes})")
        _check(self.num_hbm_blocks >= 0, "replica.num_hbm_blocks", f"must be >= 0 (got {self.num_hbm_blocks})")
        _check(self.kv_tier_mode in ("inclusive", "exclusive"), "replica.kv_tier_mode",
               f"must be 'inclusive' or 'exclusive' (got {self.kv_tier_mode!r})")
        _check(self.kv_dtype in KV_DTYPE_BYTES or self.kv_dtype == "", "replica.kv_dtype",
               f"must be one of {', '.join(repr(k) for k in KV_DTYPE_BYTES)} or '' (got {self.kv_dtype!r})")


@dataclass(frozen=True, slots=True, kw_only=True)
class CostsConfig:
    """Where step costs come from. ``table`` is a shipped table name or a directory made by calibrate."""

    backend: str = "table"                  # "table" | "roofline"
    table: str = "h100-sxm-80gb"            # a shipped table (tiersim list tables) or a calibrate directory
    # what a table does for an op it has not measured at the model's shape: "generalise" (from the
    # GPU's other measurements, sim.costs.generalise), "roofline" (the GPU spec), "error"
    fallback: str = "generalise"
    recipe: str = "fused"                   # the engine's kernels per op: a shipped recipe or a .toml path

    def __post_init__(self) -> None:
        _check(self.backend in ("table", "roofline"), "costs.backend",
               f"must be 'table' or 'roofline' (got {self.backend!r})")
        _check(self.fallback in ("generalise", "roofline", "error"), "costs.fallback",
               f"must be 'generalise', 'roofline' or 'error' (got {self.fallback!r})")
        _check(isinstance(self.recipe, str) and bool(self.recipe), "costs.recipe",
               f"must be a recipe name or path (got {self.recipe!r})")


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyConfig:
    """One policy choice: its registered name and its own parameters (validated by the policy)."""

    name: str
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def to_dict(self) -> dict:
        return {"name": self.name, **dict(self.params)}


@dataclass(frozen=True, slots=True, kw_only=True)
class PoliciesConfig:
    scheduling: PolicyConfig = PolicyConfig(name=DEFAULT_POLICIES["scheduling"])
    eviction: PolicyConfig = PolicyConfig(name=DEFAULT_POLICIES["eviction"])
    residency: PolicyConfig = PolicyConfig(name=DEFAULT_POLICIES["residency"])
    speculation: PolicyConfig = PolicyConfig(name=DEFAULT_POLICIES["speculation"])
    execution: PolicyConfig = PolicyConfig(name=DEFAULT_POLICIES["execution"])
    routing: PolicyConfig = PolicyConfig(name=DEFAULT_POLICIES["routing"])
    sparsity: PolicyConfig = PolicyConfig(name=DEFAULT_POLICIES["sparsity"])


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsConfig:
    """SLOs for goodput. A finished request is good when its TTFT <= ``slo_ttft_s``, its TPOT (the mean
    time per output token after the first, as vLLM's benchmark and DistServe define it) <=
    ``slo_tpot_s``, and, when ``slo_itl_s`` > 0, its own ``slo_itl_stat`` of its inter-token gaps
    ("p99" or "max": a per-token bound like Sarathi-Serve's P99 TBT, which a mean hides: one 385 s
    stall among many fast tokens keeps the mean low) <= ``slo_itl_s``. 0 switches a bound off."""

    slo_ttft_s: float = 2.0                 # time to first token, seconds
    slo_tpot_s: float = 0.1                 # mean time per output token after the first, seconds; 0 = off
    slo_itl_s: float = 0.0                  # per-request inter-token latency bound, seconds; 0 = off
    slo_itl_stat: str = "p99"               # which of a request's token gaps slo_itl_s bounds: "p99", "max",
                                            # "p50" or "mean"
    step_log: bool = True                   # write steps.parquet (one row per engine step)

    def __post_init__(self) -> None:
        _finite("metrics.slo_ttft_s", self.slo_ttft_s)
        _finite("metrics.slo_tpot_s", self.slo_tpot_s)
        _finite("metrics.slo_itl_s", self.slo_itl_s)
        _check(self.slo_ttft_s > 0, "metrics.slo_ttft_s", f"must be > 0 (got {self.slo_ttft_s})")
        _check(self.slo_tpot_s >= 0, "metrics.slo_tpot_s", f"must be >= 0 (0 = off) (got {self.slo_tpot_s})")
        _check(self.slo_itl_s >= 0, "metrics.slo_itl_s", f"must be >= 0 (0 = off) (got {self.slo_itl_s})")
        _check(self.slo_itl_stat in ITL_STATS, "metrics.slo_itl_stat",
               f"must be one of {', '.join(ITL_STATS)} (got {self.slo_itl_stat!r})")
        _check(self.slo_itl_s > 0 or self.slo_itl_stat == "p99", "metrics.slo_itl_stat",
               f"= {self.slo_itl_stat!r} picks the statistic metrics.slo_itl_s bounds, and slo_itl_s = 0 "
               "(no ITL SLO); set metrics.slo_itl_s")


ITL_STATS = ("p99", "max", "p50", "mean")   # per-request ITL statistics (requests.parquet: itl_<stat>_s)


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputConfig:
    dir: str = "tiersim-results"    # results directory of tiersim run (--out); never overwritten without --force

    def __post_init__(self) -> None:     # "" would be the current directory, which is never meant
        _check(str(self.dir).strip() != "", "output.dir",
               "an empty path; name the results directory (or leave output.dir out for the default, "
               "tiersim-results)")


_LANES_KEYS = ("lanes", "lanes_partition", "lanes_itl_slo_s")
_LANES_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ReplicaConfig) if f.name in _LANES_KEYS}


@dataclass(frozen=True, slots=True, kw_only=True)
class SimConfig:
    seed: int = 0                    # seeds every policy's random generator and synthetic traces
    plugins: tuple[str, ...] = ()    # policy plugins (a .py file or a module) loaded before the run
    trace: TraceConfig = TraceConfig()
    model: ModelConfig = ModelConfig()
    hardware: HardwareConfig = HardwareConfig()
    cluster: ClusterConfig = ClusterConfig()
    replica: ReplicaConfig = ReplicaConfig()
    costs: CostsConfig = CostsConfig()
    policies: PoliciesConfig = PoliciesConfig()
    metrics: MetricsConfig = MetricsConfig()
    output: OutputConfig = OutputConfig()

    # ---------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        out: dict[str, Any] = {"seed": self.seed}
        if self.plugins:     # only when set: configs without plugins keep their hash and TOML
            out["plugins"] = list(self.plugins)
        for f in dataclasses.fields(self):
            if f.name in ("seed", "plugins"):
                continue
            section = getattr(self, f.name)
            if f.name == "policies":
                out["policies"] = {k: getattr(section, k).to_dict() for k in POLICY_KINDS}
            else:
                out[f.name] = dataclasses.asdict(section)
        if all(getattr(self.replica, k) == d for k, d in _LANES_DEFAULTS.items()):
            # the decoupled-lanes keys only when set: configs without them keep their hash and TOML (and
            # one that sets any of them, even with lock-step lanes, writes them all and reads back the same)
            for k in _LANES_KEYS:
                out["replica"].pop(k)
        return out

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def hash(self) -> str:
        """sha256 of the canonical JSON of everything that affects results (not the output dir)."""
        d = self.to_dict()
        d.pop("output", None)
        return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def to_toml(self) -> str:
        return _dump_toml(self.to_dict()) + "\n"


SECTIONS = {"trace": TraceConfig, "model": ModelConfig, "hardware": HardwareConfig,
            "cluster": ClusterConfig, "replica": ReplicaConfig, "costs": CostsConfig,
            "metrics": MetricsConfig, "output": OutputConfig}


def _coerce(cls, key: str, name: str, value: Any) -> Any:
    """Check one value against the dataclass field's type; ints are accepted for floats, floats must be
    finite (nan and inf are never a sensible setting) and tables are accepted for dict fields."""
    ftype = str({f.name: f.type for f in dataclasses.fields(cls)}[name])
    if ftype.startswith("dict"):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table such as {{arrival_s = \"ts\"}}, got "
                              f"{type(value).__name__} ({_short(value)})")
        return dict(value)
    expected = {"int": int, "float": (int, float), "str": str, "bool": bool}.get(ftype)
    if expected is None:
        return value
    if isinstance(value, bool) and ftype != "bool":
        raise ConfigError(f"{key}: expected {ftype}, got a boolean ({value!r})")
    if not isinstance(value, expected):
        raise ConfigError(f"{key}: expected {ftype}, got {type(value).__name__} ({_short(value)})")
    if ftype == "float" and not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number (got {value!r})")
    return float(value) if ftype == "float" else value


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _section(cls, data: Any, where: str):
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a table of keys, got {type(data).__name__} ({_short(data)})")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        hint = did_you_mean(unknown[0], names)
        # a close match is the answer; the whole list only when there is none (`tiersim config
        # --defaults` prints every key with its default and meaning)
        raise ConfigError(f"{where}.{unknown[0]}: unknown key{hint}" + (
            " (tiersim config --defaults lists every key)" if hint else
            f" (known keys of [{where}]: {', '.join(names)})"))
    values = {k: _coerce(cls, f"{where}.{k}", k, v) for k, v in data.items()}
    return cls(**values)


def from_dict(data: Mapping[str, Any], source: str = "config") -> SimConfig:
    """Build and validate a SimConfig from nested mappings (a parsed TOML file)."""
    known = {"seed", "plugins", "policies", *SECTIONS}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown section or key {unknown[0]!r} "
                          f"(known: {', '.join(sorted(known))})")
    kwargs: dict[str, Any] = {}
    if "seed" in data:
        seed = data["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed: expected a non-negative integer (got {seed!r})")
        kwargs["seed"] = seed
    if "plugins" in data:
        plugins = data["plugins"]
        if isinstance(plugins, str):
            plugins = [plugins]
        if not isinstance(plugins, (list, tuple)) or not all(isinstance(p, str) and p for p in plugins):
            raise ConfigError(f"plugins: expected a list of plugin files or modules (got {_short(plugins)})")
        kwargs["plugins"] = tuple(plugins)
    for name, cls in SECTIONS.items():
        if name in data:
            kwargs[name] = _section(cls, data[name], name)
    if "policies" in data:
        pol = data["policies"]
        if not isinstance(pol, Mapping):
            raise ConfigError("policies: expected [policies.<kind>] tables")
        bad = sorted(set(pol) - set(POLICY_KINDS))
        if bad:
            raise ConfigError(f"policies.{bad[0]}: unknown policy kind (known: {', '.join(POLICY_KINDS)})")
        chosen = {}
        for kind, section in pol.items():
            if isinstance(section, str):
                section = {"name": section}
            if not isinstance(section, Mapping):
                raise ConfigError(f"policies.{kind}: expected a table with 'name' and parameters")
            params = dict(section)
            name = params.pop("name", DEFAULT_POLICIES[kind])
            if not isinstance(name, str):
                raise ConfigError(f"policies.{kind}.name: expected a string (got {name!r})")
            for key, value in params.items():   # each policy checks its own parameters; nan/inf never fit
                if isinstance(value, float) and not math.isfinite(value):
                    raise ConfigError(f"policies.{kind}.{key}: must be a finite number (got {value!r})")
            chosen[kind] = PolicyConfig(name=name, params=MappingProxyType(params))
        kwargs["policies"] = PoliciesConfig(**chosen)
    return SimConfig(**kwargs)


def from_file_data(data: Mapping[str, Any], path: str | Path) -> SimConfig:
    """:func:`from_dict` for data read from the file ``path``: an error names the file before the key,
    so a user with several config files knows which one to fix."""
    try:
        return from_dict(data, str(path))
    except ConfigError as exc:
        msg = str(exc)
        if msg.startswith(f"{path}:"):
            raise
        raise type(exc)(f"{path}: {msg}") from None


def load_config(path: str | Path) -> SimConfig:
    """Read and validate a TOML config file (UTF-8; a BOM and CRLF line endings are accepted)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    if path.is_dir():
        raise ConfigError(f"{path}: a directory, not a config file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from None
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
                          "save the config as UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    plugins = data.get("plugins")
    if isinstance(plugins, list):   # a plugin file is found relative to the config file that names it
        data["plugins"] = [str((path.parent / p).resolve()) if isinstance(p, str) and p.endswith(".py")
                           and not Path(p).is_absolute() and (path.parent / p).is_file() else p for p in plugins]
    return from_file_data(data, path)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` → (["a","b","c"], value); the value is read as a TOML literal, else a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. replica.block_size_tokens=32")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def with_overrides(config: SimConfig, overrides: Mapping[str, Any] | list[str]) -> SimConfig:
    """A new config with dotted-key overrides applied (``{"replica.block_size_tokens": 32}`` or
    ``["replica.block_size_tokens=32"]``); validated like a file."""
    data = config.to_dict()
    items = [parse_override(o) for o in overrides] if isinstance(overrides, list) else \
        [(k.split("."), v) for k, v in overrides.items()]
    for parts, value in items:
        node = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"{'.'.join(parts)}: {'.'.join(parts[:i + 1])} is not a section")
            node = nxt
        old = node.get(parts[-1])
        if isinstance(value, dict) and isinstance(old, dict) and _is_section(parts):
            # a table given for a whole section sets those keys and keeps the rest, as a second
            # [section] in a file would not: --set 'replica={block_size_tokens=32}' changes one key
            _merge(old, value)
        else:
            node[parts[-1]] = value
    return from_dict(data, "--set")


def _is_section(parts: list[str]) -> bool:
    """A config section (``replica``, ``policies.scheduling``), not a key whose value is a table
    (``trace.columns``, which a table replaces)."""
    return len(parts) == 1 or (len(parts) == 2 and parts[0] == "policies")


def _merge(into: dict, new: Mapping) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


_SURROGATE_PAIR = re.compile(r"\\u(d[89ab][0-9a-f]{2})\\u(d[c-f][0-9a-f]{2})")


def _toml_string(v: str) -> str:
    """A TOML basic string: JSON's escapes (all TOML accepts), except that a character beyond the BMP,
    which JSON writes as a surrogate pair TOML rejects, is written \\UXXXXXXXX, and DEL, which JSON
    leaves raw and TOML forbids, \\u007f."""
    text = json.dumps(v).replace("\x7f", "\\u007f")
    if "\\ud" not in text:
        return text

    def astral(m: re.Match) -> str:
        hi, lo = int(m.group(1), 16), int(m.group(2), 16)
        return f"\\U{0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00):08X}"

    return _SURROGATE_PAIR.sub(astral, text)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _dump_toml(data: Mapping[str, Any], prefix: str = "") -> str:
    """Scalars of a table under its ``[dotted.header]``, then its sub-tables; round-trips via tomllib."""
    scalars = [(k, v) for k, v in data.items() if not isinstance(v, Mapping)]
    chunks = []
    if scalars:
        head = [f"[{prefix}]"] if prefix else []
        chunks.append("\n".join(head + [f"{k} = {_toml_value(v)}" for k, v in scalars]))
    for k, v in data.items():
        if isinstance(v, Mapping):
            sub = _dump_toml(v, f"{prefix}.{k}" if prefix else k)
            if sub:
                chunks.append(sub)
    return "\n\n".join(chunks)
