"""The cluster: pools of replicas, the router, the arrival process, and the links between replicas.

A *pool* is a group of replicas with one role and one GPU type. By default every replica serves
whole requests (one pool, role ``"mixed"``); with ``cluster.prefill_replicas`` = N > 0 the first N
form a ``"prefill"`` pool, the only one the router sees, and the rest a ``"decode"`` pool, which
receives every prefilled request's KV through the hand-off queue (``sim.handoff``) over the
inter-replica links (``network``: one channel per ordered pair, as transfers, ``sim.memory.transfers``).

Arrivals come from one process over the pre-sorted trace arrays: at each arrival time the router
picks a replica from read-only views that bring themselves up to date, and the request joins it.
Requests carry their trace's ``priority``, ``tenant``, ``session_id`` and ``acceptance_rate``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import simpy

from policies import registry
from sim.clock import exact_delay
from sim.errors import PolicyAnswerError
from sim.handoff import HandOffs
from sim.hardware.gpu import GPUGroup
from sim.hardware.links import Channel, PCIeLink
from sim.hardware.storage import HostDRAM, NVMeDrive
from sim.memory.future import FutureUses
from sim.memory.store import SharedStore
from sim.memory.tiers import TieredKV, prefix_keys
from sim.memory.transfers import TransferLog, Transfers
from sim.metrics import RequestLog, StepLog, TokenLog
from sim.metrics.columns import schema_metadata
from sim.replica import Replica
from sim.replica.step import StepBuilder
from sim.request import FrozenRequest, Request

if TYPE_CHECKING:
    from sim.engine import Simulation

ROLES = ("mixed", "prefill", "decode")


@dataclass(slots=True)
class Pool:
    """Replicas that share a role and a GPU type."""

    name: str
    role: str
    gpu: str
    replicas: list = field(default_factory=list)


def policy_rng(seed: int, kind: str, replica: int, tier: int = 0) -> np.random.Generator:
    """The random generator of one policy instance: seeded by the run's seed, the kind and the
    replica (-1 for cluster-wide policies) and, for the eviction policies of lower KV tiers, the tier,
    so adding a policy never shifts another's stream."""
    key = [seed, registry.KINDS.index(kind), replica + 1] + ([tier] if tier else [])
    return np.random.default_rng(key)


class _Unread:
    """A replica view for a router that declared it reads none: reading one is that router's bug."""

    __slots__ = ("replica_id",)

    def __init__(self, replica_id: int) -> None:
        self.replica_id = replica_id

    def __getattr__(self, name: str):
        raise PolicyAnswerError(f"a routing policy with reads_state = False read {name!r} of a replica view; "
                           f"declare reads_state = True")


class ArrivalFeed:
    """The requests routed to one replica, in arrival order, pulled by the replica as it plans."""

    __slots__ = ("_cluster", "_replica", "_idx", "_t", "_next")

    def __init__(self, cluster: Cluster, replica: Replica, idx: np.ndarray) -> None:
        self._cluster, self._replica = cluster, replica
        self._idx = idx.tolist()
        self._t = cluster.trace.arrival_s[idx].tolist()
        self._next = 0

    def next_s(self) -> float:
        """When the next request routed here arrives (inf: none left)."""
        return self._t[self._next] if self._next < len(self._t) else math.inf

    def pull(self, now: float) -> None:
        """Hand the replica every request that has arrived by ``now``."""
        t, j = self._t, self._next
        while j < len(t) and t[j] <= now:
            self._replica.submit(self._cluster.make_request(self._idx[j]), notify=False)
            j += 1
        self._next = j


class Cluster:
    """Builds and owns the replicas of a simulation, routes arrivals to them."""

    def __init__(self, sim: Simulation, env: simpy.Environment, *, guarded: bool = False) -> None:
        cfg = sim.config
        rc = cfg.replica
        self.env = env
        self.sim = sim
        self.guarded = guarded
        self.trace = sim.trace
        self.requests = RequestLog(len(sim.trace))
        self.tokens = TokenLog()
        self.transfer_log = TransferLog()
        cc = cfg.cluster
        n_pre = cc.prefill_replicas
        if n_pre:
            self.pools = [Pool("prefill", "prefill", sim.gpu.name), Pool("decode", "decode", sim.gpu.name)]
        else:
            self.pools = [Pool("main", "mixed", sim.gpu.name)]
        self.replicas: list[Replica] = []
        h2d_bw, d2h_bw, lat = sim.pcie_params()
        # the KV store the replicas share (Mooncake Store / LMCache-like), when configured
        self.store = None
        if cc.shared_kv_bytes:
            self.store = SharedStore(num_blocks=cc.shared_kv_bytes // sim.host_bytes_per_block,
                                     block_size=rc.block_size_tokens, bytes_per_block=sim.host_bytes_per_block,
                                     eviction=sim.build_policy("eviction", -1, tier=3))
        futures = self._futures(sim) if sim.eviction_needs_future else None
        if futures is not None:     # the future is the whole cluster's: runs elsewhere catch up before it moves
            futures.before_admit = self._sync_all
        decoupled = rc.lanes == "decoupled"
        lanes = (dict(mode=rc.lanes_partition, fraction=rc.prefill_sm_fraction, itl_slo_s=rc.lanes_itl_slo_s)
                 if decoupled else None)
        step_meta = schema_metadata(sim.run_metadata)
        for i in range(cfg.cluster.num_replicas):
            policies = {kind: sim.build_policy(kind, i) for kind in registry.KINDS if kind != "routing"}
            lower = {t: sim.build_policy("eviction", i, tier=k) for k, t in ((1, "dram"), (2, "nvme"))}
            kv = TieredKV(block_size=rc.block_size_tokens, hbm_blocks=sim.hbm_blocks, dram_blocks=sim.dram_blocks,
                          nvme_blocks=sim.nvme_blocks, hbm_bytes_per_block=sim.hbm_bytes_per_block,
                          host_bytes_per_block=sim.host_bytes_per_block, prefix_caching=rc.prefix_caching,
                          eviction=policies["eviction"], guarded=guarded, lower_eviction=lower,
                          tier_mode=rc.kv_tier_mode, store=self.store)
            kv.sessions = self.trace.session_id
            kv.futures = futures
            gpu = GPUGroup(sim.gpu, rc.tensor_parallel_size,
                           reserved_sms=policies["execution"].reserved_sms(sim.gpu.sm_count))
            share = gpu.sm_share
            cost = sim.cost_model(sim.model.name, policies["execution"])
            builder = StepBuilder(cost=cost, sparsity=policies["sparsity"], sm_share=share,
                                  prefill_fraction=0.0 if decoupled else rc.prefill_sm_fraction,
                                  drafter_cost=lambda name, ex=policies["execution"]: sim.cost_model(name, ex),
                                  drafter=policies["speculation"].drafter())
            pcie = PCIeLink(env, f"replica{i}.pcie", h2d_bw, d2h_bw, lat, lanes=rc.tensor_parallel_size)
            dram, nvme = HostDRAM(env, f"replica{i}", sim.server), NVMeDrive(env, f"replica{i}", sim.server)
            links = {"pcie_h2d": pcie.h2d, "pcie_d2h": pcie.d2h, "nvme_read": nvme.read, "nvme_write": nvme.write,
                     "dram": dram.channel}
            if self.store is not None:
                # the replica's NIC, each direction a channel (reads from and writes to the shared store)
                links["net_read"] = Channel(env, f"replica{i}.net_read", cc.shared_kv_bandwidth_bytes_per_s,
                                            cc.shared_kv_latency_s)
                links["net_write"] = Channel(env, f"replica{i}.net_write", cc.shared_kv_bandwidth_bytes_per_s,
                                             cc.shared_kv_latency_s)
            step_log = StepLog(cfg.metrics.step_log, i, sim.spill / f"steps-replica{i}.parquet",
                               tuple(p.num_blocks * p.bytes_per_block for p in kv.pools),
                               metadata=step_meta)
            replica = Replica(env=env, replica_id=i, kv=kv, builder=builder,
                              transfers=Transfers(env, i, links, self.transfer_log), policies=policies,
                              preemption_mode=rc.preemption_mode, max_model_len=sim.max_model_len,
                              requests=self.requests, step_log=step_log, token_log=self.tokens,
                              rng=np.random.default_rng([cfg.seed, i]), bulk_decode=rc.bulk_decode,
                              guarded=guarded, lanes=lanes,
                              role=self.pools[-1].role if n_pre and i >= n_pre else self.pools[0].role)
            replica.gpu = gpu
            self.replicas.append(replica)
            self.pools[1 if n_pre and i >= n_pre else 0].replicas.append(replica)
        # links between replicas (KV hand-off): one channel per ordered pair, created on use, at the
        # GPU's NVLink bandwidth (replicas of one node; 50 GB/s when the preset gives none) unless the
        # config names one; with tensor parallelism each GPU sends its shard over its own link, so a
        # replica's link has tensor_parallel_size times the bandwidth (as its PCIe link does)
        bw = cc.handoff_bandwidth_bytes_per_s or sim.gpu.nvlink_bandwidth_bytes_per_s or 50e9
        self.network_bandwidth_bytes_per_s = bw * rc.tensor_parallel_size
        self.network_latency_s = cc.handoff_latency_s
        self._network: dict[tuple[int, int], Channel] = {}
        # arrivals go to the first pool: every replica, or the prefill pool
        self.entry: list[Replica] = self.pools[0].replicas
        self.router = sim.build_policy("routing", -1)
        if self.router.observes():
            for r in self.entry:
                r.observers.append(self.router)
        self.handoffs = None
        if n_pre:
            decode = self.pools[1].replicas
            # the decode pool's router: a second cluster-wide routing policy with a stream of its own
            drouter = registry.build("routing", cc.decode_routing, {})
            drouter.attach(policy_rng(cfg.seed, "routing", -1, tier=1))
            if drouter.observes():
                for r in decode:
                    r.observers.append(drouter)
            self.handoffs = HandOffs(self, self.entry, decode, drouter, cc.decode_max_running, len(self.trace),
                                     guarded=guarded)
            for r in self.replicas:
                r.handoffs = self.handoffs
        self.num_arrived = 0

    def _sync_all(self, now: float) -> None:
        """Bring every replica's decode run in progress up to ``now``."""
        for r in self.replicas:
            r.sync(now)

    def _futures(self, sim: Simulation) -> FutureUses:
        """Every request's prefix keys, computed offline, for an eviction policy that needs the trace's
        future (Belady's optimum)."""
        tr, rc = self.trace, sim.config.replica
        hashed = tr.hash_offsets is not None and rc.prefix_caching
        keys = [prefix_keys(tr.block_hashes(i), tr.hash_block_tokens or 0, int(tr.prompt_tokens[i]),
                            rc.block_size_tokens) if hashed else None for i in range(len(tr))]
        return FutureUses(keys, tr.arrival_s)

    def network(self, src: int, dst: int) -> Channel:
        """The link that carries KV from replica ``src`` to replica ``dst``."""
        ch = self._network.get((src, dst))
        if ch is None:
            ch = self._network[(src, dst)] = Channel(self.env, f"net.{src}->{dst}",
                                                     self.network_bandwidth_bytes_per_s, self.network_latency_s)
        return ch

    def make_request(self, i: int) -> Request:
        """Request ``i`` of the trace, with its prefix keys, priority, tenant and session."""
        tr = self.trace
        keys = (prefix_keys(tr.block_hashes(i), self._hbt, int(tr.prompt_tokens[i]), self._bs)
                if self._hashed else None)
        prio, tenant, session, rate = tr.priority, tr.tenant, tr.session_id, tr.acceptance_rate
        return Request(idx=i, req_id=int(tr.request_id[i]), arrival_s=float(tr.arrival_s[i]),
                       prompt_tokens=int(tr.prompt_tokens[i]), output_tokens=int(tr.output_tokens[i]),
                       priority=int(prio[i]) if prio is not None else 0,
                       tenant=tenant[i] if tenant is not None else None,
                       session_id=session[i] if session is not None else None, hash_keys=keys,
                       acceptance_rate=float(rate[i]) if rate is not None else float("nan"))

    def _route(self, req: Request, views, now: float) -> int:
        k = self.router.route(FrozenRequest(req) if self.guarded else req, views, now)
        if not 0 <= k < len(self.entry):
            raise PolicyAnswerError(f"routing policy {self.router.name!r} chose replica {k} of {len(self.entry)} "
                                    f"(replicas are 0 to {len(self.entry) - 1}); fix its route()")
        return k

    def start(self) -> None:
        """Set up arrivals: when the router reads no replica state, every request is routed now (in
        arrival order, as it would be one at a time) and each replica pulls its own arrivals when it
        next plans, with no SimPy event per arrival; otherwise one process releases them at their
        arrival times and routes each on the replicas' state then."""
        rc = self.sim.config.replica
        tr = self.trace
        self._hashed = tr.hash_offsets is not None and rc.prefix_caching
        self._hbt = tr.hash_block_tokens or 0
        self._bs = rc.block_size_tokens
        if self.router.reads_state or any(r.watches_arrivals for r in self.replicas):
            self.env.process(self.arrivals())
            return
        views = [_Unread(r.replica_id) for r in self.entry]
        t = tr.arrival_s
        per: list[list[int]] = [[] for _ in self.entry]
        for i in range(len(tr)):
            stub = Request(idx=i, req_id=int(tr.request_id[i]), arrival_s=float(t[i]),
                           prompt_tokens=int(tr.prompt_tokens[i]), output_tokens=int(tr.output_tokens[i]),
                           priority=int(tr.priority[i]) if tr.priority is not None else 0,
                           tenant=tr.tenant[i] if tr.tenant is not None else None,
                           session_id=tr.session_id[i] if tr.session_id is not None else None)
            per[self._route(stub, views, float(t[i]))].append(i)
        for r, idx in zip(self.entry, per):
            r.feed = ArrivalFeed(self, r, np.asarray(idx, dtype=np.int64))
            r.next_arrival_s = r.feed.next_s
        self.num_arrived = len(tr)

    def arrivals(self):
        """SimPy process body: release the trace's requests at their arrival times."""
        env = self.env
        t = self.trace.arrival_s
        n = len(t)
        replicas = self.entry
        views = [r.state_view for r in replicas]
        cursor = [0]

        def next_arrival() -> float:
            return float(t[cursor[0]]) if cursor[0] < n else float("inf")

        for r in replicas:
            r.next_arrival_s = next_arrival
        i = 0
        while i < n:
            target = float(t[i])
            if target > env.now:
                yield env.timeout(exact_delay(env.now, target))
            now = env.now
            while i < n and t[i] <= now:
                req = self.make_request(i)
                replicas[self._route(req, views, now)].submit(req)
                i += 1
                cursor[0] = i
                self.num_arrived = i

    def link_stats(self) -> dict:
        """Bytes, transfers, busy seconds and utilisation per link kind, summed over replicas."""
        out: dict[str, dict] = {}
        for r in self.replicas:
            for name, st in r.transfers.stats().items():
                agg = out.setdefault(name, {"bytes": 0, "transfers": 0, "busy_s": 0.0})
                for k in agg:
                    agg[k] += st[k]
        for _, ch in sorted(self._network.items()):
            out.setdefault("network", {"bytes": 0, "transfers": 0, "busy_s": 0.0})
            out["network"]["bytes"] += ch.bytes_moved
            out["network"]["transfers"] += ch.num_transfers
            out["network"]["busy_s"] += ch.busy_s
        return out
