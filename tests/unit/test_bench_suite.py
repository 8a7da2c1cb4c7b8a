"""Smoke test of the benchmark suite (bench/): the end-to-end statistics, plots and tables on hand-made
records. It checks the fields docs/BENCHMARKS.md reads, never timings. The engine sweep through the real entry
point is tests/integration/test_bench_engine_sweep.py; the end-to-end part with real workers runs only in
`python -m bench` (its startup alone takes longer than a test may)."""

from datetime import UTC, datetime

import pytest

from bench import __main__ as suite
from bench import compare, e2e, plots, reference, tables


def test_percentiles():
    assert e2e.percentiles([]) == {"p50": None, "p95": None, "p99": None, "mean": None}
    stats = e2e.percentiles(range(101))
    assert (stats["p50"], stats["p95"], stats["p99"], stats["mean"]) == (50, 95, 99, 50)


def result_meta(job_id: str, inference: float, finished_at: float, batch_size: int = 1) -> dict:
    result = {
        "job_id": job_id,
        "series_id": job_id,
        "model": "kronos-small",
        "model_id": "/tmp/predictor",
        "tokenizer_id": "/tmp/tokenizer",
        "timestamps": ["2024-01-01T00:00:00Z"],
        "forecast": {"close": [1.0]},
        "sample_count": 1,
        "worker": "bench0@vm",
        "device": "cpu",
        "batch_size": batch_size,
        "timings": {"queue_wait": 0.02, "preprocess": 0.01, "batch_wait": 0.0, "inference": inference, "total": 1},
        "finished_at": datetime.fromtimestamp(finished_at, UTC).isoformat(),
    }
    return {"status": "SUCCESS", "task_id": job_id, "result": result}


def test_job_record_splits_the_latency():
    record = e2e.job_record(100.0, 101.0, result_meta("a", inference=0.9, finished_at=100.95))
    assert record["latency"] == pytest.approx(1.0)
    assert record["result_store"] == pytest.approx(0.05)
    assert sum(record[stage] for stage in e2e.STAGES) == pytest.approx(record["latency"])
    assert e2e.job_record(0.0, 1.0, {"status": "FAILURE", "result": {}})["failed"]


def test_overhead_uses_quiet_pairs_and_compares_with_the_direct_run():
    pairs = [
        {**e2e.job_record(0.0, 1.1, result_meta(str(i), 1.0, 1.09)), "direct": 1.0, "contended": False}
        for i in range(3)
    ]
    pairs.append({**pairs[0], "direct": 5.0, "contended": True, "foreign_cores": 1.0})
    for pair in pairs[:3]:
        pair["foreign_cores"] = 0.0
    summary = e2e.overhead_summary(pairs)
    assert summary["quiet_pairs"] == 3 and summary["pairs_used"] == "quiet"
    assert summary["overhead_percent_of_inference"] == pytest.approx(10.0)
    assert summary["outside_inference_percent"] == pytest.approx(10.0)


def e2e_report(tmp_path) -> dict:
    records = [e2e.job_record(i, i + 0.5, result_meta(f"j{i}", 0.4, i + 0.49, batch_size=2)) for i in range(4)]
    run = {"fraction_of_capacity": 0.5, **e2e.summarize(records, 2.0), "cpu": {"contended": False}}
    pairs = [{**r, "direct": 0.4, "contended": False, "foreign_cores": 0.0} for r in records]
    memory = {"rss_mib": 400.0, "peak_rss_mib": 450.0}
    return {
        **suite.header(suite.parse_args(["--quick", "--out-dir", str(tmp_path)]), "e2e", 2),
        "job": {"lookback": 256, "pred_len": 30},
        "queue_overhead": {
            "jobs": {"short": {"lookback": 256, "pred_len": 30, **e2e.overhead_summary(pairs)}},
            "worker_memory": {"after_load": memory, "after_serving": memory},
        },
        "load": [{"workers": w, "saturation": run, "runs": [run]} for w in (1, 2)],
    }


def test_end_to_end_summary_and_plot(tmp_path):
    report = e2e_report(tmp_path)
    run = report["load"][0]["runs"][0]
    assert run["jobs_per_second"] == pytest.approx(4 / 3.5)
    assert run["batch_size_mean"] == 2 and set(run["latency"]) == {"p50", "p95", "p99", "mean"}
    [path] = plots.draw_all(None, report, tmp_path, "cpu")
    assert path.stat().st_size > 0
    assert "Queue overhead" in tables.markdown(None, report)


def test_reference_column_is_skipped_with_the_reason_when_its_python_is_missing(tmp_path):
    python, why = reference.locate(str(tmp_path / "no-python"))
    assert python is None and "--reference-python" in why and "no such file" in why


def comparison_report(with_reference: bool) -> dict:
    seconds = {"best": 0.9, "median": 1.0, "runs": [1.0, 0.9]}
    workload = {"key": "1x392", "series": 1, "lookback": 392, "pred_len": 120, "target": 20.0}
    workload["project_seconds_per_series"] = seconds
    if with_reference:
        workload |= {
            "reference_series": 1,
            "reference_seconds_per_series": {"best": 27.0, "median": 30.0, "runs": [30.0, 27.0]},
            "speedup_median": 30.0,
            "speedup_best": 30.0,
            "pass": True,
        }
    drift = {"code_agreement_mean": 0.5, "close_mape_percent": 0.2}
    precision = {"decode_path": "eager", "seconds_1x392": seconds, "speedup_over_float32_median": 1.0}
    return {
        "workloads": [workload],
        "decode_floor": {
            "decode_path": "compiled (inductor)",
            "decode_step_ms": {"best": 4.0, "median": 4.5},
            "matrix_vector_products": 59,
            "weight_megabytes": 88.0,
            "floor_ms": {"best": 5.0, "median": 5.5},
            "floor_gb_per_s_best": 17.6,
            "onednn_floor_ms": {"best": 2.0, "median": 2.5},
            "ratio_median": 0.82,
            "ratio_best": 0.8,
            "ratio_to_onednn_floor_median": 1.8,
            "target": 1.3,
            "pass": True,
        },
        "precisions": {"float32": precision, "int8": {**precision, "drift": drift}},
        "first_forecast": {
            "engine_build_seconds": 20.0,
            "first_forecast_seconds": 1.0,
            "later_forecast_seconds_median": 1.0,
            "graphs_compiled_during_first_forecast": 0,
        },
        "reference": "KRONOS_BENCH_REFERENCE_PYTHON /x/python" if with_reference else "no reference Python",
    }


@pytest.mark.parametrize("with_reference", [True, False])
def test_comparison_table_names_ratio_floor_and_precisions(with_reference):
    text = compare.table(comparison_report(with_reference))
    assert ("**30.0x**" in text) == with_reference
    assert ("(no reference)" in text) != with_reference
    assert "**0.82x**" in text and "| int8 | eager |" in text and "50.0%" in text


def test_the_profiles_overhead_floor_is_built_the_way_the_profiled_engine_was(monkeypatch):
    """An eager d_model-16 step under a compiled Kronos-small step would report the overhead compile removes as
    the floor (it did: 10 ms against a 1.7 ms compiled floor)."""
    from types import SimpleNamespace

    from bench import engine_bench

    built = []

    class Built(Exception):
        pass

    def engine_factory(*args, compile=False, **kwargs):
        built.append(compile)
        raise Built

    monkeypatch.setattr(engine_bench, "KronosEngine", engine_factory)
    monkeypatch.setattr(engine_bench, "_decoding", lambda engine, inputs, steps: (None, None))
    monkeypatch.setattr(engine_bench, "_time_steps", lambda batch, h_last, first, count: (0.0, None))
    candles = engine_bench.load_candles()
    for decode_path, compiled in [("compiled (inductor), oneDNN linears", True), ("eager, oneDNN linears", False)]:
        engine = SimpleNamespace(info=SimpleNamespace(decode_path=decode_path), tokenizer=None)
        with pytest.raises(Built):
            engine_bench.profile_decode(engine, candles, rows=1)
        assert built[-1] is compiled
