"""Reader for BurstGPT (Azure OpenAI ChatGPT / GPT-4 usage; GitHub HPMLL/BurstGPT, CC BY 4.0).

Format: CSV. The original files have ``Timestamp, Model, Request tokens, Response tokens, Total tokens,
Log Type``; version 3 inserts ``Session ID`` and ``Elapsed time`` as the 2nd and 3rd columns. Columns
are found by name, so both layouts read the same way.

``Timestamp`` is seconds from 00:00:00 of the first day; ``Model`` (``ChatGPT``/``GPT-4``) becomes
``tenant`` and ``Session ID`` ``session_id``. ``Total tokens``, ``Log Type`` and ``Elapsed time`` (the
observed response time, an output of serving, not an input) are not used.

Failed requests are recorded with ``Response tokens`` = 0. A request with no output cannot be replayed,
so by default they are dropped and counted in ``meta["dropped_failed"]``. With ``keep_failed=True``
they stay in the trace with ``output_tokens`` = 1 (the smallest valid value: the request still costs a
prefill and one decode step), counted in ``meta["kept_failed"]`` and listed by request id in
``meta["failed_request_ids"]``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from traces.readers.columns import SourceColumns, csv_line_of_row, default_name, read_csv_columns
from traces.schema import Trace

REQUIRED = ("Timestamp", "Model", "Request tokens", "Response tokens")
OPTIONAL = ("Session ID",)
FAILED_COLUMN = "Response tokens"


def read_burstgpt(path: str | Path, *, name: str | None = None, keep_failed: bool = False) -> Trace:
    """Load a BurstGPT CSV (any release, plain or gzip) into a validated Trace.

    ``request_id`` is the 0-based data row of the file, so ids skip the failed rows that were dropped.
    """
    path = Path(path)
    frame = read_csv_columns(path, REQUIRED, OPTIONAL, as_text=("Model", "Session ID"))
    # a boolean False is not the failed marker 0: it is refused like any boolean count
    failed = ((pd.to_numeric(frame[FAILED_COLUMN], errors="coerce") == 0).to_numpy()
              & (frame[FAILED_COLUMN].dtype.kind != "b"))
    num_failed = int(failed.sum())
    if not keep_failed:
        frame = frame[~failed]
    cols = SourceColumns(path, csv_line_of_row)
    arrival, origin_s = cols.arrivals(frame["Timestamp"], "Timestamp")
    tenant = cols.strings(frame["Model"], "Model")
    prompt = cols.tokens(frame["Request tokens"], "Request tokens")
    responses = frame[FAILED_COLUMN].where(~failed, 1) if keep_failed else frame[FAILED_COLUMN]
    output = cols.tokens(responses, FAILED_COLUMN)
    session = cols.strings(frame["Session ID"], "Session ID") if "Session ID" in frame else None
    cols.raise_problems()

    request_id = frame.index.to_numpy(dtype=np.int64)
    meta: dict = {"format": "burstgpt", "rows_read": int(len(failed)), "clock_origin_s": origin_s,
                  "layout": "v3 (with Session ID)" if session is not None else "original"}
    if keep_failed:
        meta["kept_failed"] = num_failed
        meta["failed_request_ids"] = request_id[failed].tolist()
    else:
        meta["dropped_failed"] = num_failed
    return Trace(arrival_s=arrival, prompt_tokens=prompt, output_tokens=output, request_id=request_id,
                 tenant=tenant, session_id=session, name=name or default_name(path),
                 source=str(path.resolve()), meta=meta)
