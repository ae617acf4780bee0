"""A KV store shared by the replicas of a cluster (Mooncake Store, LMCache's remote backend).

One block pool, in host memory somewhere in the cluster, that every replica looks up after its own
tiers (HBM, DRAM, NVMe). A replica reads a hit into its HBM over its NIC (``net_read``, then
``pcie_h2d``: with GPUDirect RDMA the NIC's traffic crosses the GPU's PCIe link) and writes to it over
``pcie_d2h`` then ``net_write``. The store is inclusive whatever the replicas' tier mode: a read leaves
the block for every other replica. Its evictions are chosen by a cluster-level instance of the
eviction policy and dropped (it is the last tier).
"""
from __future__ import annotations

from sim.memory.block_pool import BlockPool


class SharedStore:
    """The cluster's shared KV pool and its eviction policy."""

    def __init__(self, *, num_blocks: int, block_size: int, bytes_per_block: int, eviction) -> None:
        self.pool = BlockPool("store", num_blocks, block_size, bytes_per_block)
        self.eviction = eviction
