"""Engine benchmark on CPU: KV-cached generation against the uncached reference algorithm.

    python -m bench.engine_bench [--quick] [--out bench/results/engine_cpu.json] [--scenarios 1x392 16x400 ...]

Kronos-small geometry (predictor d_model 512, 8 layers, 8 heads, ff 1024; Kronos-Tokenizer-base) with random
weights from a fixed seed, on real 5-minute candles, greedy decoding (top_k=1) so that the cached and the
uncached (`use_cache=False`) runs do the same work and must produce the same codes. Every scenario runs both
in this process, so the speedups are ratios of timings taken side by side on the same (possibly busy) machine.

--quick generates only QUICK_UNCACHED_STEPS steps in the uncached runs and extrapolates their time linearly to
the full horizon; such numbers are marked "extrapolated" in the table and the JSON. Peak RSS is measured in a
fresh subprocess that builds the engine and runs one cached forecast of scenario 1x392.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench.harness import code_version, cpu_model
from model import KronosEngine, SeriesInput
from model.config import PredictorConfig, TokenizerConfig
from model.engine import Sampling
from model.kronos import KronosPredictor, KronosTokenizer, prefill

ROOT = Path(__file__).resolve().parent.parent
CANDLES_CSV = ROOT / "tests" / "fixtures" / "data" / "kline_5min_2500.csv"
DEFAULT_OUT = ROOT / "bench" / "results" / "engine_cpu.json"
SEED = 0
MAX_CONTEXT = 512
SERIES_STRIDE = 120  # series i of a batch starts at candle row i * SERIES_STRIDE
QUICK_UNCACHED_STEPS = 24
# A run is "contended" when this process got less than this share of its threads' CPU time: another job held
# a core. With OpenMP threads that wait on each other, that can slow a step down tenfold.
CONTENDED_BELOW = 0.9
MIB = 1024 * 1024

# NeoQuasar/Kronos-Tokenizer-base and NeoQuasar/Kronos-small (their published config.json files)
TOKENIZER = TokenizerConfig(
    d_in=6, d_model=256, n_heads=4, ff_dim=512, n_enc_layers=4, n_dec_layers=4, s1_bits=10, s2_bits=10
)
PREDICTOR = PredictorConfig(d_model=512, n_layers=8, n_heads=8, ff_dim=1024, s1_bits=10, s2_bits=10, learn_te=True)
# NeoQuasar/Kronos-base: 102.3 M parameters, same tokenizer and context
PREDICTOR_BASE = PredictorConfig(
    d_model=832, n_layers=12, n_heads=16, ff_dim=2048, s1_bits=10, s2_bits=10, learn_te=True
)
GEOMETRIES = {"kronos-small": PREDICTOR, "kronos-base": PREDICTOR_BASE}
RSS_TARGET_MIB = 1024


@dataclass(frozen=True)
class Scenario:
    key: str
    series: int
    lookback: int
    pred_len: int
    target: float | None  # minimum speedup, uncached seconds / cached seconds for the same call; None: no target
    description: str

    @property
    def recompute_steps(self) -> int:
        """Steps whose appended token makes the window slide: the cached run recomputes the whole window."""
        return max(0, min(self.pred_len - 1, self.lookback + self.pred_len - 1 - MAX_CONTEXT))


SCENARIOS = (
    Scenario("1x392", 1, 392, 120, 12.0, "one series; 392 + 120 = 512, the window never slides"),
    Scenario("1x400", 1, 400, 120, 7.0, "one series; the window slides for the last steps (full recomputes)"),
    Scenario("16x392", 16, 392, 120, 40.0, "16 series in one call; throughput cached vs uncached"),
    Scenario("16x400", 16, 400, 120, 8.0, "16 series in one call; the last steps slide"),
)
SCENARIO_BY_KEY = {s.key: s for s in SCENARIOS} | {str(i + 1): s for i, s in enumerate(SCENARIOS)}


# ---- workload -------------------------------------------------------------------------------------------


def build_engine(
    predictor_config: PredictorConfig = PREDICTOR,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    compile: bool = True,
) -> KronosEngine:
    """Random weights from SEED; as KronosEngine.load does, only the predictor takes a lower precision, one-row
    products take the path measured faster here, and the decode step is compiled and warmed up unless
    `compile=False`."""
    torch.manual_seed(SEED)
    tokenizer = KronosTokenizer(TOKENIZER).eval().to(device)
    predictor = KronosPredictor(predictor_config).eval().to(device, dtype)
    return KronosEngine(tokenizer, predictor, max_context=MAX_CONTEXT, compile=compile, one_row="fastest")


def load_candles() -> pd.DataFrame:
    return pd.read_csv(CANDLES_CSV, parse_dates=["timestamps"])


def series_inputs(
    candles: pd.DataFrame,
    count: int,
    lookback: int,
    pred_len: int,
    *,
    sample_count: int = 1,
    stride: int = SERIES_STRIDE,
) -> list[SeriesInput]:
    """`count` windows of real candles; the future timestamps are those of the rows that follow each window."""
    inputs = []
    for i in range(count):
        start = i * stride
        end = start + lookback
        if end + pred_len > len(candles):
            raise ValueError(f"series {i}: rows {start}..{end + pred_len} exceed the {len(candles)} candles")
        past = candles.iloc[start:end]
        inputs.append(
            SeriesInput(
                candles=past[["open", "high", "low", "close", "volume", "amount"]].reset_index(drop=True),
                timestamps=past["timestamps"],
                future_timestamps=candles["timestamps"].iloc[end : end + pred_len],
                temperature=1.0,
                top_k=1,  # greedy: cached and uncached runs must pick the same codes
                top_p=1.0,
                sample_count=sample_count,
                seed=i,
            )
        )
    return inputs


# ---- timing ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    seconds: float
    cpu_seconds: float  # user + system CPU time of this process during the run
    marks: list[float]  # seconds from the call to each progress callback (one per generated step)
    cpu_marks: list[float]  # this process's CPU seconds at the same callbacks
    forecasts: list
    threads: int

    @property
    def cpu_utilization(self) -> float:
        """CPU seconds per wall second: about `threads` when this process had the cores to itself."""
        return self.cpu_seconds / self.seconds

    @property
    def contended(self) -> bool:
        return self.cpu_utilization < CONTENDED_BELOW * self.threads

    def intervals(self, steps) -> list[float]:
        """Durations of the given steps (>= 1): the time between the callbacks before and after each."""
        return [self.marks[k] - self.marks[k - 1] for k in steps]

    def step_contended(self, k: int) -> bool:
        """Whether step k (>= 1) got less than CONTENDED_BELOW of its threads' CPU time."""
        wall = self.marks[k] - self.marks[k - 1]
        return self.cpu_marks[k] - self.cpu_marks[k - 1] < CONTENDED_BELOW * self.threads * wall

    def contended_step_fraction(self) -> float:
        steps = range(1, len(self.marks))
        return sum(self.step_contended(k) for k in steps) / max(1, len(steps))

    def quiet_estimate(self, segments: list[range], neighbours: int = 6) -> float:
        """The run's time with every contended step of the given segments replaced by the median of the nearest
        uncontended steps of the same segment (steps of one segment do the same work on similar windows).

        The first step (prefill), the result decoding and segments without an uncontended step stay as measured.
        An estimate of what the run would take alone on the machine, not a measurement.
        """
        seconds = self.seconds
        for segment in segments:
            quiet = [k for k in segment if not self.step_contended(k)]
            if not quiet:
                continue
            for k in segment:
                if self.step_contended(k):
                    nearest = sorted(quiet, key=lambda q, k=k: abs(q - k))[:neighbours]
                    seconds += statistics.median(self.intervals(nearest)) - self.intervals(range(k, k + 1))[0]
        return seconds

    def step_seconds(self) -> list[float]:
        """Every step's duration; the first one includes validation, tokenizer and prefill."""
        return [round(t, 6) for t in np.diff([0.0, *self.marks])]


def cpu_time() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed_forecast(engine: KronosEngine, inputs: list[SeriesInput], use_cache: bool) -> Run:
    marks: list[float] = []
    cpu_marks: list[float] = []

    def progress(done: int, total: int) -> None:
        marks.append(time.perf_counter())
        cpu_marks.append(cpu_time())

    cpu0, t0 = cpu_time(), time.perf_counter()
    forecasts = engine.forecast(inputs, use_cache=use_cache, progress=progress)
    seconds, cpu_seconds = time.perf_counter() - t0, cpu_time() - cpu0
    return Run(
        seconds,
        cpu_seconds,
        [m - t0 for m in marks],
        [c - cpu0 for c in cpu_marks],
        forecasts,
        torch.get_num_threads(),
    )


def timed_until_quiet(engine, inputs, use_cache: bool, wanted: int, attempts: int) -> tuple[list[Run], int]:
    """Up to `attempts` runs, stopping once `wanted` ran without contention; the runs to report, and all made.

    Reports the uncontended runs when there are `wanted` of them, else the `wanted` least contended runs.
    """
    runs: list[Run] = []
    while len(runs) < attempts and sum(not r.contended for r in runs) < wanted:
        runs.append(timed_forecast(engine, inputs, use_cache))
    quiet = [r for r in runs if not r.contended]
    chosen = quiet if len(quiet) >= wanted else sorted(runs, key=lambda r: -r.cpu_utilization)[:wanted]
    return chosen, len(runs)


def median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.seconds)[(len(runs) - 1) // 2]


def median(values) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


def codes_identical(cached: list, uncached: list, steps: int) -> bool:
    return all(
        np.array_equal(c.s1[:, :steps], u.s1[:, :steps]) and np.array_equal(c.s2[:, :steps], u.s2[:, :steps])
        for c, u in zip(cached, uncached, strict=True)
    )


def rates(seconds: float, series: int) -> dict:
    return {"seconds": seconds, "seconds_per_series": seconds / series, "series_per_second": series / seconds}


def run_scenario(engine, candles, sc: Scenario, repeats: int, quick: bool, uncached_retries: int) -> dict:
    inputs = series_inputs(candles, sc.series, sc.lookback, sc.pred_len)
    timed_forecast(engine, inputs, use_cache=True)  # warm-up: allocator, oneDNN kernels for these shapes
    # cached runs before and after the uncached one, so that a slow drift of the machine affects both sides
    before, made_before = timed_until_quiet(engine, inputs, True, repeats, 3 * repeats)

    uncached_steps = min(QUICK_UNCACHED_STEPS, sc.pred_len) if quick else sc.pred_len
    short = series_inputs(candles, sc.series, sc.lookback, uncached_steps)
    (run,), uncached_attempts = timed_until_quiet(engine, short, False, 1, 1 + uncached_retries)

    after, made_after = timed_until_quiet(engine, inputs, True, repeats, 3 * repeats)
    cached_runs = before + after
    best = median_run(cached_runs)

    # step k's interval (k >= 1) is one draw plus the decode or the recompute of the token it appended
    last_decode = sc.pred_len - 2 - sc.recompute_steps
    decode_steps = range(1, last_decode + 1)
    recompute_steps = range(last_decode + 1, sc.pred_len - 1)
    cached = {
        **rates(best.seconds, sc.series),
        "runs_seconds": [r.seconds for r in cached_runs],
        "runs_made": made_before + made_after,
        "cpu_utilization": best.cpu_utilization,
        "contended": best.contended,
        "contended_step_fraction": best.contended_step_fraction(),
        "first_step_seconds": best.marks[0],  # validation, tokenizer, prefill of every row, first draw
        "decode_step_seconds": median(best.intervals(decode_steps)),
        "decode_steps": len(decode_steps),
        "recompute_step_seconds": median(best.intervals(recompute_steps)),
        "recompute_steps": len(recompute_steps),
        "results_seconds": best.seconds - best.marks[-1],  # tokenizer decode of the windows, DataFrames
        "step_seconds": best.step_seconds(),
    }

    extrapolated = uncached_steps < sc.pred_len
    uncached_seconds = run.seconds * sc.pred_len / uncached_steps
    uncached = {
        **rates(uncached_seconds, sc.series),
        "measured_steps": uncached_steps,
        "measured_seconds": run.seconds,
        "extrapolated": extrapolated,
        "runs_made": uncached_attempts,
        "cpu_utilization": run.cpu_utilization,
        "contended": run.contended,
        "contended_step_fraction": run.contended_step_fraction(),
        "window_step_seconds": median(run.intervals(range(1, uncached_steps - 1))),  # a full-window forward
        "step_seconds": run.step_seconds(),
    }
    if extrapolated:
        uncached["extrapolation"] = (
            f"linear: measured {uncached_steps} of {sc.pred_len} steps, x {sc.pred_len / uncached_steps:g}; "
            "later steps have longer windows, so this underestimates the uncached time"
        )
    speedup = uncached_seconds / best.seconds
    # secondary, for a busy machine: contended steps replaced by nearby uncontended ones (see Run.quiet_estimate)
    cached_quiet = median(r.quiet_estimate([decode_steps, recompute_steps]) for r in cached_runs)
    uncached_quiet = run.quiet_estimate([range(1, uncached_steps - 1)]) * sc.pred_len / uncached_steps
    cached["quiet_estimate_seconds"] = cached_quiet
    uncached["quiet_estimate_seconds"] = uncached_quiet
    return {
        "key": sc.key,
        "description": sc.description,
        "series": sc.series,
        "lookback": sc.lookback,
        "pred_len": sc.pred_len,
        "cached": cached,
        "uncached": uncached,
        "speedup": speedup,
        "speedup_extrapolated": extrapolated,
        "speedup_contended": best.contended or run.contended,
        "speedup_quiet_estimate": uncached_quiet / cached_quiet,
        "pass_quiet_estimate": None if sc.target is None else uncached_quiet / cached_quiet >= sc.target,
        "target_speedup": sc.target,
        "pass": None if sc.target is None else speedup >= sc.target,
        "codes_identical": codes_identical(best.forecasts, run.forecasts, uncached_steps),
        "codes_compared_steps": uncached_steps,
    }


def time_call(repeats: int, fn, *args) -> dict:
    """Seconds of fn(*args) after one warm-up call: the median and the best of `repeats` calls."""
    fn(*args)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "best": min(times), "calls": repeats}


def default_sampling(rows: int) -> Sampling:
    """The reference's default request for `rows` rows: T 1, no top-k, top_p 0.9 (so the draw sorts)."""
    return Sampling(torch.ones(rows), torch.zeros(rows, dtype=torch.long), torch.full((rows,), 0.9), 0)


@torch.inference_mode()
def components(engine: KronosEngine, quick: bool) -> dict:
    """The predictor's building blocks alone: a full 512-candle window forward and one cached decode step (the
    draw included, top_p 0.9)."""
    predictor = engine.predictor
    generator = torch.Generator().manual_seed(SEED)
    out = {}
    for rows in (1, 16):
        caches = predictor.new_caches(rows, MAX_CONTEXT)
        index = torch.arange(rows)
        s1 = torch.randint(0, 2**PREDICTOR.s1_bits, (rows, MAX_CONTEXT), generator=generator)
        s2 = torch.randint(0, 2**PREDICTOR.s2_bits, (rows, MAX_CONTEXT), generator=generator)
        stamps = torch.zeros(rows, MAX_CONTEXT, 5, dtype=torch.long)
        repeats = (3 if quick else 7) if rows == 1 else (2 if quick else 5)
        out[f"prefill_512_b{rows}"] = time_call(repeats, prefill, predictor, caches, index, s1, s2, stamps)
        positions = torch.full((rows,), 450)  # attends to 451 cached slots
        h_last, uniforms = torch.randn(rows, predictor.config.d_model, generator=generator), torch.rand(rows, 2)
        args = (predictor, caches, h_last, positions, 451, uniforms, stamps[:, 0], positions, *default_sampling(rows))
        out[f"decode_step_b{rows}"] = time_call(50, engine.decode_step, *args)
    return out


# ---- memory ---------------------------------------------------------------------------------------------


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def vm_hwm_mib() -> float | None:
    """Peak RSS of this address space (reset by exec, unlike ru_maxrss), as a cross-check."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def rss_child(threads: int, geometry: str) -> None:
    """Run in a fresh interpreter: build the engine, one cached forecast of scenario 1x392, print peak RSS."""
    torch.set_num_threads(threads)
    after_imports = maxrss_mib()
    engine = build_engine(GEOMETRIES[geometry])
    after_build = maxrss_mib()
    sc = SCENARIO_BY_KEY["1x392"]
    engine.forecast(series_inputs(load_candles(), sc.series, sc.lookback, sc.pred_len), use_cache=True)
    print(
        json.dumps(
            {
                "after_imports_mib": after_imports,
                "after_engine_mib": after_build,
                "peak_mib": maxrss_mib(),
                "vm_hwm_mib": vm_hwm_mib(),
            }
        )
    )


# Linux keeps ru_maxrss across fork and exec: a child started from this (large) process would report at least
# this process's RSS. A small launcher forks a grandchild, which starts with a fresh count, and execs it.
_FRESH_LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_fresh(*args: str) -> str:
    """stdout of `python *args` run in a fresh process whose ru_maxrss owes nothing to this one."""
    done = subprocess.run(
        [sys.executable, "-c", _FRESH_LAUNCHER, *args], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return done.stdout.strip().splitlines()[-1]


def measure_memory(threads: int, geometry: str = "kronos-small") -> dict:
    torch_only = int(
        run_fresh("-c", "import resource, torch; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    )
    stages = json.loads(
        run_fresh("-m", "bench.engine_bench", "--rss-child", "--geometry", geometry, "--threads", str(threads))
    )
    return {
        "import_torch_only_mib": torch_only / 1024,
        "process_after_imports_mib": stages["after_imports_mib"],  # torch, pandas, numpy, the model package
        "process_after_engine_mib": stages["after_engine_mib"],
        "peak_rss_mib": stages["peak_mib"],
        "peak_vm_hwm_mib": stages["vm_hwm_mib"],
        "peak_rss_target_mib": RSS_TARGET_MIB,
        "pass": stages["peak_mib"] <= RSS_TARGET_MIB,
        "how": "ru_maxrss of a fresh process (forked from a small launcher): build the engine, one cached "
        "forecast of scenario 1x392",
    }


# ---- profile --------------------------------------------------------------------------------------------


# The same depth and op sequence as Kronos-small at d_model 16: what a step costs without the arithmetic, i.e. the
# Python, dispatcher and kernel-launch overhead of its calls (and the sort of the 1024 logits, which stays).
TINY_PREDICTOR = PredictorConfig(d_model=16, n_layers=8, n_heads=8, ff_dim=16, s1_bits=10, s2_bits=10, learn_te=True)
OP_GROUPS = {
    "matmul (linear layers)": ("aten::addmm", "aten::mm", "aten::bmm"),
    "attention (sdpa kernels)": ("aten::_scaled_dot_product",),
    "sort (sampling)": ("aten::sort",),
}


def _decoding(engine: KronosEngine, inputs: list[SeriesInput], steps: int):
    """An engine batch after its prefill and `steps` cached steps, and the last hidden states."""
    from model.engine import _Batch  # the engine's per-call state: decode steps can be timed without the prefill

    batch = _Batch(engine, [engine.prepare(s) for s in inputs])
    h_last = batch.prefill_first()
    for step in range(steps):
        h_last = batch.step(h_last, step, True)
    return batch, h_last


def _time_steps(batch, h_last, first: int, count: int):
    t0 = time.perf_counter()
    for step in range(first, first + count):
        h_last = batch.step(h_last, step, True)
    return (time.perf_counter() - t0) / count, h_last


@torch.inference_mode()
def profile_decode(engine: KronosEngine, candles: pd.DataFrame, rows: int, top: int = 12) -> dict:
    """Where one cached engine step (draw s1, s2 head, draw s2, decode_one_token: one compiled call) of `rows` rows
    spends its time.

    Steps 50..109 of a 392/120 forecast (windows of 442..501 tokens) under torch.profiler, per step; beside it
    the unprofiled step time and the same step with d_model 16 (the overhead floor), built the way `engine` was
    (compiled or eager): an eager floor under a compiled step would count the overhead compile removes.
    """
    from torch.profiler import ProfilerActivity, profile

    inputs = series_inputs(candles, rows, 392, 120)
    batch, h_last = _decoding(engine, inputs, 10)
    plain, h_last = _time_steps(batch, h_last, 10, 40)
    profiled = 60
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _, h_last = _time_steps(batch, h_last, 50, profiled)
    torch.manual_seed(SEED)
    compiled = engine.info.decode_path.startswith("compiled")
    tiny_predictor = KronosPredictor(TINY_PREDICTOR).eval()
    tiny = KronosEngine(engine.tokenizer, tiny_predictor, max_context=MAX_CONTEXT, compile=compiled)
    tiny_batch, tiny_h = _decoding(tiny, inputs, 10)
    floor, _ = _time_steps(tiny_batch, tiny_h, 10, 40)

    events = prof.key_averages()
    per_step = {e.key: (e.count / profiled, e.self_cpu_time_total / profiled / 1000) for e in events}  # calls, ms
    groups = {name: 0.0 for name in OP_GROUPS}
    groups["other aten ops"] = 0.0
    for key, (_, ms) in per_step.items():
        group = next((g for g, prefixes in OP_GROUPS.items() if key.startswith(prefixes)), "other aten ops")
        groups[group] += ms
    ranked = sorted(per_step.items(), key=lambda item: -item[1][1])[:top]
    return {
        "rows": rows,
        "step_ms": plain * 1000,
        "overhead_floor_ms": floor * 1000,
        "aten_calls_per_step": sum(calls for calls, _ in per_step.values()),
        "profiled_self_ms_per_step": groups,
        "top_ops": [{"op": key, "calls_per_step": calls, "self_ms_per_step": ms} for key, (calls, ms) in ranked],
        "note": "profiled self times include profiler overhead on every call; step_ms and overhead_floor_ms are "
        "unprofiled",
    }


# ---- report ---------------------------------------------------------------------------------------------

ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def machine(threads: int) -> dict:
    return {
        "hostname": platform.node(),
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        # set, these hold PyTorch's kernels and inductor's code, oneDNN and MKL to fewer instructions than the CPU has
        "instruction_set_limits": {name: os.environ[name] for name in ISA_LIMITS if name in os.environ},
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)),
        "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3,
        "torch": torch.__version__,
        "torch_threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "shared_machine_note": "shared machine: other jobs may run concurrently; compare ratios, not seconds",
    }


def fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def table(report: dict) -> str:
    lines = [
        f"{'scenario':<8} {'cached s':>9} {'s/series':>9} {'series/s':>9} | {'uncached s':>11} {'s/series':>9} "
        f"{'series/s':>9} | {'speedup':>8} {'target':>7}  result  codes  cpu util c/u  quiet est.",
    ]
    for r in report["scenarios"]:
        c, u, mark = r["cached"], r["uncached"], "*" if r["speedup_extrapolated"] else " "
        busy = "!" if r["speedup_contended"] else " "
        util = f"{c['cpu_utilization']:.2f}/{u['cpu_utilization']:.2f}{busy}"
        lines.append(
            f"{r['key']:<8} {c['seconds']:>9.3f} {c['seconds_per_series']:>9.3f} {c['series_per_second']:>9.2f} | "
            f"{u['seconds']:>10.2f}{mark} {u['seconds_per_series']:>9.3f} {u['series_per_second']:>9.3f} | "
            f"{r['speedup']:>7.1f}x{mark} {r['target_speedup']:>6.0f}x  {'PASS' if r['pass'] else 'FAIL':<6}  "
            f"{'same' if r['codes_identical'] else 'DIFFER':<6} {util:<13} {r['speedup_quiet_estimate']:>5.1f}x "
            f"{'PASS' if r['pass_quiet_estimate'] else 'FAIL'}"
        )
    if any(r["speedup_extrapolated"] for r in report["scenarios"]):
        lines.append(f"* extrapolated from {QUICK_UNCACHED_STEPS} measured uncached steps (--quick)")
    threads = report["machine"]["torch_threads"]
    lines.append(
        f"cpu util: CPU seconds per wall second of the reported cached/uncached run (about {threads} when alone); "
        f"! = below {CONTENDED_BELOW:g} x {threads}: another job held a core, the ratio is unreliable"
    )
    lines.append(
        "quiet est.: an estimate, not a measurement: the same runs with each contended step replaced by the median "
        "of the nearest uncontended steps doing the same work"
    )
    lines.append("")
    lines.append(f"{'scenario':<8} {'first step':>10} {'decode step':>12} {'recompute step':>15} {'uncached step':>14}")
    for r in report["scenarios"]:
        c, u = r["cached"], r["uncached"]
        lines.append(
            f"{r['key']:<8} {fmt(c['first_step_seconds']):>10} {fmt(c['decode_step_seconds'], '.4f'):>12} "
            f"{fmt(c['recompute_step_seconds']):>15} {fmt(u['window_step_seconds']):>14}"
        )
    lines.append("(seconds, medians over the steps of one run; a step includes drawing both codes)")
    comp = report.get("components")
    if comp:
        lines.append("")
        lines.append("components (best / median of n calls):")
        for name, t in comp.items():
            lines.append(f"  {name:<22} {t['best'] * 1000:>8.1f} ms / {t['median'] * 1000:>8.1f} ms  (n={t['calls']})")
    mem = report.get("memory")
    if mem:
        lines.append(
            f"memory: peak RSS {mem['peak_rss_mib']:.0f} MiB (target <= {mem['peak_rss_target_mib']} MiB: "
            f"{'PASS' if mem['pass'] else 'FAIL'}); import torch alone {mem['import_torch_only_mib']:.0f} MiB; "
            f"after engine build {mem['process_after_engine_mib']:.0f} MiB"
        )
    for prof in report.get("profiles", []):
        lines.append("")
        lines.append(
            f"profile, one cached step of {prof['rows']} row(s): {prof['step_ms']:.2f} ms; the same step at d_model 16 "
            f"(overhead floor) {prof['overhead_floor_ms']:.2f} ms; {prof['aten_calls_per_step']:.0f} aten calls"
        )
        lines.append(
            "  profiled self time per step: "
            + ", ".join(f"{name} {ms:.2f} ms" for name, ms in prof["profiled_self_ms_per_step"].items())
        )
        for op in prof["top_ops"]:
            lines.append(f"  {op['op']:<50} {op['calls_per_step']:>6.1f} calls  {op['self_ms_per_step']:>7.3f} ms")
    m = report["machine"]
    lines.append("")
    lines.append(
        f"{m['cpu_model']} ({m['cpu_capability']}), {m['cores']} cores, torch {m['torch']} with {m['torch_threads']} "
        f"threads; load average {report['load_average_start']} -> {report['load_average_end']}; "
        f"{report['wall_seconds']:.0f} s total"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"uncached runs: {QUICK_UNCACHED_STEPS} steps, extrapolated"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"JSON report (default {DEFAULT_OUT.relative_to(ROOT)})"
    )
    parser.add_argument(
        "--scenarios",
        nargs="+",
        default=[s.key for s in SCENARIOS],
        choices=sorted(SCENARIO_BY_KEY),
        metavar="KEY",
        help=f"any of {', '.join(s.key for s in SCENARIOS)} (or 1..{len(SCENARIOS)}); default all",
    )
    parser.add_argument(
        "--repeats", type=int, help="cached runs before and again after the uncached run (median); default 2, quick 1"
    )
    parser.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads; default cores"
    )
    parser.add_argument(
        "--uncached-retries", type=int, default=1, help="rerun an uncached run this often while contended (default 1)"
    )
    parser.add_argument("--profile", action="store_true", help="also torch.profiler the decode steps (batch 1 and 16)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocess")
    parser.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--geometry", choices=sorted(GEOMETRIES), default="kronos-small", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child:
        rss_child(args.threads, args.geometry)
        return 0

    torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 2)
    start = time.perf_counter()
    report = {
        "benchmark": "kronos engine, cached vs uncached (use_cache=False) generation",
        "mode": "quick" if args.quick else "full",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.engine_bench", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(args.threads),
        "code": code_version(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "workload": {
            "predictor": {**PREDICTOR.__dict__, "geometry": "Kronos-small", "weights": f"random, torch seed {SEED}"},
            "tokenizer": {**TOKENIZER.__dict__, "geometry": "Kronos-Tokenizer-base"},
            "max_context": MAX_CONTEXT,
            "dtype": "float32",
            "decoding": "greedy: top_k=1, top_p=1, temperature 1, sample_count 1",
            "data": f"{CANDLES_CSV.relative_to(ROOT)}; series i starts at row {SERIES_STRIDE}*i; future timestamps "
            "are the next rows' timestamps",
            "cached_runs": f"{repeats} before and {repeats} after the uncached run (uncontended ones, up to 3x "
            "as many tries each side); the run of median time is reported",
            "speedup": "uncached seconds / cached seconds of the same call (equal to the throughput ratio)",
        },
    }
    engine = build_engine()
    candles = load_candles()
    scenarios = list(dict.fromkeys(SCENARIO_BY_KEY[k] for k in args.scenarios))
    report["scenarios"] = []
    for sc in scenarios:
        print(f"[{time.perf_counter() - start:6.0f} s] scenario {sc.key}: {sc.description}", flush=True)
        report["scenarios"].append(run_scenario(engine, candles, sc, repeats, args.quick, args.uncached_retries))
    print(f"[{time.perf_counter() - start:6.0f} s] components", flush=True)
    report["components"] = components(engine, args.quick)
    if args.profile:
        print(f"[{time.perf_counter() - start:6.0f} s] profile", flush=True)
        report["profiles"] = [profile_decode(engine, candles, rows) for rows in (1, 16)]
    if not args.no_memory:
        print(f"[{time.perf_counter() - start:6.0f} s] memory (fresh subprocess)", flush=True)
        report["memory"] = measure_memory(args.threads)
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_seconds"] = time.perf_counter() - start
    report["targets"] = {
        **{
            f"speedup_{r['key']}": {
                "target": r["target_speedup"],
                "value": r["speedup"],
                "pass": r["pass"],
                "extrapolated": r["speedup_extrapolated"],
            }
            for r in report["scenarios"]
        },
        **(
            {
                "peak_rss_mib": {
                    "target": RSS_TARGET_MIB,
                    "value": report["memory"]["peak_rss_mib"],
                    "pass": report["memory"]["pass"],
                }
            }
            if "memory" in report
            else {}
        ),
    }
    report["all_codes_identical"] = all(r["codes_identical"] for r in report["scenarios"])

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(table(report))
    print(f"\nwrote {args.out}")
    if not report["all_codes_identical"]:
        print("ERROR: cached and uncached runs generated different codes", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
