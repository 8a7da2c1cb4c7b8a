"""Worker-only settings from KRONOS_* variables (the shared ones live in tasks/settings.py).

Documented in docs/CONFIGURATION.md with every other variable.
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache

from tasks.settings import (
    PRODUCER_PATTERN,
    SettingsError,
    current_settings,
    env_name,
    env_positive_seconds,
    env_raw,
    env_whole_number,
)
from worker.quotas import QUOTA_MODES, QuotaPolicy

_DEVICES_HELP = "cpu, cuda, cuda:N or auto"
_DTYPES = ("float32", "bfloat16", "float16", "int8")
_LOG_FORMATS = ("json", "text")


@dataclass(frozen=True)
class WorkerSettings:
    model: str  # the served model's name, which is also its queue
    predictor: str  # published name, Hub repo id or local directory
    predictor_revision: str | None
    tokenizer: str | None  # None: the one the published model was trained with
    tokenizer_revision: str | None
    max_context: int | None
    device: str
    dtype: str
    max_batch_size: int
    max_batch_wait: float  # seconds
    concurrency: int
    torch_threads: int | None
    max_retries: int
    retry_backoff: float  # seconds, first retry; doubles each time
    retry_backoff_max: float
    progress_interval: float  # seconds between progress writes of one job
    test_faults: bool
    test_fault_key: str | None  # Redis key whose existence fails every batch (worker/faults.py); tests only
    circuit_failures: int  # different jobs failing internally in a row that open the circuit breaker; 0: never
    circuit_cooldown: float  # seconds between the circuit opening (or a failed probe) and the next probe
    batch_grow_after: int  # successful batches after which a lowered batch limit doubles again
    metrics_port: int  # this process's /metrics port (base + GPU index); 0: no HTTP endpoint
    metrics_address: str
    heartbeat_interval: float  # seconds
    log_format: str  # json or text
    quotas: QuotaPolicy
    poll_interval: float  # seconds an idle worker waits between two looks at its queues where Redis announces nothing
    idle_recheck: float  # seconds an idle worker that hears announcements waits at most between two looks
    claim_lease: float  # seconds a running job's claim lasts unless renewed (renewed every third of it)


def load_worker_settings(environ: Mapping[str, str] = os.environ) -> WorkerSettings:
    shared = current_settings() if environ is os.environ else None
    default_model = shared.default_model if shared else "kronos-small"
    model = env_name(environ, "KRONOS_MODEL", default_model)
    if shared and model not in shared.models:
        raise SettingsError(f"KRONOS_MODEL {model!r} is not one of KRONOS_MODELS ({', '.join(shared.models)})")
    device = env_raw(environ, "KRONOS_DEVICE") or "auto"
    if not (device in ("cpu", "cuda", "auto") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise SettingsError(f"KRONOS_DEVICE must be {_DEVICES_HELP}, got {device!r}")
    dtype = env_raw(environ, "KRONOS_DTYPE") or "float32"
    if dtype not in _DTYPES:
        raise SettingsError(f"KRONOS_DTYPE must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    max_batch_size = env_whole_number(environ, "KRONOS_MAX_BATCH_SIZE", 16)
    max_context = env_raw(environ, "KRONOS_MAX_CONTEXT")
    torch_threads = env_raw(environ, "KRONOS_TORCH_THREADS")
    backoff = env_positive_seconds(environ, "KRONOS_RETRY_BACKOFF", 1.0)
    # A worker holds a delayed job unacknowledged until it runs: by default half the visibility timeout at most.
    default_wait = min(300.0, shared.visibility_timeout / 2) if shared else 300.0
    quotas = _quota_policy(environ, default_wait)
    if shared and quotas.max_wait >= shared.visibility_timeout:
        raise SettingsError(
            f"KRONOS_QUOTA_MAX_WAIT ({quotas.max_wait:g}) must be below KRONOS_VISIBILITY_TIMEOUT "
            f"({shared.visibility_timeout}): a worker holds a delayed job unacknowledged until it runs"
        )
    # A copy of a running job waits for its lease to lapse, held in a worker like a delayed job: so the lease
    # stays below the visibility timeout (by default 30 s, or half the timeout when that is shorter).
    default_lease = min(30.0, shared.visibility_timeout / 2) if shared else 30.0
    claim_lease = env_positive_seconds(environ, "KRONOS_CLAIM_LEASE_SECONDS", default_lease)
    if shared and claim_lease >= shared.visibility_timeout:
        raise SettingsError(
            f"KRONOS_CLAIM_LEASE_SECONDS ({claim_lease:g}) must be below KRONOS_VISIBILITY_TIMEOUT "
            f"({shared.visibility_timeout}): a copy of a running job is held until the lease lapses"
        )
    return WorkerSettings(
        model=model,
        predictor=env_raw(environ, "KRONOS_PREDICTOR") or model,
        predictor_revision=env_raw(environ, "KRONOS_PREDICTOR_REVISION"),
        tokenizer=env_raw(environ, "KRONOS_TOKENIZER"),
        tokenizer_revision=env_raw(environ, "KRONOS_TOKENIZER_REVISION"),
        max_context=None if max_context is None else env_whole_number(environ, "KRONOS_MAX_CONTEXT", 0),
        device=device,
        dtype=dtype,
        max_batch_size=max_batch_size,
        max_batch_wait=env_positive_seconds(environ, "KRONOS_MAX_BATCH_WAIT_MS", 20.0) / 1000,
        # twice the batch size: the next batch gathers while the current one runs
        concurrency=env_whole_number(environ, "KRONOS_CONCURRENCY", 2 * max_batch_size),
        torch_threads=None if torch_threads is None else env_whole_number(environ, "KRONOS_TORCH_THREADS", 0),
        max_retries=_count(environ, "KRONOS_MAX_RETRIES", 3),
        retry_backoff=backoff,
        retry_backoff_max=max(backoff, env_positive_seconds(environ, "KRONOS_RETRY_BACKOFF_MAX", 60.0)),
        progress_interval=env_positive_seconds(environ, "KRONOS_PROGRESS_INTERVAL", 1.0),
        test_faults=env_raw(environ, "KRONOS_TEST_FAULTS") == "1",
        test_fault_key=env_raw(environ, "KRONOS_TEST_FAULT_KEY"),
        circuit_failures=_count(environ, "KRONOS_CIRCUIT_FAILURES", 5),
        circuit_cooldown=env_positive_seconds(environ, "KRONOS_CIRCUIT_COOLDOWN", 30.0),
        batch_grow_after=env_whole_number(environ, "KRONOS_BATCH_GROW_AFTER", 50),
        metrics_port=_metrics_port(environ, device),
        metrics_address=env_raw(environ, "KRONOS_METRICS_ADDRESS") or "0.0.0.0",
        heartbeat_interval=env_positive_seconds(environ, "KRONOS_HEARTBEAT_INTERVAL", 10.0),
        log_format=_log_format(environ),
        quotas=quotas,
        poll_interval=env_positive_seconds(environ, "KRONOS_POLL_INTERVAL_MS", 10.0) / 1000,
        idle_recheck=env_positive_seconds(environ, "KRONOS_IDLE_RECHECK_SECONDS", 5.0),
        claim_lease=claim_lease,
    )


def _quota_policy(environ: Mapping[str, str], default_wait: float = 300.0) -> QuotaPolicy:
    per_producer: dict[str, int] = {}
    raw = env_raw(environ, "KRONOS_PRODUCER_QUOTAS")
    for item in raw.split(",") if raw else ():
        producer, _, limit = (part.strip() for part in item.partition("="))
        if not PRODUCER_PATTERN.fullmatch(producer) or not (limit.isascii() and limit.isdigit()):
            raise SettingsError(
                f"KRONOS_PRODUCER_QUOTAS must be producer=jobs_per_minute[,producer=jobs_per_minute...], got {raw!r}"
            )
        per_producer[producer] = int(limit)
    mode = env_raw(environ, "KRONOS_QUOTA_MODE") or "reject"
    if mode not in QUOTA_MODES:
        raise SettingsError(f"KRONOS_QUOTA_MODE must be one of {', '.join(QUOTA_MODES)}, got {mode!r}")
    return QuotaPolicy(
        per_minute=_count(environ, "KRONOS_QUOTA_PER_MINUTE", 100),
        per_producer=per_producer,
        mode=mode,
        max_wait=env_positive_seconds(environ, "KRONOS_QUOTA_MAX_WAIT", default_wait),
    )


def _metrics_port(environ: Mapping[str, str], device: str) -> int:
    # The launcher starts one process per GPU with the same environment: each one takes base + its GPU
    # index, so the processes of one host never compete for a port.
    base = _count(environ, "KRONOS_METRICS_PORT", 9808)
    if base == 0:
        return 0
    port = base + (int(device[5:]) if device.startswith("cuda:") else 0)
    if port > 65535:
        raise SettingsError(f"KRONOS_METRICS_PORT {base} + GPU index {port - base} is above 65535")
    return port


def _log_format(environ: Mapping[str, str]) -> str:
    log_format = env_raw(environ, "KRONOS_LOG_FORMAT") or "json"
    if log_format not in _LOG_FORMATS:
        raise SettingsError(f"KRONOS_LOG_FORMAT must be one of {', '.join(_LOG_FORMATS)}, got {log_format!r}")
    return log_format


def _count(environ: Mapping[str, str], variable: str, default: int) -> int:
    raw = env_raw(environ, variable)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()):
        raise SettingsError(f"{variable} must be a whole number >= 0, got {raw!r}")
    return int(raw)


@cache
def current_worker_settings() -> WorkerSettings:
    return load_worker_settings()
