"""Engine sweep: how the cached engine's cost grows with lookback, pred_len, batch size and sample_count, for the
Kronos-small and Kronos-base geometries, and cached against the uncached reference (`use_cache=False`).

Workload, timing and contention detection are bench/engine_bench.py's: random weights from a fixed seed, real
5-minute candles, greedy decoding (so cached and uncached runs do the same work and must produce the same codes),
CPU seconds per wall second per run to flag runs that shared the cores with another job. The sweep varies one
factor at a time around a base point; the uncached comparisons are engine_bench scenarios (the engine issue's
one-series targets plus a window beyond the context), their uncached side shortened and extrapolated as in its
--quick.
"""

import time
from dataclasses import asdict, dataclass

import torch

from bench import engine_bench
from bench.engine_bench import (
    GEOMETRIES,
    MAX_CONTEXT,
    SCENARIO_BY_KEY,
    Scenario,
    median_run,
    run_scenario,
    series_inputs,
    timed_forecast,
)

# A run shorter than this is repeated (median of 3 after a warm-up): short runs are noisy and cheap.
REPEAT_BELOW_SECONDS = 2.0
LARGEST_BATCH_CAP = 4096  # GPU: stop doubling the batch here even when it still fits


@dataclass(frozen=True)
class Point:
    """One engine call: `batch` series of `lookback` candles, `pred_len` steps, `sample_count` paths each."""

    batch: int
    lookback: int
    pred_len: int
    sample_count: int = 1

    @property
    def rows(self) -> int:
        return self.batch * self.sample_count

    @property
    def window_slides(self) -> bool:
        """Whether some step's window is longer than max_context, so that row is recomputed in full."""
        return self.lookback + self.pred_len - 1 > MAX_CONTEXT


@dataclass(frozen=True)
class Plan:
    """Which points each sweep axis measures (one factor varied around `base`) and which uncached comparisons."""

    base: Point
    lookbacks: tuple[int, ...]
    pred_lens: tuple[int, ...]
    batches: tuple[int, ...]
    sampled_batches: tuple[int, ...]  # batch sizes measured again with SAMPLED_PATHS paths per series
    comparisons: dict[str, tuple[Scenario, ...]]  # geometry -> cached vs uncached scenarios

    def axes(self) -> dict[str, list[Point]]:
        b = self.base
        return {
            "lookback": [Point(b.batch, lookback, b.pred_len) for lookback in self.lookbacks],
            "pred_len": [Point(b.batch, b.lookback, pred_len) for pred_len in self.pred_lens],
            "batch": [Point(batch, b.lookback, b.pred_len) for batch in self.batches],
            "sample_count": [Point(batch, b.lookback, b.pred_len, SAMPLED_PATHS) for batch in self.sampled_batches],
        }


SAMPLED_PATHS = 8
BEYOND_CONTEXT = Scenario(
    "1x1024", 1, 1024, 30, None, "one series, lookback 1024 > max_context 512: the window slides every step"
)
# The 16-series targets (16x392, 16x400) cost ~4 min even on a quiet machine and far more on a busy one; they are
# measured in full, uncached side unshortened, by `python -m bench.engine_bench` (docs/ENGINE.md).
TARGETS = tuple(SCENARIO_BY_KEY[key] for key in ("1x392", "1x400"))
FULL = Plan(
    base=Point(1, 256, 60),
    lookbacks=(64, 128, 256, 448, 512, 1024),
    pred_lens=(30, 60, 120),
    batches=(1, 4, 16, 64),
    sampled_batches=(1, 4, 8),
    comparisons={
        "kronos-small": (*TARGETS, BEYOND_CONTEXT),
        "kronos-base": (SCENARIO_BY_KEY["1x392"], Scenario("4x392", 4, 392, 120, None, "4 series in one call")),
    },
)
QUICK = Plan(
    base=Point(1, 256, 20),
    lookbacks=(64, 256, 1024),
    pred_lens=(10, 20),
    batches=(1, 4),
    sampled_batches=(1,),
    comparisons={"kronos-small": (SCENARIO_BY_KEY["1x392"],), "kronos-base": ()},
)


def stride_for(point: Point, candles_count: int) -> int:
    """Start rows far enough apart to differ, close enough that `batch` windows fit in the candle file."""
    room = candles_count - point.lookback - point.pred_len
    return min(engine_bench.SERIES_STRIDE, room // max(1, point.batch - 1))


def measure_point(engine, candles, point: Point, device: str) -> dict:
    inputs = series_inputs(
        candles,
        point.batch,
        point.lookback,
        point.pred_len,
        sample_count=point.sample_count,
        stride=stride_for(point, len(candles)),
    )
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    probe = timed_forecast(engine, inputs, use_cache=True)  # also the warm-up of this shape
    if probe.seconds < REPEAT_BELOW_SECONDS:
        runs = [timed_forecast(engine, inputs, use_cache=True) for _ in range(3)]
    else:
        # a long run is its own warm-up; rerun it once only when another job took a core during it
        runs = [probe] if not probe.contended else [probe, timed_forecast(engine, inputs, use_cache=True)]
    quiet = [r for r in runs if not r.contended] or runs
    run = median_run(quiet)
    decode_steps = run.intervals(range(1, len(run.marks)))
    return {
        **asdict(point),
        "rows": point.rows,
        "window_slides": point.window_slides,
        **engine_bench.rates(run.seconds, point.batch),
        "seconds_per_step": run.seconds / point.pred_len,
        "first_step_seconds": run.marks[0],
        "median_step_seconds": engine_bench.median(decode_steps),
        "runs_seconds": [r.seconds for r in runs],
        "cpu_utilization": run.cpu_utilization,
        "contended": run.contended,
        "peak_gpu_memory_mib": torch.cuda.max_memory_allocated() / engine_bench.MIB
        if device.startswith("cuda")
        else None,
    }


def largest_batch(engine, candles, point: Point) -> dict:
    """GPU only: double the batch of `point` until it runs out of memory (or reaches LARGEST_BATCH_CAP)."""
    fits = None
    batch = point.batch
    while batch <= LARGEST_BATCH_CAP:
        trial = Point(batch, point.lookback, point.pred_len)
        # more series than the candle file has distinct windows: windows repeat, which costs the same
        inputs = series_inputs(candles, min(batch, 256), trial.lookback, trial.pred_len, stride=1)
        inputs = (inputs * (batch // len(inputs) + 1))[:batch]
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            t0 = time.perf_counter()
            engine.forecast(inputs)
            seconds = time.perf_counter() - t0
        except torch.OutOfMemoryError:
            break
        fits = {
            **asdict(trial),
            **engine_bench.rates(seconds, batch),
            "peak_gpu_memory_mib": torch.cuda.max_memory_allocated() / engine_bench.MIB,
        }
        batch *= 2
    torch.cuda.empty_cache()
    return {"largest_batch_that_fits": fits, "first_failing_batch": batch if batch <= LARGEST_BATCH_CAP else None}


def sweep_geometry(geometry: str, plan: Plan, candles, device: str, dtype: torch.dtype, say) -> dict:
    engine = engine_bench.build_engine(GEOMETRIES[geometry], device, dtype)
    timed_forecast(engine, series_inputs(candles, 1, 64, 4), use_cache=True)  # first-call warm-up
    measured: dict[Point, dict] = {}
    axes = {}
    for axis, points in plan.axes().items():
        for point in points:
            if point not in measured:
                say(
                    f"{geometry}: {point.batch} series x {point.sample_count} paths, lookback {point.lookback}, "
                    f"{point.pred_len} steps"
                )
                measured[point] = measure_point(engine, candles, point, device)
        axes[axis] = [measured[point] for point in points]
    comparisons = []
    for scenario in plan.comparisons.get(geometry, ()):
        say(f"{geometry}: cached vs uncached, scenario {scenario.key}")
        comparisons.append(run_scenario(engine, candles, scenario, repeats=1, quick=True, uncached_retries=1))
    result = {
        "predictor": {**asdict(GEOMETRIES[geometry]), "geometry": geometry},
        "parameters_millions": sum(p.numel() for p in engine.predictor.parameters()) / 1e6,
        "axes": axes,
        "comparisons": comparisons,
    }
    if device.startswith("cuda"):
        say(f"{geometry}: largest batch that fits")
        result["largest_batch"] = largest_batch(engine, candles, Point(64, plan.base.lookback, plan.base.pred_len))
    return result


def run(geometries: list[str], quick: bool, device: str, dtype: torch.dtype, threads: int, say) -> dict:
    plan = QUICK if quick else FULL
    candles = engine_bench.load_candles()
    report = {
        "plan": {
            "base_point": asdict(plan.base),
            "lookbacks": plan.lookbacks,
            "pred_lens": plan.pred_lens,
            "batches": plan.batches,
            "sampled_batches": plan.sampled_batches,
            "sampled_paths": SAMPLED_PATHS,
            "max_context": MAX_CONTEXT,
            "how": "one factor varied around the base point; greedy decoding; runs under "
            f"{REPEAT_BELOW_SECONDS:g} s: median of 3 after a warm-up run, longer runs: one run (a second one "
            "when the first was contended); uncached comparisons: engine_bench scenarios, uncached side "
            f"{engine_bench.QUICK_UNCACHED_STEPS} steps extrapolated linearly to the horizon",
        },
        "geometries": {},
    }
    for geometry in geometries:
        report["geometries"][geometry] = sweep_geometry(geometry, plan, candles, device, dtype, say)
        if device == "cpu":
            say(f"{geometry}: peak RSS (fresh subprocess)")
            report["geometries"][geometry]["memory"] = engine_bench.measure_memory(threads, geometry)
    return report
