"""KV copies between tiers for one replica: loads of lower-tier prefix hits, prefetch, write-back and
write-through, carried out over the replica's links; and the requests waiting for their prefix.

The KV owner (``sim.memory.tiers.TieredKV``) decides every copy (:class:`~sim.memory.tiers.Move`);
this module starts them as transfers (each hop queueing on its link, after the copies it depends on),
applies them when they land — first bringing a decode run in progress up to that instant, then waking
the replica — and moves a LOADING request to RUNNING once its last block has landed. The stall of such a
request is measured from its admission (when it could otherwise have started its prefill) to that
moment. Prefetch asks the residency policy, at planning points where something it could act on has
changed (the queue, the contents of the lower tiers, a request released its blocks), which waiting
requests' lower-tier prefixes to start loading now.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from policies.base import RequestState
from sim.request import Request, unwrap

if TYPE_CHECKING:
    from sim.memory.tiers import Move
    from sim.replica.loop import Replica

RUNNING, WAITING = RequestState.RUNNING, RequestState.WAITING
_WHAT = {"load": "load", "write": "writeback"}


class KVMoves:
    """Starts, tracks and lands one replica's tier-to-tier copies; holds its LOADING requests."""

    def __init__(self, replica: Replica) -> None:
        self.r = replica
        self.kv = replica.kv
        self.residency = replica.policies["residency"]
        self.loading: list[Request] = []
        self.in_flight = 0
        self.num_stalled = 0
        self.stall_s = 0.0
        self.max_stall_s = 0.0
        self.writeback_wait_s = 0.0      # steps that waited for the write-back of the blocks they reuse
        self.landings = 0
        self._asked: tuple | None = None

    def start_pending(self) -> None:
        """Start every copy the KV owner has decided since the last call."""
        moves = self.kv.take_moves()
        if not moves:
            return
        tr = self.r.transfers
        for m in moves:
            after = [a.event for a in m.after if a.event is not None]
            m.event = tr.start_chain(m.links, m.nbytes, lambda now, m=m: self._landed(m, now),
                                     what=("prefetch" if m.prefetch else _WHAT[m.kind]), request=m.request,
                                     after=after)
            self.in_flight += 1

    def _landed(self, m: Move, now: float) -> None:
        r = self.r
        r.sync(now)              # a decode run in progress first catches up to now
        self.kv.land(m, now)
        self.in_flight -= 1
        self.landings += 1
        if m.kind == "load" and self.loading:
            self._wake_loaded(now)
        r.notify()

    def wait(self, req: Request, now: float) -> None:
        """An admitted request whose prefix is not all resident yet: LOADING until it is."""
        req.to(RequestState.LOADING)
        req.kv_wait_since_s = now
        self.loading.append(req)

    def _wake_loaded(self, now: float) -> None:
        kv = self.kv
        still = []
        for req in self.loading:
            if kv.waiting_on_load(req):
                still.append(req)
                continue
            req.to(RUNNING)
            stall = now - req.kv_wait_since_s
            req.kv_stall_s += stall
            self.num_stalled += 1
            self.stall_s += stall
            self.max_stall_s = max(self.max_stall_s, stall)
            self.r.running.append(req)
        self.loading = still

    def prefetch(self, now: float) -> None:
        """Ask the residency policy which waiting requests' lower-tier prefixes to load now."""
        r = self.r
        if not r.waiting:
            return
        kv = self.kv
        state = (id(r.waiting[0]), len(r.waiting), kv.lower_versions(), kv.releases)
        if state == self._asked:
            return          # nothing the policy could act on has changed since it was last asked
        self._asked = state
        chosen = self.residency.prefetch(r.preemption.view, now)
        if not chosen:
            return
        for req in chosen:
            req = unwrap(req)
            if req.state == WAITING and req.replica == r.replica_id:
                self.kv.prefetch(req, now)
        self.start_pending()
