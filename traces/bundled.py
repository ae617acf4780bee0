"""Real traces shipped inside the package (``traces/data/``), so defaults and tests need no download.

Each file is the upstream original compressed with ``gzip -9 -n`` (``zcat`` restores the exact bytes).
Attribution and licenses are in the top-level ``NOTICE`` and ``LICENSES/``; keep them beside any copy.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from traces.schema import TraceError

DATA_DIR = Path(__file__).parent / "data"


@dataclass(frozen=True, slots=True, kw_only=True)
class BundledFile:
    """One shipped file: where it is, how to read it, what it holds and under which license."""

    name: str
    file: str
    format: str          # a load_trace format, or "lengths" for a length distribution (synth only)
    description: str
    license: str
    attribution: str
    upstream: str

    @property
    def path(self) -> Path:
        return DATA_DIR / self.file


_AZURE_ATTRIBUTION = ('Patel et al., "Splitwise: Efficient generative LLM inference using phase '
                      'splitting", ISCA 2024')

BUNDLED: Mapping[str, BundledFile] = MappingProxyType({f.name: f for f in (
    BundledFile(name="azure-conv", file="AzureLLMInferenceTrace_conv.csv.gz", format="azure",
                description="Azure LLM inference 2023, conversation service: 19,366 requests over 58.4 min",
                license="CC-BY-4.0", attribution=_AZURE_ATTRIBUTION,
                upstream="github.com/Azure/AzurePublicDataset data/AzureLLMInferenceTrace_conv.csv"),
    BundledFile(name="azure-code", file="AzureLLMInferenceTrace_code.csv.gz", format="azure",
                description="Azure LLM inference 2023, coding service: 8,819 requests over 57.3 min, bursty",
                license="CC-BY-4.0", attribution=_AZURE_ATTRIBUTION,
                upstream="github.com/Azure/AzurePublicDataset data/AzureLLMInferenceTrace_code.csv"),
    BundledFile(name="mooncake-conversation", file="conversation_trace.jsonl.gz", format="mooncake",
                description="Mooncake FAST'25 (Kimi) conversation trace: 12,031 requests over 58.9 min, "
                            "512-token prefix-block hashes",
                license="Apache-2.0",
                attribution='Qin et al., "Mooncake: Trading More Storage for Less Computation - A '
                            'KVCache-centric Architecture for Serving LLM Chatbot", FAST 2025',
                upstream="github.com/kvcache-ai/Mooncake FAST25-release/traces/conversation_trace.jsonl"),
    BundledFile(name="mooncake-synthetic", file="synthetic_trace.jsonl.gz", format="mooncake",
                description="Mooncake FAST'25 synthetic trace: 3,993 requests from public datasets over "
                            "17.0 min, Poisson arrivals, 512-token prefix-block hashes",
                license="Apache-2.0",
                attribution='Qin et al., "Mooncake: Trading More Storage for Less Computation - A '
                            'KVCache-centric Architecture for Serving LLM Chatbot", FAST 2025',
                upstream="github.com/kvcache-ai/Mooncake FAST25-release/traces/synthetic_trace.jsonl"),
    BundledFile(name="sharegpt-lengths", file="sharegpt_8k_filtered_stats_llama2_tokenizer.csv.gz",
                format="lengths",
                description="ShareGPT prompt/output lengths (Llama-2 tokenizer, <= 8K): 30,731 rows, "
                            "no arrival times",
                license="Apache-2.0", attribution="microsoft/sarathi-serve",
                upstream="github.com/microsoft/sarathi-serve "
                         "data/processed_traces/sharegpt_8k_filtered_stats_llama2_tokenizer.csv"),
)})


def bundled_path(name: str) -> Path:
    """The installed path of a bundled file by its short name (see ``BUNDLED``)."""
    entry = BUNDLED.get(name)
    if entry is None:
        raise TraceError(f"unknown bundled trace {name!r} (known: {', '.join(BUNDLED)})")
    if not entry.path.is_file():
        raise TraceError(f"bundled file {entry.file} is missing from this installation ({entry.path})")
    return entry.path
