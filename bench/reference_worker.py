"""Runs inside the reference's own virtual environment (PyPI `kronos-model-arch`, whose package is also named
`model`), started by bench/reference.py as `python -I reference_worker.py CHECKPOINT_DIR THREADS MAX_CONTEXT`.
Imports nothing of this project. Reads one JSON request per line on stdin, answers one JSON line on stdout:

    {"csv": path, "starts": [row, ...], "lookback": L, "pred_len": P, "T": 1.0, "top_k": 0, "top_p": 0.9,
     "sample_count": 1, "seed": 0}  ->  {"seconds": wall seconds of the predict call, "cpu_seconds": this
                                         process's CPU seconds during it, "close": [[...], ...] per series}

One series goes through `KronosPredictor.predict`, several through `predict_batch` (the reference's batch call).
"""

import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from model import Kronos, KronosPredictor, KronosTokenizer  # the reference's package (-I keeps this repo off the path)


def main() -> None:
    # the reference prints (e.g. on loading); stdout carries only the answers
    answers, sys.stdout = sys.stdout, sys.stderr
    checkpoint, threads, max_context = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(threads)
    tokenizer = KronosTokenizer.from_pretrained(str(checkpoint / "tokenizer")).eval()
    predictor = Kronos.from_pretrained(str(checkpoint / "predictor")).eval()
    reference = KronosPredictor(predictor, tokenizer, device="cpu", max_context=max_context)
    candles: dict[str, pd.DataFrame] = {}
    print(json.dumps({"ready": True, "torch": torch.__version__}), file=answers, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        data = candles.get(request["csv"])
        if data is None:
            data = candles[request["csv"]] = pd.read_csv(request["csv"], parse_dates=["timestamps"])
        lookback, pred_len = request["lookback"], request["pred_len"]
        frames, past, future = [], [], []
        for start in request["starts"]:
            window = data.iloc[start : start + lookback]
            frames.append(window[["open", "high", "low", "close", "volume", "amount"]].reset_index(drop=True))
            past.append(window["timestamps"].reset_index(drop=True))
            following = data["timestamps"].iloc[start + lookback : start + lookback + pred_len]
            future.append(following.reset_index(drop=True))
        sampling = {key: request[key] for key in ("T", "top_k", "top_p", "sample_count")}
        torch.manual_seed(request["seed"])
        started, cpu_started = time.perf_counter(), time.process_time()
        if len(frames) == 1:
            results = [reference.predict(frames[0], past[0], future[0], pred_len, verbose=False, **sampling)]
        else:
            results = reference.predict_batch(frames, past, future, pred_len, verbose=False, **sampling)
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        closes = [r["close"].tolist() for r in results]
        print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "close": closes}), file=answers, flush=True)


if __name__ == "__main__":
    main()
