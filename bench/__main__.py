"""The benchmark suite, one command: engine sweeps, end to end through the queue, plots.

    python -m bench                          # full CPU suite, ~35 min on a quiet 2-core machine
    python -m bench --quick                  # smoke run, ~2 min, into bench/results/quick/
    python -m bench --only reference         # or engine, e2e; plots are drawn from whatever results exist
    python -m bench --device cuda --dtype bfloat16

The reference part (bench/compare.py, CPU only) runs the reference Kronos code (PyPI kronos-model-arch) in its own
virtual environment and process beside the engine: give its Python with --reference-python or
KRONOS_BENCH_REFERENCE_PYTHON, or create the default one with `python -m bench.reference --create`; without it that
column is left out and the run says why. --quick skips the reference part.

Writes <out-dir>/compare_cpu.json, <out-dir>/engine_sweep_<tag>.json, <out-dir>/e2e_<tag>.json,
<out-dir>/suite_<tag>.json and their tables as Markdown, <out-dir>/tables_<tag>.md (tag: cpu, or the device and
dtype, e.g. cuda-bfloat16), and the plots <plots-dir>/bench-*-<tag>.png. Not part of the tests.
"""

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from bench import compare, e2e, engine_bench, engine_sweep, plots, tables

RESULTS = engine_bench.ROOT / "bench" / "results"
IMAGES = engine_bench.ROOT / "docs" / "images"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def shown(path: Path) -> str:
    """The path relative to the repository when it lies inside it."""
    return str(path.relative_to(engine_bench.ROOT)) if path.is_relative_to(engine_bench.ROOT) else str(path)


def gpu_info(device: str) -> dict:
    available = torch.cuda.is_available()
    info = {"available": available, "used": device.startswith("cuda")}
    if available:
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if info["used"]:
        info["name"] = torch.cuda.get_device_name(torch.device(device))
    else:
        info["note"] = (
            "CPU run: no GPU was available on this machine, the GPU part was not run"
            if not available
            else "CPU run: a GPU was available but not asked for (--device cuda)"
        )
    return info


def header(args, part: str, threads: int) -> dict:
    return {
        "benchmark": part,
        "mode": "quick" if args.quick else "full",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench", *args.argv]),
        "device": args.device,
        "dtype": args.dtype,
        "machine": engine_bench.machine(threads),
        "gpu": gpu_info(args.device),
        "code": engine_bench.code_version(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }


def run_part(args, part: str, threads: int, measure, path: Path, say) -> dict:
    started = time.perf_counter()
    report = header(args, part, threads)
    report.update(measure())
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_seconds"] = time.perf_counter() - started
    path.write_text(json.dumps(report, indent=2) + "\n")
    say(f"wrote {path}")
    return report


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small grid, short loads (~2 min)")
    parser.add_argument("--only", choices=("reference", "engine", "e2e"), help="run one part")
    parser.add_argument("--reference-python", help="the reference's Python (bench/reference.py says where else)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="predictor precision (GPU only)")
    parser.add_argument(
        "--geometries",
        nargs="+",
        choices=sorted(engine_bench.GEOMETRIES),
        help="engine sweep geometries (default: both; --quick: kronos-small)",
    )
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (cores)")
    parser.add_argument(
        "--out-dir", type=Path, help="JSON results (default bench/results, --quick bench/results/quick)"
    )
    parser.add_argument("--plots-dir", type=Path, help="plots (default docs/images, --quick the results directory)")
    args = parser.parse_args(argv)
    args.argv = argv
    if not args.device.startswith("cuda") and args.dtype != "float32":
        parser.error(f"--dtype {args.dtype} is offered on GPU only (as the worker's KRONOS_DTYPE)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU is visible to this process")
    args.out_dir = args.out_dir or (RESULTS / "quick" if args.quick else RESULTS)
    args.plots_dir = args.plots_dir or (args.out_dir if args.quick else IMAGES)
    args.geometries = args.geometries or (["kronos-small"] if args.quick else sorted(engine_bench.GEOMETRIES)[::-1])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    tag = "cpu" if args.device == "cpu" else f"{args.device.replace(':', '')}-{args.dtype}"

    def say(line: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {line}", flush=True)

    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    args.plots_dir.mkdir(parents=True, exist_ok=True)
    engine_path = args.out_dir / f"engine_sweep_{tag}.json"
    e2e_path = args.out_dir / f"e2e_{tag}.json"
    compare_path = args.out_dir / "compare_cpu.json"
    if args.only == "reference" or (args.only is None and args.device == "cpu" and not args.quick):
        options = ["--threads", str(args.threads), "--out", str(compare_path)]
        if args.reference_python:
            options += ["--reference-python", args.reference_python]
        compare.main(options)
    if args.only in (None, "engine"):
        run_part(
            args,
            "engine sweep",
            args.threads,
            lambda: engine_sweep.run(args.geometries, args.quick, args.device, DTYPES[args.dtype], args.threads, say),
            engine_path,
            say,
        )
    if args.only in (None, "e2e"):
        run_part(
            args,
            "end to end through the queue",
            args.threads,
            lambda: e2e.run(args.quick, args.device, args.dtype, args.threads, say),
            e2e_path,
            say,
        )
    results = {p: json.loads(p.read_text()) for p in (engine_path, e2e_path) if p.is_file()}
    drawn = plots.draw_all(results.get(engine_path), results.get(e2e_path), args.plots_dir, tag)
    suite = {
        "command": " ".join(["python -m bench", *args.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_seconds": time.perf_counter() - started,
        "results": [shown(p) for p in (compare_path, *results) if p.is_file()],
        "plots": [shown(p) for p in drawn],
    }
    (args.out_dir / f"suite_{tag}.json").write_text(json.dumps(suite, indent=2) + "\n")
    markdown = tables.markdown(results.get(engine_path), results.get(e2e_path))
    if compare_path.is_file():
        markdown = f"## Against the reference\n\n{compare.table(json.loads(compare_path.read_text()))}\n\n{markdown}"
    (args.out_dir / f"tables_{tag}.md").write_text(markdown + "\n")
    print(markdown)
    say(f"done; plots: {', '.join(suite['plots'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
