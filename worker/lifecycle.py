"""Model lifecycle: load once per worker process, before it takes jobs; swap on a rolling update; release.

The engine being served lives in a ServingSlot. The batching thread holds the slot while an engine call
runs, so a new engine (loaded and smoke-tested beside the old one) replaces it only between batches.
"""

import gc
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tenacity import Retrying, before_sleep_log, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from model import KronosEngine, ModelLoadError, SeriesInput
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

# A checkpoint directory holding this file is an untrained stand-in (the demo's); results say so.
SYNTHETIC_MARKER = "UNTRAINED"
LOAD_ATTEMPTS = 4


@dataclass
class ServingModel:
    """The engine this process serves, and what results and health reports say about it."""

    engine: KronosEngine
    name: str
    device: str
    load_seconds: float
    loaded_at: float
    synthetic: bool


def device_label(device: torch.device) -> str:
    """The worker's name prefix: gpu0, gpu1, ... or cpu."""
    return f"gpu{device.index or 0}" if device.type == "cuda" else "cpu"


def load(settings: WorkerSettings, max_pred_len: int) -> ServingModel:
    """Load the configured model; transient failures (Hub unreachable, timeouts) are retried with backoff.

    The loading runs in a thread of its own that ends with it. libgomp keeps an OpenMP thread pool for every
    thread that ever ran parallel torch work, and once a process holds more OpenMP threads than cores it stops
    spin-waiting between parallel regions, so each of the decode loop's many small ops waits for its threads
    to wake up. A pool left behind by the loading thread did that to the batching thread on a 2-core worker:
    its engine calls took ~20 % longer and used 1.2 cores instead of 2 (docs/BENCHMARKS.md)."""
    outcome: list = []

    def load_here() -> None:
        try:
            outcome.append(_load(settings, max_pred_len))
        except BaseException as exc:  # re-raised in the caller's thread
            outcome.append(exc)

    loader = threading.Thread(target=load_here, name="kronos-model-load")
    loader.start()
    loader.join()
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _load(settings: WorkerSettings, max_pred_len: int) -> ServingModel:
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    retrying = Retrying(
        retry=retry_if_exception(lambda exc: isinstance(exc, ModelLoadError) and exc.transient),
        stop=stop_after_attempt(LOAD_ATTEMPTS),
        wait=wait_exponential_jitter(initial=2, max=30),
        before_sleep=before_sleep_log(log, logging.WARNING),
        reraise=True,
    )
    started = time.perf_counter()
    engine = retrying(
        KronosEngine.load,
        settings.predictor,
        settings.tokenizer,
        predictor_revision=settings.predictor_revision,
        tokenizer_revision=settings.tokenizer_revision,
        device=settings.device,
        dtype=settings.dtype,
        max_context=settings.max_context,
        max_pred_len=max_pred_len,
    )
    seconds = time.perf_counter() - started
    synthetic = (Path(settings.predictor) / SYNTHETIC_MARKER).is_file()
    return ServingModel(engine, settings.model, str(engine.device), seconds, time.time(), synthetic)


def release(serving: ServingModel) -> None:
    """Drop the weights and hand cached GPU memory back to the driver."""
    device = serving.engine.device
    del serving.engine
    free_unreferenced_memory(device)


def free_unreferenced_memory(device: torch.device) -> None:
    """Collect engines nothing references any more and return their cached GPU memory to the driver."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class ServingSlot:
    """The engine this process serves now. `use()` holds it for one engine call; `swap()` waits for that
    call to end, so a batch never sees its engine change or get released under it."""

    def __init__(self, serving: ServingModel):
        self._serving = serving
        self._lock = threading.Lock()

    @property
    def current(self) -> ServingModel:
        return self._serving

    @contextmanager
    def use(self) -> Iterator[ServingModel]:
        with self._lock:
            yield self._serving

    def swap(self, serving: ServingModel) -> ServingModel:
        """Serve `serving` from the next batch on; returns the one it replaces."""
        with self._lock:
            previous, self._serving = self._serving, serving
        return previous


def smoke_series(pred_len: int = 2) -> SeriesInput:
    """A small, fixed series of plausible candles: enough to prove that an engine produces a forecast."""
    steps = np.arange(64)
    close = 100 + 2 * np.sin(steps / 5) + steps * 0.05
    open_ = np.concatenate([[close[0]], close[:-1]])
    candles = pd.DataFrame(
        {
            "open": open_,
            "high": np.maximum(open_, close) + 0.3,
            "low": np.minimum(open_, close) - 0.3,
            "close": close,
            "volume": 1000 + 50 * np.cos(steps / 3),
        }
    )
    stamps = pd.date_range("2024-01-02 09:30", periods=len(steps) + pred_len, freq="5min")
    return SeriesInput(candles, stamps[len(steps) :], timestamps=stamps[: len(steps)], seed=7)


def check_forecast(forecasts) -> None:
    """Raises unless the smoke forecast is a finite path of the asked length."""
    mean = forecasts[0].mean
    if len(mean) != 2 or not np.isfinite(mean.to_numpy(dtype=float)).all():
        raise RuntimeError(f"smoke forecast is not a finite 2-step path: {mean.to_dict('list')}")
