"""Reader for the Azure LLM inference trace 2023 (Splitwise, ISCA 2024; GitHub Azure/AzurePublicDataset).

Format: CSV with header ``TIMESTAMP,ContextTokens,GeneratedTokens``, CRLF line endings, timestamps as
``YYYY-MM-DD HH:MM:SS.fffffff`` (7 fractional digits, no time zone). Rows are requests in time order.
``ContextTokens`` becomes ``prompt_tokens`` and ``GeneratedTokens`` ``output_tokens``; ``arrival_s`` is
seconds since the first timestamp, computed in integer nanoseconds so no precision is lost.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from traces.readers.columns import SourceColumns, csv_line_of_row, default_name, read_csv_columns
from traces.schema import Trace

TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def read_azure(path: str | Path, *, name: str | None = None) -> Trace:
    """Load an Azure LLM inference 2023 CSV (plain or gzip) into a validated Trace.

    ``request_id`` is the 0-based data row. ``meta`` records ``time_origin`` (the first timestamp as
    written, read as UTC) and ``clock_origin_s`` (its seconds since midnight).
    """
    path = Path(path)
    frame = read_csv_columns(path, COLUMNS, as_text=("TIMESTAMP",))
    cols = SourceColumns(path, csv_line_of_row)
    arrival, clock_origin_s, time_origin = cols.datetime_arrivals(frame["TIMESTAMP"], "TIMESTAMP", TIMESTAMP_FORMAT)
    prompt = cols.tokens(frame["ContextTokens"], "ContextTokens")
    output = cols.tokens(frame["GeneratedTokens"], "GeneratedTokens")
    cols.raise_problems()
    return Trace(arrival_s=arrival, prompt_tokens=prompt, output_tokens=output,
                 request_id=np.arange(len(arrival), dtype=np.int64),
                 name=name or default_name(path), source=str(path.resolve()),
                 meta={"format": "azure", "rows_read": len(frame), "time_origin": time_origin,
                       "clock_origin_s": clock_origin_s})
