"""The step log's columns, declared once, by name; the Python and the compiled writers both index
rows through the constants defined here (``I_<COLUMN>`` for the integer buffer, ``F_<COLUMN>`` for
the float one)."""
from __future__ import annotations

import numpy as np

STEP_COLUMNS: dict[str, type] = {
    "step": np.int64, "start_s": np.float64, "duration_s": np.float64,
    "num_seqs": np.int32, "prefill_seqs": np.int32, "prefill_tokens": np.int32, "decode_seqs": np.int32,
    "tokens": np.int32, "hbm_active_bytes": np.int64, "hbm_cached_bytes": np.int64,
    "hbm_locked_bytes": np.int64, "dram_used_bytes": np.int64, "nvme_used_bytes": np.int64,
    "frag_tokens": np.int64, "launches": np.int32, "syncs": np.int32, "preemptions": np.int32,
    # the KV hierarchy: cached (evictable, findable) bytes below HBM; requests waiting for their prefix
    # to load; prompt tokens served from the cache at this step's admissions, and those loaded from a
    # lower tier
    "dram_cached_bytes": np.int64, "nvme_cached_bytes": np.int64, "loading_seqs": np.int32,
    "prefix_hit_tokens": np.int32, "loaded_tokens": np.int32,
    # speculative decoding: draft tokens verified (tree nodes), drafts accepted, the drafter's share of
    # the step and the target's verification (seconds), and the KV bytes of the lookahead slots
    "draft_tokens": np.int32, "accepted_tokens": np.int32, "draft_s": np.float64, "verify_s": np.float64,
    "draft_kv_bytes": np.int64,
    # query rows a captured CUDA graph ran beyond the step's own (padding up to its bucket)
    "padded_tokens": np.int32,
    # decoupled prefill/decode lanes (replica.lanes = "decoupled"): which lane ran the step (0: the one
    # stream, 1: prefill lane, 2: decode lane) and the share of the GPU's SMs it ran on (0: not a lane's)
    "lane": np.int32, "sm_share": np.float64,
}
# free bytes per tier, derived when rows are written (capacity - used - cached), not kept in the buffer
FREE_COLUMNS = ("hbm_free_bytes", "dram_free_bytes", "nvme_free_bytes")
# the step log's float buffer, in this column order; the integer buffer holds the rest (the step index
# is implicit)
FLOAT_COLUMNS = tuple(k for k, t in STEP_COLUMNS.items() if t is np.float64)
INT_COLUMNS = tuple(k for k in STEP_COLUMNS if k != "step" and k not in FLOAT_COLUMNS)
INT_INDEX = {k: j for j, k in enumerate(INT_COLUMNS)}
FLOAT_INDEX = {k: j for j, k in enumerate(FLOAT_COLUMNS)}
F_START, F_DURATION, F_DRAFT, F_VERIFY = (FLOAT_INDEX[k] for k in ("start_s", "duration_s", "draft_s", "verify_s"))
assert (F_START, F_DURATION) == (0, 1)

# Integer-buffer positions by name. Module-level ints are compile-time constants in numba functions.
I_NUM_SEQS = INT_INDEX["num_seqs"]
I_PREFILL_SEQS = INT_INDEX["prefill_seqs"]
I_PREFILL_TOKENS = INT_INDEX["prefill_tokens"]
I_DECODE_SEQS = INT_INDEX["decode_seqs"]
I_TOKENS = INT_INDEX["tokens"]
I_HBM_ACTIVE = INT_INDEX["hbm_active_bytes"]
I_HBM_CACHED = INT_INDEX["hbm_cached_bytes"]
I_HBM_LOCKED = INT_INDEX["hbm_locked_bytes"]
I_DRAM_USED = INT_INDEX["dram_used_bytes"]
I_NVME_USED = INT_INDEX["nvme_used_bytes"]
I_FRAG = INT_INDEX["frag_tokens"]
I_LAUNCHES = INT_INDEX["launches"]
I_SYNCS = INT_INDEX["syncs"]
I_PREEMPTIONS = INT_INDEX["preemptions"]
I_DRAM_CACHED = INT_INDEX["dram_cached_bytes"]
I_NVME_CACHED = INT_INDEX["nvme_cached_bytes"]
I_LOADING = INT_INDEX["loading_seqs"]
I_PREFIX_HIT = INT_INDEX["prefix_hit_tokens"]
I_LOADED = INT_INDEX["loaded_tokens"]
I_DRAFT_TOKENS = INT_INDEX["draft_tokens"]
I_ACCEPTED_TOKENS = INT_INDEX["accepted_tokens"]
I_DRAFT_KV = INT_INDEX["draft_kv_bytes"]
I_PADDED_TOKENS = INT_INDEX["padded_tokens"]
I_LANE = INT_INDEX["lane"]
assert len({v for k, v in globals().items() if k.startswith("I_")}) == len(INT_COLUMNS), \
    "every integer column has exactly one I_ constant"


# How ``steps.parquet`` is encoded, by the step logs' spill files and by the merge alike. No dictionary
# pages: step columns hardly repeat, so dictionaries only cost time (on the default run, 0.15 s of zstd
# with them against 0.09 s without, and 9.3 MB against 7.5 MB).
STEP_PARQUET = {"compression": "zstd", "use_dictionary": False}


def schema_metadata(metadata: dict) -> dict[str, str]:
    """A run's metadata (config, hash, cost table and trace identity) as Parquet schema metadata."""
    import json

    return {f"tiersim.{k}": json.dumps(v, sort_keys=True) for k, v in metadata.items()}


def step_schema():
    """The Arrow schema of ``steps.parquet``: replica, every step column, the derived free bytes."""
    import pyarrow as pa

    types = {np.int64: pa.int64(), np.int32: pa.int32(), np.float64: pa.float64()}
    return pa.schema([("replica", pa.int16())] + [(k, types[t]) for k, t in STEP_COLUMNS.items()]
                     + [(k, pa.int64()) for k in FREE_COLUMNS])
