"""Smoke test of the engine sweep (bench/engine_sweep.py) through the suite's real entry point, on a tiny
geometry: it checks the fields docs/BENCHMARKS.md reads, never timings. It builds and times real engines, which
takes about a minute (the statistics and tables: tests/unit/test_bench_suite.py)."""

import json

from bench import __main__ as suite
from bench import engine_bench, engine_sweep
from model.config import PredictorConfig

TINY = PredictorConfig(d_model=16, n_layers=1, n_heads=2, ff_dim=16, s1_bits=10, s2_bits=10, learn_te=True)
TINY_PLAN = engine_sweep.Plan(
    base=engine_sweep.Point(1, 32, 3),
    lookbacks=(32, 520),
    pred_lens=(3,),
    batches=(1, 2),
    sampled_batches=(1,),
    comparisons={"kronos-small": (engine_bench.Scenario("1x32", 1, 32, 3, None, "tiny"),)},
)


def test_tiny_engine_sweep_through_the_entry_point(tmp_path, monkeypatch):
    monkeypatch.setitem(engine_bench.GEOMETRIES, "kronos-small", TINY)
    monkeypatch.setattr(engine_sweep, "QUICK", TINY_PLAN)
    monkeypatch.setattr(engine_bench, "measure_memory", lambda threads, geometry: {"peak_rss_mib": 1.0})
    assert suite.main(["--quick", "--only", "engine", "--out-dir", str(tmp_path)]) == 0

    report = json.loads((tmp_path / "engine_sweep_cpu.json").read_text())
    assert report["gpu"]["used"] is False and "note" in report["gpu"]
    assert {"cpu_model", "cores", "torch"} <= report["machine"].keys()
    small = report["geometries"]["kronos-small"]
    for axis in ("lookback", "pred_len", "batch", "sample_count"):
        for point in small["axes"][axis]:
            assert {"seconds", "seconds_per_series", "series_per_second", "contended", "rows"} <= point.keys()
    assert small["axes"]["lookback"][1]["window_slides"] is True
    [comparison] = small["comparisons"]
    assert comparison["codes_identical"] and comparison["speedup"] > 0
    assert {"seconds", "extrapolated"} <= comparison["uncached"].keys()
    suite_json = json.loads((tmp_path / "suite_cpu.json").read_text())
    assert len(suite_json["plots"]) == 2 and "wall_seconds" in suite_json
    assert "1x32" in (tmp_path / "tables_cpu.md").read_text()
