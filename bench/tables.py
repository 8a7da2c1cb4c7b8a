"""Markdown tables of the suite's JSON results, as docs/BENCHMARKS.md shows them.

python -m bench.tables [bench/results/engine_sweep_cpu.json] [bench/results/e2e_cpu.json]
"""

import json
import sys
from pathlib import Path

from bench.e2e import STAGES
from bench.engine_bench import QUICK_UNCACHED_STEPS


def _row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _busy(contended: bool) -> str:
    return " !" if contended else ""


def engine_tables(report: dict) -> list[str]:
    lines = [
        "Cached engine against the uncached reference (`use_cache=False`), same call, same process; uncached "
        f"seconds extrapolated linearly from {QUICK_UNCACHED_STEPS} measured steps (an underestimate); "
        "! = a side was contended.",
        "",
        _row(
            "geometry", "scenario", "cached s", "series/s", "uncached s*", "speedup", "target", "codes", "cpu util c/u"
        ),
        _row(*["---"] * 9),
    ]
    for geometry, result in report["geometries"].items():
        for c in result["comparisons"]:
            target = "–" if c["target_speedup"] is None else f"≥ {c['target_speedup']:g}x"
            lines.append(
                _row(
                    geometry,
                    c["key"],
                    f"{c['cached']['seconds']:.3f}",
                    f"{c['cached']['series_per_second']:.2f}",
                    f"{c['uncached']['seconds']:.2f}",
                    f"**{c['speedup']:.1f}x**{_busy(c['speedup_contended'])}",
                    target,
                    "same" if c["codes_identical"] else "DIFFER",
                    f"{c['cached']['cpu_utilization']:.2f}/{c['uncached']['cpu_utilization']:.2f}",
                )
            )
    lines += [
        "",
        "Sweep (KV-cached, greedy; seconds of one call; ! = contended run):",
        "",
        _row("geometry", "axis", "series", "paths", "lookback", "pred_len", "s/call", "s/series", "series/s", "slides"),
        _row(*["---"] * 10),
    ]
    for geometry, result in report["geometries"].items():
        for axis, points in result["axes"].items():
            for p in points:
                lines.append(
                    _row(
                        geometry,
                        axis,
                        p["batch"],
                        p["sample_count"],
                        p["lookback"],
                        p["pred_len"],
                        f"{p['seconds']:.3f}{_busy(p['contended'])}",
                        f"{p['seconds_per_series']:.3f}",
                        f"{p['series_per_second']:.2f}",
                        "yes" if p["window_slides"] else "",
                    )
                )
    memory = [(g, r["memory"]) for g, r in report["geometries"].items() if r.get("memory")]
    if memory:
        lines += [
            "",
            _row("geometry", "params (M)", "peak RSS MiB (build + one 1x392 forecast)"),
            _row("---", "---", "---"),
        ]
        for geometry, m in memory:
            params = report["geometries"][geometry]["parameters_millions"]
            lines.append(_row(geometry, f"{params:.1f}", f"{m['peak_rss_mib']:.0f}"))
    return lines


def e2e_tables(report: dict) -> list[str]:
    lines = [
        "Queue overhead, one worker, KRONOS_MAX_BATCH_SIZE=1, one job at a time (medians; overhead = e2e - direct "
        "engine on the same job):",
        "",
        _row(
            "job",
            "quiet pairs",
            "direct engine s",
            "e2e s",
            "overhead ms",
            "% of inference",
            "latency - worker inference ms",
            "%",
        ),
        _row(*["---"] * 8),
    ]
    for label, j in report["queue_overhead"]["jobs"].items():
        lines.append(
            _row(
                f"{label}: lookback {j['lookback']}, {j['pred_len']} steps",
                f"{j['quiet_pairs']}/{j['jobs']}",
                f"{j['direct_engine_seconds']['p50']:.3f}",
                f"{j['queue_latency_seconds']['p50']:.3f}",
                f"{j['overhead_seconds']['p50'] * 1000:.0f}",
                f"**{j['overhead_percent_of_inference']:.1f} %**",
                f"{j['outside_inference_seconds']['p50'] * 1000:.0f}",
                f"{j['outside_inference_percent']:.1f} %",
            )
        )
    lines += [
        "",
        "Mean split of a batch-size-1 job (ms):",
        "",
        _row("job", *STAGES),
        _row(*["---"] * (1 + len(STAGES))),
    ]
    for label, j in report["queue_overhead"]["jobs"].items():
        lines.append(_row(label, *(f"{j['stages_mean'][s] * 1000:.1f}" for s in STAGES)))
    loaded, served = (report["queue_overhead"]["worker_memory"][k] for k in ("after_load", "after_serving"))
    lines += [
        "",
        f"Worker RSS (Kronos-small loaded): **{loaded['rss_mib']:.0f} MiB** after loading, "
        f"**{served['rss_mib']:.0f} MiB** after serving (peak {served['peak_rss_mib']:.0f} MiB).",
        "",
        "Load (Poisson arrivals; fractions of the 1-worker saturation throughput; ! = other jobs used > 0.25 core):",
        "",
        _row(
            "workers",
            "offered jobs/s",
            "jobs",
            "achieved jobs/s",
            "p50 s",
            "p95 s",
            "p99 s",
            "mean batch",
            *(f"{s} ms" for s in STAGES),
        ),
        _row(*["---"] * (8 + len(STAGES))),
    ]
    for config in report["load"]:
        runs = [("saturation (burst)", config["saturation"])]
        runs += [(f"{r['offered_jobs_per_second']:.2f} ({r['fraction_of_capacity']:.0%})", r) for r in config["runs"]]
        for offered, r in runs:
            lat = r["latency"]
            lines.append(
                _row(
                    config["workers"],
                    offered,
                    r["jobs"],
                    f"{r['jobs_per_second']:.2f}{_busy(r['cpu']['contended'])}",
                    f"{lat['p50']:.2f}",
                    f"{lat['p95']:.2f}",
                    f"{lat['p99']:.2f}",
                    f"{r['batch_size_mean']:.1f}",
                    *(f"{r['stages_mean'][s] * 1000:.0f}" for s in STAGES),
                )
            )
    return lines


def markdown(engine: dict | None, e2e: dict | None) -> str:
    return "\n".join([*(engine_tables(engine) if engine else []), "", *(e2e_tables(e2e) if e2e else [])])


def main(argv: list[str]) -> int:
    reports = {"engine": None, "e2e": None}
    for path in argv or ["bench/results/engine_sweep_cpu.json", "bench/results/e2e_cpu.json"]:
        report = json.loads(Path(path).read_text())
        reports["e2e" if "queue_overhead" in report else "engine"] = report
    print(markdown(reports["engine"], reports["e2e"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
