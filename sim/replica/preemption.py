"""Preemption and swapping: where a preempted request's KV goes (the residency policy decides:
recompute, or swap to DRAM), the swap transfers over PCIe, and the request's way back.

A swapped request's HBM blocks stay locked while they are copied out; DRAM blocks are reserved first
(dropping other swapped requests' copies when DRAM is full, chosen by the eviction policy). Swap-in
allocates the HBM blocks first and locks them until the copy lands. Every copy is a transfer on the
replica's named links (``sim.memory.transfers``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from policies.base import RequestState
from sim.errors import PolicyAnswerError
from sim.replica.views import ResidencyViewImpl
from sim.request import Request

if TYPE_CHECKING:
    from sim.replica.loop import Replica

WAITING, RUNNING, SWAPPING_OUT, SWAPPED, SWAPPING_IN = (
    RequestState.WAITING, RequestState.RUNNING, RequestState.SWAPPING_OUT, RequestState.SWAPPED,
    RequestState.SWAPPING_IN)


class Preemption:
    """The preempt/swap state machine of one replica."""

    def __init__(self, replica: Replica) -> None:
        self.r = replica
        self.residency = replica.policies["residency"]
        self.view = ResidencyViewImpl(replica, replica.preemption_mode, replica.guarded)
        self.num_out = 0
        self.num_in = 0
        self.num_drops = 0
        self.num_preempted = 0

    def preempt(self, req: Request, now: float) -> None:
        r = self.r
        r.running.remove(req)
        req.num_preemptions += 1
        self.num_preempted += 1
        if req.blocks and self.residency.preempt_to(self.view, req, now) == "swap":
            got, dropped = r.kv.reserve_dram(req, now, r.swapped)
            for victim in dropped:
                r.swapped.remove(victim)
                self._to_waiting_front(victim)
                self.num_drops += 1
            if got:
                req.to(SWAPPING_OUT)
                req.num_swaps += 1
                r.num_swapping_out += 1
                self.num_out += 1
                self._start_transfer(req, "pcie_d2h", "swap_out", self._swapped_out, r.kv.take_waits("dram"))
                return
        r.kv.release(req, now)
        self._to_waiting_front(req)

    def _to_waiting_front(self, req: Request) -> None:
        r = self.r
        req.to(WAITING)
        req.restart()
        # preempted requests go back in front, earliest arrival first
        i = 0
        w = r.waiting
        while i < len(w) and w[i].num_preemptions > 0 and w[i].arrival_s <= req.arrival_s:
            i += 1
        w.insert(i, req)

    def _start_transfer(self, req: Request, link: str, what: str, done, after) -> None:
        """Move ``req``'s KV over ``link`` (after the write-backs ``after`` of the blocks it
        overwrites); ``done(req, now)`` applies the result when the bytes have arrived. Its HBM blocks
        stay locked meanwhile. The bytes are the whole replica's (every tensor-parallel shard; the link
        has a lane per GPU)."""
        r = self.r
        nbytes = r.kv.lock(req) * r.kv.host_bytes_per_block
        r.moves.start_pending()
        events = [m.event for m in after if m.event is not None]

        def arrived(now: float) -> None:
            r.sync(now)          # a decode run in progress first catches up to now
            r.kv.unlock(req)
            done(req, now)
            r.notify()

        r.transfers.start_chain((link,), nbytes, arrived, what=what, request=req.idx, after=events)

    def _swapped_out(self, req: Request, now: float) -> None:
        r = self.r
        r.kv.finish_swap_out(req, now)
        req.to(SWAPPED)
        r.num_swapping_out -= 1
        r.swapped.append(req)
        if r.role == "decode" and r.handoffs.queue:
            r.handoffs.dispatch(now)        # its HBM blocks are free now

    def _swapped_in(self, req: Request, now: float) -> None:
        r = self.r
        r.kv.finish_swap_in(req, now)
        req.to(RUNNING)
        r.num_swapping_in -= 1
        r.running.append(req)

    def start_swap_in(self, req: Request, now: float) -> None:
        r = self.r
        if req.state != SWAPPED:
            raise PolicyAnswerError(f"scheduling policy {r.scheduler.name!r} swapped in request {req.req_id}, "
                               f"which is not swapped out")
        if not r.kv.reserve_hbm_for_swap_in(req, now):
            return
        r.swapped.remove(req)
        req.to(SWAPPING_IN)
        r.num_swapping_in += 1
        self.num_in += 1
        self._start_transfer(req, "pcie_h2d", "swap_in", self._swapped_in, r.kv.take_waits("hbm"))
