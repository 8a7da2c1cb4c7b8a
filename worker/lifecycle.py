"""Model lifecycle: load once per worker process, before it takes jobs; release at shutdown."""

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tenacity import Retrying, before_sleep_log, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from model import KronosEngine, ModelLoadError
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
    """Load the configured model; transient failures (Hub unreachable, timeouts) are retried with backoff."""
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
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
