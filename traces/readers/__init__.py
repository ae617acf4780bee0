"""One reader per public trace format; each returns a validated :class:`traces.schema.Trace`."""
from traces.readers.azure import read_azure
from traces.readers.burstgpt import read_burstgpt
from traces.readers.generic import read_csv_trace, read_parquet_trace
from traces.readers.mooncake import read_mooncake

__all__ = ["read_azure", "read_burstgpt", "read_csv_trace", "read_mooncake", "read_parquet_trace"]
