"""The engine against the reference Kronos code and against this machine's floor, in one run (issue #18).

    python -m bench.compare [--reference-python PATH] [--repeats 2] [--batch 16] [--reference-batch 4]

Workload: Kronos-small geometry with random weights from seed 0 (bench/engine_bench.py), written to a temporary
checkpoint that the reference loads as well; real 5-minute candles; the reference's default request (T 1, top_k 0,
top_p 0.9, one sample). The project runs in this process with the engine as the worker builds it (decode step
compiled and warmed up at construction); the reference (PyPI kronos-model-arch, see bench/reference.py) runs in
its own process and virtual environment. Both are warmed up, and the runs are interleaved: each reference run is
followed by PROJECT_RUNS project runs of the same workload, so that a change in the machine's load hits both sides.
Ratios are of medians (and of bests) of the same run. The batch row compares per-series throughput: the project's
call of --batch series against the reference's `predict_batch` of --reference-batch series.

Also measured in the same process:
- the batch-1 decode step as the engine runs it (the draw of s1 and s2 and `decode_one_token`, one compiled call)
  against the matrix-vector floor: the same weights, unfused, one torch matrix-vector product each (the 8 x 7 of
  the transformer, the input fusion, the s1 and s2 heads, the s2 head's query, key and value projections: all that
  one step multiplies), timed back to back, in turn with the step call by call;
- the opt-in precisions (bfloat16, int8) against float32: speed on the default request, and drift on greedy
  forecasts of DRIFT_SERIES real series (agreement of the codes per step, mean absolute % difference of close);
- the first forecast after the engine is built (graphs compiled during it: must be 0) and peak RSS in a fresh process.
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from bench import engine_bench, reference
from bench.engine_bench import MAX_CONTEXT, ROOT, load_candles, series_inputs, timed_forecast
from model import KronosEngine
from model.kronos import KronosPredictor
from model.loading import lower_precision

DEFAULT_OUT = ROOT / "bench" / "results" / "compare_cpu.json"
DEFAULT_REQUEST = {"temperature": 1.0, "top_k": 0, "top_p": 0.9, "sample_count": 1}
PROJECT_RUNS = 3  # project runs after each reference run
DRIFT_SERIES = 8
WORKLOADS = ["1x392", "1x400", "batch"]
TARGETS = {"1x392": 20.0, "1x400": 10.0, "batch": 60.0, "decode_over_floor": 1.3, "peak_rss_mib": 1024}


@dataclasses.dataclass(frozen=True)
class Workload:
    key: str
    series: int
    reference_series: int
    lookback: int
    pred_len: int
    target: float


def requests(candles, series: int, lookback: int, pred_len: int, **sampling) -> list:
    """The bench's real-candle series (series i starts at row 120 i) with the given sampling, seeds 0.."""
    inputs = series_inputs(candles, series, lookback, pred_len)
    return [dataclasses.replace(s, **{**DEFAULT_REQUEST, **sampling}) for s in inputs]


def starts(series: int) -> list[int]:
    return [i * engine_bench.SERIES_STRIDE for i in range(series)]


def summary(values: list[float]) -> dict:
    return {"best": min(values), "median": statistics.median(values), "runs": values}


def compare_workload(engine, ref, candles, w: Workload, repeats: int, say) -> dict:
    """Reference runs, each followed by PROJECT_RUNS project runs; seconds per series of each side."""
    inputs = requests(candles, w.series, w.lookback, w.pred_len)
    timed_forecast(engine, inputs, True)  # warm-up: allocator, kernels for these shapes
    project, utilization, ref_runs = [], [], []
    for round_ in range(repeats):
        if ref is not None:
            answer = ref.run(starts(w.reference_series), w.lookback, w.pred_len, reference_sampling(), seed=round_)
            ref_runs.append(answer)
            say(f"  {w.key}: reference {answer['seconds']:.2f} s for {w.reference_series} series")
        for _ in range(PROJECT_RUNS):
            run = timed_forecast(engine, inputs, True)
            project.append(run.seconds / w.series)
            utilization.append(run.cpu_utilization)
        say(f"  {w.key}: project median {statistics.median(project) * w.series:.3f} s for {w.series} series")
    out = {
        "key": w.key,
        "series": w.series,
        "lookback": w.lookback,
        "pred_len": w.pred_len,
        "project_seconds_per_series": summary(project),
        "project_cpu_utilization": summary(utilization),
        "target": w.target,
    }
    if ref_runs:
        per_series = [r["seconds"] / w.reference_series for r in ref_runs]
        out["reference_series"] = w.reference_series
        out["reference_seconds_per_series"] = summary(per_series)
        out["reference_cpu_utilization"] = summary([r["cpu_seconds"] / r["seconds"] for r in ref_runs])
        out["speedup_median"] = statistics.median(per_series) / statistics.median(project)
        out["speedup_best"] = min(per_series) / min(project)
        out["pass"] = out["speedup_median"] >= w.target
    return out


def reference_sampling() -> dict:
    return {"T": DEFAULT_REQUEST["temperature"], **{k: DEFAULT_REQUEST[k] for k in ("top_k", "top_p", "sample_count")}}


def same_function(engine, ref, candles) -> dict:
    """Greedy 1x392/P8 on both sides: the reference loaded the same weights and computes the same forecast."""
    pred_len = 8
    ours = engine.forecast(requests(candles, 1, 392, pred_len, top_k=1, top_p=1.0))[0].mean["close"].to_numpy()
    theirs = np.array(ref.run([0], 392, pred_len, {"T": 1.0, "top_k": 1, "top_p": 1.0, "sample_count": 1})["close"][0])
    return {
        "request": "greedy (top_k 1), 1 series, lookback 392, 8 steps",
        "max_relative_difference_of_close": float(np.max(np.abs(ours - theirs) / np.abs(theirs))),
        "allclose_rtol_1e-5": bool(np.allclose(ours, theirs, rtol=1e-5, atol=1e-5)),
    }


# ---- decode step against the matrix-vector floor ---------------------------------------------------------


def decode_weights(predictor) -> list[torch.Tensor]:
    """Every weight matrix one decode step multiplies (the draw's heads included), unfused and contiguous, as
    separate tensors."""
    d = predictor.config.d_model
    weights = [
        predictor.head.proj_s1.weight,
        predictor.dep_layer.cross_attn.q_proj.weight,
        predictor.head.proj_s2.weight,
        predictor.embedding.fusion_proj.weight,
    ]
    for block in predictor.transformer:
        ff = block.ffn.w2.in_features
        weights += [*block.self_attn.qkv.weight.split(d), block.self_attn.out_proj.weight]
        weights += [*block.ffn.w13.weight.split(ff), block.ffn.w2.weight]
    weights += [*predictor.dep_layer.cross_attn.kv.weight.split(d)]
    return [w.detach().clone().contiguous() for w in weights]


def timed_call(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


@torch.inference_mode()
def decode_against_floor(engine: KronosEngine, calls: int = 150) -> dict:
    """Batch-1 decode step, draw included (451 cached slots of 512), and the floors, call by call in turn;
    milliseconds.

    The floor is each matrix-vector product through torch's own `F.linear`; the oneDNN floor is the same products
    through oneDNN on packed weights, the path the engine's linears take on CPU (model.kronos.OneDNNLinear).
    The ratio is the median of the ratios of neighbouring calls: a burst of load on the shared machine slows both.
    """
    predictor = engine.predictor
    weights = decode_weights(predictor)
    vectors = [torch.randn(1, w.shape[1]) for w in weights]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]

    def floor():
        for w, x in zip(weights, vectors, strict=True):
            F.linear(x, w)

    def onednn_floor():
        for w, x in zip(packed, vectors, strict=True):
            torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")

    caches = predictor.new_caches(1, MAX_CONTEXT)
    h_last, stamp = torch.randn(1, predictor.config.d_model), torch.zeros(1, 5, dtype=torch.long)
    window_lengths, positions = torch.tensor([450]), torch.tensor([450])
    sampling = engine_bench.default_sampling(1)
    uniforms = torch.rand(1, 2, generator=torch.Generator().manual_seed(0))

    def step():
        engine.decode_step(predictor, caches, h_last, window_lengths, 451, uniforms, stamp, positions, *sampling)

    functions = {"floor": floor, "onednn_floor": onednn_floor, "decode_step": step}
    timings = {name: [] for name in functions}
    for fn in functions.values():
        fn()
    for _ in range(calls):
        for name, fn in functions.items():
            timings[name].append(timed_call(fn))
    ms = {name: {"best": min(t) * 1000, "median": statistics.median(t) * 1000} for name, t in timings.items()}
    ratios = [d / f for d, f in zip(timings["decode_step"], timings["floor"], strict=True)]
    onednn_ratios = [d / f for d, f in zip(timings["decode_step"], timings["onednn_floor"], strict=True)]
    megabytes = sum(w.numel() * w.element_size() for w in weights) / 1e6
    return {
        "matrix_vector_products": len(weights),
        "weight_megabytes": megabytes,
        "calls": calls,
        "floor_ms": ms["floor"],
        "floor_gb_per_s_best": megabytes / ms["floor"]["best"],
        "onednn_floor_ms": ms["onednn_floor"],
        "decode_step_ms": ms["decode_step"],
        "decode_path": engine.info.decode_path,
        "ratio_best": ms["decode_step"]["best"] / ms["floor"]["best"],
        "ratio_median": statistics.median(ratios),
        "ratio_to_onednn_floor_median": statistics.median(onednn_ratios),
        "target": TARGETS["decode_over_floor"],
        "pass": statistics.median(ratios) <= TARGETS["decode_over_floor"],
    }


# ---- opt-in lower precision ------------------------------------------------------------------------------


def precision_engine(engine: KronosEngine, precision: str) -> KronosEngine:
    """The same weights as `engine`'s, loaded as from a checkpoint, in `precision`."""
    predictor = KronosPredictor(engine.predictor.config).eval().requires_grad_(False)
    predictor.load_state_dict(engine.predictor.state_dict())
    return KronosEngine(
        engine.tokenizer,
        lower_precision(predictor, precision),
        max_context=MAX_CONTEXT,
        compile=True,
        one_row="fastest",
    )


def drift(exact: list, other: list) -> dict:
    """Greedy codes and forecasts of a lower precision against float32, series by series."""
    agree = np.stack([(a.s1 == b.s1) & (a.s2 == b.s2) for a, b in zip(exact, other, strict=True)])[:, 0]  # [S, P]
    first_divergence = [int(np.argmin(row)) if not row.all() else None for row in agree]
    close = [(a.mean["close"].to_numpy(), b.mean["close"].to_numpy()) for a, b in zip(exact, other, strict=True)]
    mape = np.mean([np.mean(np.abs(b - a) / np.abs(a)) for a, b in close]) * 100
    return {
        "series": len(exact),
        "code_agreement_per_step": agree.mean(axis=0).round(4).tolist(),
        "code_agreement_mean": float(agree.mean()),
        "first_divergent_step": first_divergence,
        "close_mape_percent": float(mape),
    }


def precisions(engine, candles, repeats: int, say) -> dict:
    """Speed (default request, 1x392/P120, interleaved with float32) and greedy drift of each opt-in precision."""
    engines = {"float32": engine}
    for precision in ("bfloat16", "int8"):
        started = time.perf_counter()
        engines[precision] = precision_engine(engine, precision)
        say(f"  {precision}: built in {time.perf_counter() - started:.1f} s, {engines[precision].info.decode_path}")
    inputs = requests(candles, 1, 392, 120)
    seconds = {name: [] for name in engines}
    for e in engines.values():
        timed_forecast(e, inputs, True)  # warm-up
    for _ in range(repeats * PROJECT_RUNS):
        for name, e in engines.items():
            seconds[name].append(timed_forecast(e, inputs, True).seconds)
    greedy = requests(candles, DRIFT_SERIES, 392, 120, top_k=1, top_p=1.0)
    exact = engine.forecast(greedy)
    out = {}
    for name, e in engines.items():
        out[name] = {
            "decode_path": e.info.decode_path,
            "seconds_1x392": summary(seconds[name]),
            "speedup_over_float32_median": statistics.median(seconds["float32"]) / statistics.median(seconds[name]),
        }
        if name != "float32":
            out[name]["drift"] = drift(exact, e.forecast(greedy))
        say(f"  {name}: 1x392 median {statistics.median(seconds[name]):.3f} s")
    return out


# ---- first job, memory -----------------------------------------------------------------------------------


def first_forecast(candles, threads: int) -> dict:
    """Build the engine as the worker does (compile and warm-up included), then its first and later forecasts."""
    started = time.perf_counter()
    engine = engine_bench.build_engine(compile=True)
    build = time.perf_counter() - started
    inputs = requests(candles, 1, 392, 120)
    graphs = counters["stats"]["unique_graphs"]
    first = timed_forecast(engine, inputs, True).seconds
    compiled_during_first = counters["stats"]["unique_graphs"] - graphs
    later = [timed_forecast(engine, inputs, True).seconds for _ in range(3)]
    return {
        "engine_build_seconds": build,
        "decode_path": engine.info.decode_path,
        "first_forecast_seconds": first,
        "later_forecast_seconds_median": statistics.median(later),
        "graphs_compiled_during_first_forecast": compiled_during_first,
    }, engine


# ---- report ----------------------------------------------------------------------------------------------


def table(report: dict) -> str:
    lines = [
        "| workload | reference s/series | project s/series | speedup (median / best) | target |",
        "|---|---|---|---|---|",
    ]
    for w in report["workloads"]:
        p = w["project_seconds_per_series"]
        if "reference_seconds_per_series" in w:
            r = w["reference_seconds_per_series"]
            ref_cell = f"{r['median']:.2f} (best {r['best']:.2f}; {w['reference_series']} series per call)"
            ratio = f"**{w['speedup_median']:.1f}x** / {w['speedup_best']:.1f}x"
            verdict = f">= {w['target']:g}x: {'PASS' if w['pass'] else 'FAIL'}"
        else:
            ref_cell, ratio, verdict = "(no reference)", "-", f">= {w['target']:g}x"
        name = f"{w['series']}x{w['lookback']}/P{w['pred_len']}"
        lines.append(f"| {name} | {ref_cell} | {p['median']:.3f} (best {p['best']:.3f}) | {ratio} | {verdict} |")
    d = report["decode_floor"]
    lines += [
        "",
        f"batch-1 decode step, draw included ({d['decode_path']}): {d['decode_step_ms']['median']:.2f} ms median "
        f"({d['decode_step_ms']['best']:.2f} best); floor of its {d['matrix_vector_products']} matrix-vector "
        f"products ({d['weight_megabytes']:.0f} MB): {d['floor_ms']['median']:.2f} ms median "
        f"({d['floor_ms']['best']:.2f} best, {d['floor_gb_per_s_best']:.1f} GB/s); ratio (median of call-by-call "
        f"ratios) **{d['ratio_median']:.2f}x**, of bests {d['ratio_best']:.2f}x (target <= {d['target']}x: "
        f"{'PASS' if d['pass'] else 'FAIL'}); the same products through oneDNN on packed weights: "
        f"{d['onednn_floor_ms']['median']:.2f} ms median ({d['onednn_floor_ms']['best']:.2f} best), decode step "
        f"{d['ratio_to_onednn_floor_median']:.2f}x that (median of call-by-call ratios)",
    ]
    if "same_function" in report:
        s = report["same_function"]
        lines.append(
            f"same weights, same function: {s['request']}: max relative difference of close "
            f"{s['max_relative_difference_of_close']:.1e} (allclose rtol 1e-5: {s['allclose_rtol_1e-5']})"
        )
    lines += ["", "| precision | decode path | 1x392/P120 s (median) | vs float32 | code agreement | close MAPE |"]
    lines.append("|---|---|---|---|---|---|")
    for name, p in report["precisions"].items():
        drift_ = p.get("drift")
        agreement = f"{drift_['code_agreement_mean']:.1%}" if drift_ else "(exact)"
        mape = f"{drift_['close_mape_percent']:.3f} %" if drift_ else "0"
        lines.append(
            f"| {name} | {p['decode_path']} | {p['seconds_1x392']['median']:.3f} | "
            f"{p['speedup_over_float32_median']:.2f}x | {agreement} | {mape} |"
        )
    f = report["first_forecast"]
    lines += [
        "",
        f"engine build incl. compile and warm-up {f['engine_build_seconds']:.1f} s; first forecast "
        f"{f['first_forecast_seconds']:.3f} s, later ones {f['later_forecast_seconds_median']:.3f} s; graphs compiled "
        f"during the first forecast: {f['graphs_compiled_during_first_forecast']}",
    ]
    if "memory" in report:
        m = report["memory"]
        lines.append(
            f"peak RSS (fresh process, compiled engine, one 1x392 forecast): {m['peak_rss_mib']:.0f} MiB "
            f"(target <= {m['peak_rss_target_mib']} MiB: {'PASS' if m['pass'] else 'FAIL'})"
        )
    lines.append(f"reference: {report['reference']}")
    return "\n".join(lines)


def run(args, say) -> dict:
    threads = torch.get_num_threads()
    candles = load_candles()
    report = {
        "benchmark": "engine against the reference Kronos code and the matrix-vector floor",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": engine_bench.machine(threads),
        "code": engine_bench.code_version(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "request": DEFAULT_REQUEST,
    }
    say("engine build (compile + warm-up) and first forecast")
    report["first_forecast"], engine = first_forecast(candles, threads)
    python, how = reference.locate(args.reference_python)
    report["reference"] = how
    say(f"reference: {how}")
    ref = reference.ReferenceProcess(python, engine, threads) if python else None
    try:
        if ref is not None:
            ref.run([0], 392, 2, reference_sampling())  # warm-up
            report["same_function"] = same_function(engine, ref, candles)
        workloads = [
            Workload("1x392", 1, 1, 392, 120, TARGETS["1x392"]),
            Workload("1x400", 1, 1, 400, 120, TARGETS["1x400"]),
            Workload("batch", args.batch, args.reference_batch, 392, 120, TARGETS["batch"]),
        ]
        report["workloads"] = []
        for w in (w for w in workloads if w.key in args.workloads):
            say(f"workload {w.key}")
            report["workloads"].append(compare_workload(engine, ref, candles, w, args.repeats, say))
    finally:
        if ref is not None:
            ref.close()
    say("decode step against the matrix-vector floor")
    report["decode_floor"] = decode_against_floor(engine)
    say("opt-in precisions")
    report["precisions"] = precisions(engine, candles, args.repeats, say)
    if not args.no_memory:
        say("memory (fresh process)")
        report["memory"] = engine_bench.measure_memory(threads)
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    return report


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference-python", help=f"the reference's Python (else ${reference.ENV_VARIABLE})")
    parser.add_argument("--repeats", type=int, default=2, help="reference runs per workload (default 2)")
    parser.add_argument("--batch", type=int, default=16, help="series in the project's batch call (default 16)")
    parser.add_argument("--reference-batch", type=int, default=4, help="series in the reference's (default 4)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    parser.add_argument(
        "--workloads", nargs="+", choices=WORKLOADS, default=WORKLOADS, help="which of them (default all)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocess")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON report")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def say(line: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {line}", flush=True)

    report = run(args, say)
    report["command"] = " ".join(["python -m bench.compare", *(sys.argv[1:] if argv is None else argv)])
    report["wall_seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
