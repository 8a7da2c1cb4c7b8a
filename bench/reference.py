"""The reference Kronos code as the benchmarks' baseline, in its own virtual environment and process.

The reference is PyPI's `kronos-model-arch` (the code of shiyu-coder/Kronos). Its top-level package is also named
`model`, so it cannot share an environment with this project: it gets a virtual environment of its own, and the
benchmark talks to it through bench/reference_worker.py over a pipe. Where its Python is, first match wins:

    --reference-python PATH              (python -m bench, python -m bench.compare)
    KRONOS_BENCH_REFERENCE_PYTHON=PATH
    ~/.cache/kronos-bench/reference-venv/bin/python

Create that default environment once (the same torch version as this one, from the configured package index):

    python -m bench.reference --create [VENV_DIR]

Without a usable reference Python the comparison prints why and leaves the reference column out.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.engine_bench import CANDLES_CSV, MAX_CONTEXT
from model import KronosEngine

ENV_VARIABLE = "KRONOS_BENCH_REFERENCE_PYTHON"
DEFAULT_VENV = Path.home() / ".cache" / "kronos-bench" / "reference-venv"
WORKER = Path(__file__).with_name("reference_worker.py")
PACKAGE = "kronos-model-arch"
# Config keys of the reference's constructors that do nothing at inference (dropout, quantizer training losses)
INERT_TOKENIZER = {
    "ffn_dropout_p": 0.0,
    "attn_dropout_p": 0.0,
    "resid_dropout_p": 0.0,
    "beta": 0.05,
    "gamma0": 1.0,
    "gamma": 1.1,
    "zeta": 0.05,
    "group_size": 4,
}
INERT_PREDICTOR = {"ffn_dropout_p": 0.0, "attn_dropout_p": 0.0, "resid_dropout_p": 0.0, "token_dropout_p": 0.0}
CHECK = "import torch; from model import Kronos, KronosPredictor, KronosTokenizer; print(torch.__version__)"


def locate(explicit: str | None = None) -> tuple[str | None, str]:
    """The reference's Python and where it was found, or None and why there is none."""
    candidates = [
        (explicit, "--reference-python"),
        (os.environ.get(ENV_VARIABLE), ENV_VARIABLE),
        (str(DEFAULT_VENV / "bin" / "python"), "the default reference venv"),
    ]
    for path, source in candidates:
        if not path:
            continue
        if not Path(path).is_file():
            if source != "the default reference venv":
                return None, f"{source} {path}: no such file"
            continue
        done = subprocess.run([path, "-I", "-c", CHECK], capture_output=True, text=True, cwd=tempfile.gettempdir())
        if done.returncode != 0:
            why = done.stderr.strip()[-300:]
            return None, f"{source} {path} cannot import the reference package ({PACKAGE}): {why}"
        return path, f"{source} {path} (torch {done.stdout.strip()})"
    return None, (
        f"no reference Python: give --reference-python or {ENV_VARIABLE}, or create the default one with "
        "`python -m bench.reference --create`"
    )


def write_checkpoint(engine: KronosEngine, directory: Path) -> None:
    """The engine's float32 weights in the Hub layout the reference loads (config.json + model.safetensors)."""
    for name, module, inert in (
        ("tokenizer", engine.tokenizer, INERT_TOKENIZER),
        ("predictor", engine.predictor, INERT_PREDICTOR),
    ):
        target = directory / name
        target.mkdir(parents=True, exist_ok=True)
        config = {**module.config.__dict__, **inert}
        (target / "config.json").write_text(json.dumps(config))
        state = {key: value.float().contiguous() for key, value in module.state_dict().items()}
        save_file(state, target / "model.safetensors")


class ReferenceProcess:
    """The reference predictor loaded once in its own process; `run` times one of its forecast calls."""

    def __init__(self, python: str, engine: KronosEngine, threads: int):
        self._directory = tempfile.TemporaryDirectory(prefix="kronos-reference-")
        write_checkpoint(engine, Path(self._directory.name))
        self._process = subprocess.Popen(
            [python, "-I", str(WORKER), self._directory.name, str(threads), str(MAX_CONTEXT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=self._directory.name,  # never this repository: its `model` package would shadow the reference's
        )
        self.hello = self._answer()

    def _answer(self) -> dict:
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the reference process ended (exit {self._process.wait()})")
        return json.loads(line)

    def run(self, starts: list[int], lookback: int, pred_len: int, sampling: dict, seed: int = 0) -> dict:
        request = {"csv": str(CANDLES_CSV), "starts": starts, "lookback": lookback, "pred_len": pred_len}
        self._process.stdin.write(json.dumps({**request, **sampling, "seed": seed}) + "\n")
        self._process.stdin.flush()
        return self._answer()

    def close(self) -> None:
        self._process.stdin.close()
        self._process.wait(timeout=60)
        self._directory.cleanup()

    def __enter__(self) -> "ReferenceProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def create(venv: Path) -> int:
    """A virtual environment with the reference package and this process's torch version."""
    torch_version = torch.__version__.split("+")[0]
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", f"torch=={torch_version}", PACKAGE, "pandas"]
    subprocess.run(pip, check=True)
    python, how = locate(str(venv / "bin" / "python"))
    print(how)
    return 0 if python else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reference", description=__doc__.split("\n\n")[0])
    parser.add_argument("--create", nargs="?", const=DEFAULT_VENV, type=Path, metavar="VENV_DIR")
    parser.add_argument("--reference-python", help=f"the reference's Python (else {ENV_VARIABLE}, else the default)")
    args = parser.parse_args(argv)
    if args.create:
        return create(args.create)
    python, how = locate(args.reference_python)
    print(how)
    return 0 if python else 1


if __name__ == "__main__":
    sys.exit(main())
