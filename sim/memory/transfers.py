"""Block-group transfers over named, contended links: the only way KV bytes move between tiers or
replicas (swap out and in, loads of lower-tier prefix hits, prefetch, write-back, hand-off).

A transfer is a SimPy process: it queues for its link's channel, holds it for ``latency + bytes /
bandwidth``, then calls ``done(now)``. Links are one-direction channels (``sim.hardware.links``), so
transfers on one link serialise and transfers on different links overlap with each other and with
compute. A transfer may wait for other events before it queues (``after``: a copy into blocks whose old
contents are still being written back), and may cross several links in turn (``start_chain``: NVMe →
host → HBM), each hop queueing on its own link. Every hop is logged (link, what, request, bytes,
queued, start and end times), which gives bytes and busy time per link and the link utilisation over
time.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import simpy

from sim.clock import exact_delay, exact_time
from sim.hardware.links import Channel

LINK_NAMES = ("pcie_h2d", "pcie_d2h", "nvme_read", "nvme_write", "net_read", "net_write")


class TransferLog:
    """One row per finished transfer; columns are plain lists (transfers are per block group, few)."""

    COLUMNS = ("replica", "link", "what", "request", "bytes", "queued_s", "start_s", "end_s")

    def __init__(self) -> None:
        self.rows: list[tuple] = []

    def add(self, *row) -> None:
        self.rows.append(row)

    def frame(self):
        import pandas as pd

        df = pd.DataFrame(self.rows, columns=list(self.COLUMNS))
        return df.astype({"replica": np.int16, "request": np.int64, "bytes": np.int64})

    def table(self):
        """The log as an Arrow table, as ``pa.Table.from_pandas(self.frame())`` makes it. With no
        transfers (most runs) that table is built directly, without importing pandas: the columns
        pandas leaves as empty ``object`` have Arrow's null type."""
        import pyarrow as pa

        if self.rows:
            return pa.Table.from_pandas(self.frame(), preserve_index=False)
        typed = {"replica": pa.int16(), "request": pa.int64(), "bytes": pa.int64()}
        return pa.table({c: pa.nulls(0, typed.get(c, pa.null())) for c in self.COLUMNS})


class Transfers:
    """The links of one replica by name, and the moves over them."""

    def __init__(self, env: simpy.Environment, replica_id: int, links: Mapping[str, Channel],
                 log: TransferLog) -> None:
        self.env = env
        self.replica_id = replica_id
        self.links = dict(links)
        self.log = log
        # the owner's exact time (the replica sets its clock: SimPy's can sit an ulp off a step's end,
        # by a different ulp on a path that reached that end by other delays), so that a copy started
        # at a step's end is timed from that end on every path alike
        self.clock: Callable[[], float] = lambda: env.now

    def link(self, name: str) -> Channel:
        try:
            return self.links[name]
        except KeyError:
            raise KeyError(f"replica {self.replica_id} has no link {name!r} "
                           f"(links: {', '.join(sorted(self.links))})") from None

    def start(self, link: str, nbytes: int, done: Callable[[float], None], *, what: str,
              request: int = -1) -> simpy.Process:
        """Move ``nbytes`` over ``link`` as a process of its own; ``done(now)`` runs when they arrive."""
        return self.env.process(self._move(self.link(link), link, int(nbytes), done, what, request))

    def start_chain(self, links: Sequence[str], nbytes: int, done: Callable[[float], None], *, what: str,
                    request: int = -1, after: Sequence[simpy.Event] = ()) -> simpy.Process:
        """Move ``nbytes`` over each of ``links`` in turn (store and forward: NVMe → host → HBM), after
        the events in ``after`` have happened; ``done(now)`` runs when the last hop lands."""
        hops = [(self.link(name), name) for name in links]
        return self.env.process(self._chain(hops, int(nbytes), done, what, request, tuple(after)))

    def start_over(self, channel: Channel, name: str, nbytes: int, done: Callable[[float], None], *, what: str,
                   request: int = -1, after: Sequence[simpy.Event] = (), now: float | None = None) -> simpy.Process:
        """Move ``nbytes`` over ``channel``, a link this replica shares with others (the cluster's
        network between two replicas), logged under ``name``, after the events in ``after``. ``now``:
        the exact time the move was decided, when another replica's clock decided it (a hand-off sent
        at a decode replica's step end: SimPy's clock may sit an ulp off it, and this replica's clock,
        not at a step end of its own, would take SimPy's)."""
        return self.env.process(self._chain(((channel, name),), int(nbytes), done, what, request, tuple(after),
                                            now))

    def backlog_s(self, link: str) -> float:
        """Seconds of bytes queued or in flight on ``link`` (at its bandwidth)."""
        ch = self.link(link)
        return ch.queued_bytes / ch.bandwidth_bytes_per_s

    def _chain(self, hops, nbytes: int, done, what: str, request: int, after, now: float | None = None):
        pending = [e for e in after if not e.processed]
        if pending:
            yield self.env.all_of(pending)
            now = None
        end = self.env.now
        for channel, name in hops:
            end = yield from self._hop(channel, name, nbytes, what, request, now)
            now = None
        done(exact_time(self.env.now, end))

    def _move(self, channel: Channel, name: str, nbytes: int, done, what: str, request: int):
        end = yield from self._hop(channel, name, nbytes, what, request)
        done(exact_time(self.env.now, end))

    def _hop(self, channel: Channel, name: str, nbytes: int, what: str, request: int, now: float | None = None):
        env = self.env
        t0 = env.now
        queued = self.clock() if now is None else now
        channel.queued_bytes += nbytes
        with channel.resource.request() as slot:
            yield slot
            start = queued if env.now == t0 else env.now    # at once, or when the copy ahead landed
            d = channel.duration_s(nbytes)
            end = start + d
            yield env.timeout(exact_delay(env.now, end))
            channel.busy_s += d
        channel.queued_bytes -= nbytes
        channel.bytes_moved += nbytes
        channel.num_transfers += 1
        self.log.add(self.replica_id, name, what, request, nbytes, queued, start, end)
        return end

    def stats(self) -> dict[str, dict]:
        """Bytes, transfers and busy seconds per link."""
        return {name: {"bytes": ch.bytes_moved, "transfers": ch.num_transfers, "busy_s": ch.busy_s}
                for name, ch in self.links.items()}
