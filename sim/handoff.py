"""KV hand-off between the pools of a disaggregated cluster: prefill replicas to decode replicas.

DistServe (OSDI 2024), Splitwise (ISCA 2024) and Mooncake (FAST 2025) run a request's prompt on a
prefill instance and its decode on another: the prefill instance samples the first token (TTFT ends
there), then the request's KV moves to a decode instance, which only decodes. Here a request whose
prompt is done on a prefill replica (``cluster.prefill_replicas``) becomes HANDING_OFF and joins one
cluster-wide queue, in the order prefills finish. The head of the queue goes to a decode replica
chosen by the decode routing policy (``cluster.decode_routing``) among those with room: enough
available HBM blocks for its KV and fewer than ``cluster.decode_max_running`` requests held or on
their way. The decode replica's KV owner reserves the blocks first (``TieredKV.reserve_import``);
then the KV crosses ``Cluster.network(src, dst)`` as one transfer (latency + bytes / bandwidth,
contending with other hand-offs on that link); when it lands the sender releases its blocks (into its
prefix cache, as any release) and the request joins the decode replica's running batch. When no
decode replica has room the queue waits (backpressure): the request keeps its prefill replica's
blocks, which that replica's scheduler cannot use, and the wait is measured. The queue is strict FIFO
(a large head blocks smaller requests behind it, as a FIFO transfer queue does).

The queue is served whenever room can have appeared, at that instant: when a prefill finishes, after
a decode replica has applied its plan (blocks its preemptions freed and its step left) and after each
of its steps (finishes), and when one of its swap-outs lands. While the head waits, decode replicas
plan their bulk decode runs only to their first finish (``sim.replica.decode_run``), so a run's
finishes are not hidden from the queue; a property test checks that runs then equal single steps.

Times, per request: ``ready`` (the prefill step that sampled its first token ended), ``reserved`` (a
decode replica took it), ``start`` (its bytes got the link), ``landed``. Backpressure is ready to
reserved, link queueing reserved to start, transfer start to landed; the hand-off wait is their sum.

Invariants: every queued request is HANDING_OFF, holds its sender's blocks (ready, unlocked) and no
receiver's; a request in flight holds its sender's blocks locked and the receiver's reserved blocks
(locked, not ready, counted in ``num_importing``); no request is queued and in flight at once.
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import numpy as np

from policies.base import RequestState
from sim.errors import PolicyAnswerError
from sim.request import FrozenRequest, Request

if TYPE_CHECKING:
    from sim.replica import Replica

RUNNING, HANDING_OFF = RequestState.RUNNING, RequestState.HANDING_OFF


def _pct(x: np.ndarray) -> dict:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    p = np.percentile(x, [50, 90, 99])
    return {"mean": float(x.mean()), "p50": float(p[0]), "p90": float(p[1]), "p99": float(p[2]),
            "max": float(x.max())}


class HandOffs:
    """The queue of prefilled requests waiting for a decode replica, and their moves over the network."""

    def __init__(self, cluster, prefill: list[Replica], decode: list[Replica], router, max_running: int,
                 num_requests: int, guarded: bool = False) -> None:
        self.cluster = cluster
        self.prefill = prefill
        self.decode = decode
        self.router = router
        self.max_running = max_running
        self.guarded = guarded
        self.views = [r.state_view for r in decode]
        self.queue: deque[tuple[Replica, Request]] = deque()
        self.blocked = False        # the queue's head found no decode replica with room
        self.in_flight = 0
        n = num_requests
        self.ready_s = np.full(n, np.nan)
        self.reserved_s = np.full(n, np.nan)
        self.start_s = np.full(n, np.nan)
        self.landed_s = np.full(n, np.nan)
        self.src = np.full(n, -1, dtype=np.int16)
        self.dst = np.full(n, -1, dtype=np.int16)
        self.nbytes = np.zeros(n, dtype=np.int64)
        self.num_blocked = 0        # times the head of the queue found no room

    # ------------------------------------------------------------------ the queue
    def ready(self, src: Replica, req: Request, now: float) -> None:
        """``req`` has sampled its first token on prefill replica ``src`` (it left ``src.running``)."""
        req.to(HANDING_OFF)
        self.ready_s[req.idx] = now
        self.src[req.idx] = src.replica_id
        self.queue.append((src, req))
        self.dispatch(now)

    def _room(self, i: int, need: int) -> bool:
        r, v = self.decode[i], self.views[i]
        # reading the view first brings a decode run in progress up to now
        return (v.num_free_blocks >= need
                and v.num_running + v.num_waiting + len(r.swapped) + r.num_incoming < self.max_running)

    def dispatch(self, now: float) -> None:
        """Send queued requests, head first, while some decode replica has room for the head. Called
        when a prefill finishes and after each step of a decode replica (its blocks may have freed)."""
        q = self.queue
        while q:
            src, req = q[0]
            need = len(req.blocks)
            cands = [i for i in range(len(self.decode)) if self._room(i, need)]
            if not cands:
                if not self.blocked:
                    self.blocked = True
                    self.num_blocked += 1
                    # decode runs planned through finishes would hide freed blocks until they end:
                    # cut them short, so each replica plans its next run to its first finish
                    for r in self.decode:
                        r.notify()
                return
            shown = FrozenRequest(req) if self.guarded else req
            k = self.router.route(shown, [self.views[i] for i in cands], now)
            if not 0 <= k < len(cands):
                raise PolicyAnswerError(f"decode routing policy {self.router.name!r} chose replica {k} of "
                                   f"{len(cands)} with room")
            dst = self.decode[cands[k]]
            blocks = dst.kv.reserve_import(need, now, req.idx)
            if blocks is None:
                raise RuntimeError(f"replica {dst.replica_id}: no {need} HBM blocks for a hand-off although "
                                   f"{self.views[cands[k]].num_free_blocks} were available")
            q.popleft()
            self._send(src, dst, req, blocks, now)
        self.blocked = False

    def _send(self, src: Replica, dst: Replica, req: Request, blocks: list[int], now: float) -> None:
        i = req.idx
        self.reserved_s[i] = now
        self.dst[i] = dst.replica_id
        nbytes = src.kv.lock(req) * src.kv.host_bytes_per_block    # every tensor-parallel shard's bytes
        self.nbytes[i] = nbytes
        dst.num_incoming += 1
        self.in_flight += 1
        dst.moves.start_pending()           # write-backs of blocks the reservation evicted ...
        after = [m.event for m in dst.kv.take_waits("hbm") if m.event is not None]   # ... land first
        dst.notify()                        # its free blocks changed: a decode run in progress replans
        channel = self.cluster.network(src.replica_id, dst.replica_id)

        def landed(t: float) -> None:
            self._landed(src, dst, req, blocks, t)

        src.transfers.start_over(channel, "network", nbytes, landed, what="handoff", request=i, after=after, now=now)

    def _landed(self, src: Replica, dst: Replica, req: Request, blocks: list[int], now: float) -> None:
        src.sync(now)
        dst.sync(now)
        src.kv.unlock(req)
        src.kv.release(req, now)            # into the sender's prefix cache, as any release
        del src.handing_off[req.idx]
        src.moves.start_pending()           # write-through copies of the released prompt blocks
        dst.kv.land_import(req, blocks, now)
        dst.num_incoming -= 1
        self.in_flight -= 1
        req.replica = dst.replica_id
        req.to(RUNNING)
        dst.running.append(req)
        self.landed_s[req.idx] = now
        src.notify()
        dst.notify()

    # ------------------------------------------------------------------ figures
    def columns(self) -> dict[str, np.ndarray]:
        """Per-request columns of ``requests.parquet`` (NaN / -1 for requests that did not hand off)."""
        wait = self.landed_s - self.ready_s
        return {"prefill_replica": self.src, "decode_replica": self.dst, "handoff_bytes": self.nbytes,
                "handoff_wait_s": wait, "handoff_backpressure_s": self.reserved_s - self.ready_s,
                "handoff_transfer_s": self.landed_s - self.start_s}

    def link_starts(self, transfers) -> None:
        """Fill each hand-off's link start time from the transfer log (rows of ``what`` = handoff)."""
        for row in transfers.rows:
            if row[2] == "handoff":
                self.start_s[row[3]] = row[6]

    def summary(self, makespan_s: float, busy_s: list[float]) -> dict:
        """``summary["handoff"]``: pools, the link, bytes, the wait distributions (seconds, over the
        requests that handed off) and how busy each pool's GPUs were."""
        done = np.isfinite(self.landed_s)
        wait = (self.landed_s - self.ready_s)[done]
        bp = (self.reserved_s - self.ready_s)[done]
        queue = (self.start_s - self.reserved_s)[done]
        xfer = (self.landed_s - self.start_s)[done]
        np_ = len(self.prefill)
        span = max(makespan_s, 1e-12)
        ch = self.cluster
        return {
            "prefill_replicas": np_, "decode_replicas": len(self.decode),
            "decode_routing": self.router.name, "decode_max_running": self.max_running,
            "link_bandwidth_bytes_per_s": ch.network_bandwidth_bytes_per_s, "link_latency_s": ch.network_latency_s,
            "requests": int(done.sum()), "bytes": int(self.nbytes[done].sum()),
            "backpressured_requests": int((bp > 0).sum()), "times_blocked": self.num_blocked,
            "wait_s": _pct(wait), "backpressure_s": _pct(bp), "link_queue_s": _pct(queue), "transfer_s": _pct(xfer),
            "pool_busy_fraction": {
                "prefill": sum(busy_s[:np_]) / (span * np_),
                "decode": sum(busy_s[np_:]) / (span * len(self.decode)),
            },
            "decode_preemptions": int(sum(r.preemption.num_preempted for r in self.decode)),
            "decode_prefill_tokens": int(sum(r.num_prefill_tokens for r in self.decode)),
        }

