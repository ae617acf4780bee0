"""sim.workload: the [trace] section as a Trace, and errors that name the key to fix."""
from __future__ import annotations

import numpy as np
import pytest

import traces
from sim.config import SimConfig, with_overrides
from sim.errors import ConfigError
from sim.workload import MAX_REQUESTS, load_trace_for, synthetic_trace
from traces import TraceError

MS_CSV = "ts_ms,in,out,who\n1717000000000,120,30,a\n1717000000384,64,8,b\n1717000001500,900,120,a\n"
COLUMNS = {"arrival_s": "ts_ms", "prompt_tokens": "in", "output_tokens": "out"}


def config(**overrides) -> SimConfig:
    return with_overrides(SimConfig(), overrides)


def test_columns_and_time_unit_read_any_csv(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text(MS_CSV)
    t = load_trace_for(config(**{"trace.path": str(path), "trace.columns": {**COLUMNS, "tenant": "who"},
                                 "trace.time_unit": "ms"}))
    assert t.arrival_s.tolist() == [0.0, 0.384, 1.5]          # re-based before scaling: exact
    assert t.prompt_tokens.tolist() == [120, 64, 900] and t.tenant.tolist() == ["a", "b", "a"]
    assert t.meta["format"] == "csv" and t.meta["clock_origin_s"] == pytest.approx(1_717_000_000.0)


def test_column_keys_can_be_set_one_by_one(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text(MS_CSV)
    cfg = with_overrides(SimConfig(), [f"trace.path={str(path)!r}", 'trace.columns.arrival_s="ts_ms"',
                                       'trace.columns.prompt_tokens="in"', 'trace.columns.output_tokens="out"',
                                       "trace.time_unit=ms"])
    assert cfg.trace.columns == COLUMNS and len(load_trace_for(cfg)) == 3


@pytest.mark.parametrize("overrides, needle", [
    ({"trace.columns": {"arrival": "ts"}}, "trace.columns.arrival: unknown canonical column"),
    ({"trace.columns": {"arrival_s": 5}}, "trace.columns.arrival_s: expected the name of a column"),
    ({"trace.columns": "ts"}, "trace.columns: expected a table"),
    ({"trace.time_unit": "h"}, "trace.time_unit: must be one of s, ms, us, ns, datetime"),
    ({"trace.time_format": "%Y"}, 'trace.time_format: is only used with trace.time_unit = "datetime"'),
    ({"trace.hash_block_tokens": -1}, "trace.hash_block_tokens: must be 0"),
    ({"trace.format": "tsv"}, "trace.format: must be one of azure, mooncake, burstgpt, csv, parquet"),
    ({"trace.rate_scale": float("inf")}, "trace.rate_scale: must be a finite number"),
    ({"trace.rate_scale": 1e-12}, "trace.rate_scale: must be in [1e-06, 1e+06]"),
    ({"trace.start_s": 2e9}, "trace.start_s: must be <= 1e9 s"),
    ({"trace.repeat": 10**7}, "trace.repeat: must be <= 1,000,000"),
    ({"metrics.slo_ttft_s": float("nan")}, "metrics.slo_ttft_s: must be a finite number"),
    ({"cluster.num_replicas": 10**6}, "cluster.num_replicas: must be in [1, 1024]"),
    ({"policies.execution.dispatch_s": float("inf")}, "policies.execution.dispatch_s: must be a finite number"),
])
def test_absurd_and_non_finite_values_are_refused_naming_the_key(overrides, needle):
    with pytest.raises(ConfigError) as err:
        config(**overrides)
    assert needle in str(err.value)


@pytest.mark.parametrize("overrides, needle", [
    ({"trace.start_s": 1e6}, "trace.start_s: 1e+06 s is after the last request of AzureLLMInferenceTrace_conv"),
    ({"trace.start_s": 100, "trace.end_s": 100.0001},
     "trace.start_s and trace.end_s: no request of AzureLLMInferenceTrace_conv"),
    ({"trace.rate_scale": 1e-6}, "trace.rate_scale: 1e-06 stretches the 3502 s of AzureLLMInferenceTrace_conv"),
    ({"trace.max_requests": 1, "trace.repeat": 2}, "trace.repeat: needs at least 2 requests"),
    ({"trace.max_requests": 20, "trace.max_total_tokens": 2}, "trace.max_total_tokens: 2 leaves no room"),
    ({"trace.columns": {"arrival_s": "TIMESTAMP"}}, "trace.columns: only the csv and parquet formats read it"),
    ({"trace.hash_block_tokens": 64}, "trace.hash_block_tokens: only mooncake and parquet traces"),
    ({"trace.bundled": "nope"}, "trace.bundled: unknown bundled trace 'nope'"),
    ({"trace.bundled": "sharegpt-lengths"}, "trace.bundled: 'sharegpt-lengths' is a length distribution"),
    ({"trace.synthetic": "poisson rate=5 n=10", "trace.time_unit": "ms"},
     "trace.time_unit: not used with trace.synthetic"),
])
def test_workload_errors_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_trace_for(config(**overrides))
    assert needle in str(err.value), str(err.value)


def test_repeat_is_capped_at_the_requests_one_run_can_hold():
    with pytest.raises(ConfigError, match="more than the 100,000,000 one run can hold"):
        load_trace_for(config(**{"trace.repeat": 10**6, "trace.max_requests": MAX_REQUESTS // 10**6 + 1}))


def test_a_file_without_requests_is_named(tmp_path):
    path = tmp_path / "bg.csv"
    path.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                    "5,ChatGPT,10,0,10,Conversation log\n")
    with pytest.raises(TraceError, match=r"bg.csv: the file holds no requests \(all rows were dropped: 1 failed\)"):
        load_trace_for(config(**{"trace.path": str(path)}))


@pytest.mark.parametrize("spec, needle", [
    ("poisson rate=5 n=1.5", "n=1.5 must be a whole number"),
    ("poisson rate=nan n=10", "rate=nan must be finite"),
    ("poisson rate=0 n=10", "rate=0 must be > 0"),
    ("gamma rate=5 cv=1e-300 n=10", "cv=1e-300 must be >= 0.001"),
    ("poisson rate=5 n=1e12", "n=1e12 must be <= 1e+08"),
    ("poisson rate=1e300 duration=10", "more than the 100,000,000 one run can hold"),
    ("poisson rate=5 duration=1e300", "duration=1e300 must be <= 1e+09"),
    ("poisson rate=5 n=10 duration=5", "give either n=<requests> or duration=<seconds>, not both"),
    ("poisson rate=5 n=10 seed=x", "seed='x' is not a number"),
    ("poisson rate=5 n=10 prompt=fixed:0", "bad length spec 'fixed:0'"),
    ("poisson rate=5 n=10 n=3", "n is given twice"),
])
def test_synthetic_spec_errors_name_the_option(spec, needle):
    with pytest.raises(ConfigError) as err:
        synthetic_trace(spec, 0)
    assert str(err.value).startswith("trace.synthetic: ") and needle in str(err.value), str(err.value)


def test_synthetic_spec_draws_what_synthesize_draws():
    t = synthetic_trace("gamma rate=5 cv=3 n=1e3 prompt=lognormal:1024:0.8 output=fixed:16", 7)
    s = traces.synthesize(rate_per_s=5.0, num_requests=1000, arrival="gamma", cv=3.0,
                          prompt="lognormal:1024:0.8", output="fixed:16", seed=7)
    assert np.array_equal(t.arrival_s, s.arrival_s) and np.array_equal(t.prompt_tokens, s.prompt_tokens)
    paired = synthetic_trace("poisson rate=5 n=50 lengths=empirical:sharegpt-lengths", 1)
    assert paired.meta["params"]["lengths"] == "empirical:sharegpt-lengths"
