"""Plots of the suite's JSON results (bench/__main__.py draws them after each run)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from bench.e2e import STAGES

GEOMETRY_STYLE = {"kronos-small": "tab:blue", "kronos-base": "tab:orange"}


def draw_all(engine: dict | None, e2e: dict | None, directory: Path, tag: str) -> list[Path]:
    drawn = []
    if engine:
        drawn.append(scaling(engine, directory / f"bench-engine-scaling-{tag}.png"))
        drawn.append(speedups(engine, directory / f"bench-engine-speedup-{tag}.png"))
    if e2e:
        drawn.append(end_to_end(e2e, directory / f"bench-e2e-{tag}.png"))
    return drawn


def _title(report: dict) -> str:
    machine = report["machine"]
    device = report["gpu"].get("name") or f"{machine['cpu_model']}, {machine['torch_threads']} threads"
    return f"{report['device']} {report['dtype']} · {device} · {report['date'][:10]} · {report['mode']}"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scaling(report: dict, path: Path) -> Path:
    """Cost against each swept factor, one line per geometry."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [
        ("lookback", "lookback (candles)", "seconds per call", "seconds"),
        ("pred_len", "pred_len (steps)", "seconds per call", "seconds"),
        ("batch", "batch size (series per call)", "series per second", "series_per_second"),
    ]
    max_context = report["plan"]["max_context"]
    for ax, (axis, xlabel, ylabel, field) in zip(axes.flat, panels, strict=False):
        for geometry, result in report["geometries"].items():
            points = result["axes"][axis]
            ax.plot(
                [p[axis] for p in points],
                [p[field] for p in points],
                "o-",
                label=geometry,
                color=GEOMETRY_STYLE.get(geometry),
            )
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    base = report["plan"]["base_point"]
    axes[0, 0].axvline(max_context - base["pred_len"] + 1, color="grey", ls=":", label="window starts to slide")
    axes[0, 0].legend()
    axes[1, 0].set_xscale("log", base=2)
    axes[1, 0].set_yscale("log")
    ax = axes[1, 1]
    for geometry, result in report["geometries"].items():
        color = GEOMETRY_STYLE.get(geometry)
        for points, style, paths in ((result["axes"]["batch"], "o-", 1), (result["axes"]["sample_count"], "s--", None)):
            paths = paths or (points[0]["sample_count"] if points else 1)
            ax.plot(
                [p["batch"] for p in points],
                [p["seconds_per_series"] for p in points],
                style,
                color=color,
                label=f"{geometry}, {paths} path(s)",
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (series per call)")
    ax.set_ylabel("seconds per series")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(
        f"Engine cost, KV-cached, one factor varied around lookback {base['lookback']}, pred_len "
        f"{base['pred_len']}, batch {base['batch']}\n{_title(report)}",
        fontsize=10,
    )
    return _save(fig, path)


def speedups(report: dict, path: Path) -> Path:
    """Cached against uncached seconds of the same call, per comparison scenario."""
    labels, cached, uncached, ratios = [], [], [], []
    for geometry, result in report["geometries"].items():
        for c in result["comparisons"]:
            labels.append(f"{geometry.removeprefix('kronos-')}\n{c['key']}")
            cached.append(c["cached"]["seconds"])
            uncached.append(c["uncached"]["seconds"])
            ratios.append(c["speedup"])
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(labels) + 2), 4.5))
    positions = range(len(labels))
    ax.bar([i - 0.2 for i in positions], cached, 0.4, label="KV-cached engine")
    ax.bar([i + 0.2 for i in positions], uncached, 0.4, label="uncached reference (extrapolated)")
    for i, ratio in enumerate(ratios):
        ax.annotate(f"{ratio:.1f}x", (i, max(cached[i], uncached[i])), ha="center", va="bottom", fontsize=9)
    ax.set_xticks(list(positions), labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("seconds per call")
    ax.legend()
    ax.set_title(f"Cached vs uncached generation (series x lookback; greedy)\n{_title(report)}", fontsize=10)
    return _save(fig, path)


def end_to_end(report: dict, path: Path) -> Path:
    """Latency percentiles against achieved throughput, and the mean split of a job's latency."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    bars = []
    for config, marker in zip(report["load"], ("o", "s"), strict=False):
        runs = config["runs"]
        offered = [r["offered_jobs_per_second"] for r in runs]
        for quantile, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
            left.plot(
                offered,
                [r["latency"][quantile] for r in runs],
                marker=marker,
                ls=style,
                label=f"{config['workers']} worker(s) {quantile}",
            )
        bars += [(f"{config['workers']}w {r['fraction_of_capacity']:.0%}", r["stages_mean"]) for r in runs]
    for label, job in report["queue_overhead"]["jobs"].items():
        bars.append((f"b1 {label}", job["stages_mean"]))
    left.set_yscale("log")
    left.set_xlabel("offered load (jobs/s)")
    left.set_ylabel("latency, submit to result (s)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    bottoms = [0.0] * len(bars)
    for stage in STAGES:
        values = [max(0.0, stages[stage] or 0.0) for _, stages in bars]
        right.bar(range(len(bars)), values, bottom=bottoms, label=stage)
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    right.set_xticks(range(len(bars)), [label for label, _ in bars], rotation=45, ha="right", fontsize=8)
    right.set_ylabel("mean seconds per job")
    right.legend(fontsize=8)
    job = report["job"]
    fig.suptitle(
        f"End to end through Redis and Celery, Kronos-small geometry, lookback {job['lookback']}, "
        f"{job['pred_len']} steps (load runs: batches up to 16; b1: batch size 1, one job at a time)\n"
        f"{_title(report)}",
        fontsize=10,
    )
    return _save(fig, path)
