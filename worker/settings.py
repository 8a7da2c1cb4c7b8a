"""Worker-only settings from KRONOS_* variables, read by the loader of tasks/settings.py like every other.

Documented in docs/CONFIGURATION.md with every other variable.
"""

import os
from collections.abc import Mapping
from functools import cache
from typing import Annotated, Any, Self

from pydantic import Field, ValidationInfo, field_validator, model_validator

from tasks.settings import (
    PRODUCER_PATTERN,
    Count,
    KronosBaseSettings,
    KronosSettings,
    Milliseconds,
    Name,
    PositiveSeconds,
    WholeNumber,
    current_settings,
    load,
    one_of,
    parsed_by,
)
from worker.quotas import QUOTA_MODES, QuotaPolicy

_DEVICES_HELP = "cpu, cuda, cuda:N or auto"


def _device(raw: str) -> str:
    if not (raw in ("cpu", "cuda", "auto") or (raw.startswith("cuda:") and raw[5:].isdigit())):
        raise ValueError(f"must be {_DEVICES_HELP}, got {raw!r}")
    return raw


def _producer_quotas(raw: str) -> dict[str, int]:
    per_producer = {}
    for item in raw.split(","):
        producer, _, limit = (part.strip() for part in item.partition("="))
        if not PRODUCER_PATTERN.fullmatch(producer) or not (limit.isascii() and limit.isdigit()):
            raise ValueError(f"must be producer=jobs_per_minute[,producer=jobs_per_minute...], got {raw!r}")
        per_producer[producer] = int(limit)
    return per_producer


def _deployment_default(data: dict[str, Any], derive, standalone):
    """`derive(deployment)` where the worker's settings are checked against the deployment's, else `standalone`."""
    deployment = data.get("deployment")
    return derive(deployment) if deployment is not None else standalone


class WorkerSettings(KronosBaseSettings):
    # The process's shared settings, which the worker's must agree with; None (settings read from a given
    # mapping): checked alone. Not a variable: excluded from the environment and from dumps.
    deployment: KronosSettings | None = Field(None, exclude=True, repr=False)
    model: Name = Field(  # the served model's name, which is also its queue
        default_factory=lambda data: _deployment_default(data, lambda shared: shared.default_model, "kronos-small")
    )
    predictor: str = Field(default_factory=lambda data: data.get("model", "kronos-small"))  # name, repo or directory
    predictor_revision: str | None = None
    tokenizer: str | None = None  # None: the one the published model was trained with
    tokenizer_revision: str | None = None
    max_context: WholeNumber | None = None
    device: Annotated[str, parsed_by(_device)] = "auto"
    dtype: Annotated[str, one_of("float32", "bfloat16", "float16", "int8")] = "float32"
    max_batch_size: WholeNumber = 16
    max_batch_wait: Milliseconds = Field(0.02, alias="MAX_BATCH_WAIT_MS")  # seconds
    # twice the batch size: the next batch gathers while the current one runs
    concurrency: WholeNumber = Field(default_factory=lambda data: 2 * data.get("max_batch_size", 16))
    torch_threads: WholeNumber | None = None
    max_retries: Count = 3
    retry_backoff: PositiveSeconds = 1.0  # seconds, first retry; doubles each time
    retry_backoff_max: PositiveSeconds = Field(60.0, validate_default=True)
    progress_interval: PositiveSeconds = 1.0  # seconds between progress writes of one job
    test_faults: Annotated[bool, parsed_by(lambda raw: raw == "1")] = False
    test_fault_key: str | None = None  # Redis key whose existence fails every batch (worker/faults.py); tests only
    circuit_failures: Count = 5  # different jobs failing internally in a row that open the circuit breaker; 0: never
    circuit_cooldown: PositiveSeconds = 30.0  # seconds between the circuit opening (or a failed probe) and a probe
    batch_grow_after: WholeNumber = 50  # successful batches after which a lowered batch limit doubles again
    # this process's /metrics port (base + GPU index, below); 0: no HTTP endpoint
    metrics_port: Count = Field(9808, validate_default=True)
    metrics_address: str = "0.0.0.0"
    heartbeat_interval: PositiveSeconds = 10.0
    log_format: Annotated[str, one_of("json", "text")] = "json"
    quota_per_minute: Count = 100  # for producers without their own entry; 0: no limit
    producer_quotas: Annotated[dict[str, int], parsed_by(_producer_quotas)] = Field(default_factory=dict)
    quota_mode: Annotated[str, one_of(*QUOTA_MODES)] = "reject"
    # A worker holds a delayed job unacknowledged until it runs: by default half the visibility timeout at most.
    quota_max_wait: PositiveSeconds = Field(
        default_factory=lambda data: _deployment_default(
            data, lambda shared: min(300.0, shared.visibility_timeout / 2), 300.0
        )
    )
    # seconds an idle worker waits between two looks at its queues where Redis announces nothing
    poll_interval: Milliseconds = Field(0.01, alias="POLL_INTERVAL_MS")
    # seconds an idle worker that does not listen waits for a wake-up token at most between two looks
    idle_recheck: PositiveSeconds = Field(5.0, alias="IDLE_RECHECK_SECONDS")
    # Seconds a running job's claim lasts unless renewed (renewed every third of it). A copy of a running job
    # waits for its lease to lapse, held in a worker like a delayed job: so the lease stays below the visibility
    # timeout (by default 30 s, or half the timeout when that is shorter).
    claim_lease: PositiveSeconds = Field(
        default_factory=lambda data: _deployment_default(
            data, lambda shared: min(30.0, shared.visibility_timeout / 2), 30.0
        ),
        alias="CLAIM_LEASE_SECONDS",
    )

    @property
    def quotas(self) -> QuotaPolicy:
        return QuotaPolicy(self.quota_per_minute, self.producer_quotas, self.quota_mode, self.quota_max_wait)

    @field_validator("model")
    @classmethod
    def _served_by_the_deployment(cls, model: str, info: ValidationInfo) -> str:
        shared = info.data.get("deployment")
        if shared is not None and model not in shared.models:
            raise ValueError(f"{model!r} is not one of KRONOS_MODELS ({', '.join(shared.models)})")
        return model

    @field_validator("retry_backoff_max")
    @classmethod
    def _at_least_the_first_backoff(cls, backoff_max: float, info: ValidationInfo) -> float:
        return max(info.data.get("retry_backoff", 1.0), backoff_max)

    @field_validator("metrics_port")
    @classmethod
    def _port_of_this_gpu(cls, base: int, info: ValidationInfo) -> int:
        # The launcher starts one process per GPU with the same environment: each one takes base + its GPU
        # index, so the processes of one host never compete for a port.
        device = info.data.get("device", "auto")
        if base == 0:
            return 0
        port = base + (int(device[5:]) if device.startswith("cuda:") else 0)
        if port > 65535:
            raise ValueError(f"{base} + GPU index {port - base} is above 65535")
        return port

    @model_validator(mode="after")
    def _within_the_visibility_timeout(self) -> Self:
        if self.deployment is None:
            return self
        timeout = self.deployment.visibility_timeout
        if self.quota_max_wait >= timeout:
            raise ValueError(
                f"KRONOS_QUOTA_MAX_WAIT ({self.quota_max_wait:g}) must be below KRONOS_VISIBILITY_TIMEOUT "
                f"({timeout}): a worker holds a delayed job unacknowledged until it runs"
            )
        if self.claim_lease >= timeout:
            raise ValueError(
                f"KRONOS_CLAIM_LEASE_SECONDS ({self.claim_lease:g}) must be below KRONOS_VISIBILITY_TIMEOUT "
                f"({timeout}): a copy of a running job is held until the lease lapses"
            )
        return self


def load_worker_settings(environ: Mapping[str, str] | None = None) -> WorkerSettings:
    """The worker's settings from `environ`; from this process's environment (the default) they are also
    checked against, and take their defaults from, the process's shared settings."""
    if environ is None or environ is os.environ:
        return load(WorkerSettings, deployment=current_settings())
    return load(WorkerSettings, environ)


@cache
def current_worker_settings() -> WorkerSettings:
    return load_worker_settings()
