"""Settings from KRONOS_* variables: the worker's (worker/settings.py) and the shared ones tests/unit/
test_celery_config.py does not already cover. An unset or blank variable takes its default; an invalid one
is a SettingsError whose message starts with the variable's name."""

import pytest

from tasks.settings import SettingsError, load_settings
from worker.settings import load_worker_settings


def test_worker_defaults():
    settings = load_worker_settings({})
    assert (settings.model, settings.predictor, settings.tokenizer) == ("kronos-small", "kronos-small", None)
    assert (settings.device, settings.dtype, settings.max_context) == ("auto", "float32", None)
    assert (settings.max_batch_size, settings.max_batch_wait, settings.batch_grow_after) == (16, 0.02, 50)
    assert settings.concurrency == 32  # twice the batch size: the next batch gathers while one runs
    assert (settings.max_retries, settings.retry_backoff, settings.retry_backoff_max) == (3, 1.0, 60.0)
    assert (settings.circuit_failures, settings.circuit_cooldown) == (5, 30.0)
    assert (settings.metrics_port, settings.metrics_address, settings.log_format) == (9808, "0.0.0.0", "json")
    assert (settings.heartbeat_interval, settings.progress_interval) == (10.0, 1.0)
    assert (settings.poll_interval, settings.idle_recheck, settings.claim_lease) == (0.01, 5.0, 30.0)
    assert (settings.quotas.per_minute, settings.quotas.mode, settings.quotas.max_wait) == (100, "reject", 300.0)
    assert settings.test_faults is False and settings.test_fault_key is None


def test_worker_blank_variables_take_the_defaults():
    blank = {
        name: " " for name in ("KRONOS_DEVICE", "KRONOS_MAX_BATCH_SIZE", "KRONOS_MAX_RETRIES", "KRONOS_LOG_FORMAT")
    }
    assert load_worker_settings(blank) == load_worker_settings({})


def test_worker_values_that_follow_others():
    settings = load_worker_settings(
        {
            "KRONOS_MAX_BATCH_SIZE": "4",
            "KRONOS_RETRY_BACKOFF": "90",
            "KRONOS_DEVICE": "cuda:3",
            "KRONOS_MAX_BATCH_WAIT_MS": "5",
            "KRONOS_POLL_INTERVAL_MS": "50",
        }
    )
    assert settings.concurrency == 8
    assert settings.retry_backoff_max == 90.0  # never below the first backoff
    assert settings.metrics_port == 9808 + 3  # one port per GPU process of a host
    assert (settings.max_batch_wait, settings.poll_interval) == (0.005, 0.05)  # milliseconds in, seconds kept


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("KRONOS_MODEL", "kronos small"),
        ("KRONOS_DEVICE", "tpu"),
        ("KRONOS_DEVICE", "cuda:x"),
        ("KRONOS_DTYPE", "float64"),
        ("KRONOS_MAX_BATCH_SIZE", "0"),
        ("KRONOS_MAX_CONTEXT", "-1"),
        ("KRONOS_MAX_BATCH_WAIT_MS", "0"),
        ("KRONOS_CONCURRENCY", "many"),
        ("KRONOS_TORCH_THREADS", "1.5"),
        ("KRONOS_MAX_RETRIES", "-1"),
        ("KRONOS_RETRY_BACKOFF", "nan"),
        ("KRONOS_RETRY_BACKOFF_MAX", "inf"),
        ("KRONOS_PROGRESS_INTERVAL", "0"),
        ("KRONOS_CIRCUIT_FAILURES", "five"),
        ("KRONOS_CIRCUIT_COOLDOWN", "-30"),
        ("KRONOS_BATCH_GROW_AFTER", "0"),
        ("KRONOS_METRICS_PORT", "port"),
        ("KRONOS_HEARTBEAT_INTERVAL", "0"),
        ("KRONOS_LOG_FORMAT", "xml"),
        ("KRONOS_POLL_INTERVAL_MS", "soon"),
        ("KRONOS_IDLE_RECHECK_SECONDS", "0"),
        ("KRONOS_CLAIM_LEASE_SECONDS", "-1"),
        ("KRONOS_QUOTA_PER_MINUTE", "1e3"),
        ("KRONOS_QUOTA_MODE", "drop"),
        ("KRONOS_QUOTA_MAX_WAIT", "0"),
        ("KRONOS_PRODUCER_QUOTAS", "reports:5"),
    ],
)
def test_an_invalid_worker_value_is_an_error_naming_the_variable(variable, value):
    with pytest.raises(SettingsError, match=rf"^{variable}\b"):
        load_worker_settings({variable: value})


def test_a_metrics_port_pushed_past_65535_by_the_gpu_index_is_refused():
    with pytest.raises(SettingsError, match=r"^KRONOS_METRICS_PORT 65535 \+ GPU index 1"):
        load_worker_settings({"KRONOS_METRICS_PORT": "65535", "KRONOS_DEVICE": "cuda:1"})
    assert load_worker_settings({"KRONOS_METRICS_PORT": "0", "KRONOS_DEVICE": "cuda:1"}).metrics_port == 0


def test_shared_defaults_of_producers_replication_and_sentinel():
    settings = load_settings({})
    assert (settings.producer, settings.producers) == (None, ())
    assert (settings.replicas_to_ack, settings.replica_ack_timeout) == (0, 2.0)
    assert (settings.sentinel_master, settings.sentinel_tls, settings.sentinel_password) == (None, False, None)
    assert (settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file) == (None, None, None)


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"KRONOS_PRODUCER": "reports.daily"}, "KRONOS_PRODUCER"),
        ({"KRONOS_PRODUCERS": "reports,reports"}, "KRONOS_PRODUCERS"),
        ({"KRONOS_PRODUCERS": "reports,a.b"}, "KRONOS_PRODUCERS"),
        ({"KRONOS_REPLICAS_TO_ACK": "-1"}, "KRONOS_REPLICAS_TO_ACK"),
        ({"KRONOS_REPLICA_ACK_TIMEOUT": "0"}, "KRONOS_REPLICA_ACK_TIMEOUT"),
        ({"KRONOS_SENTINEL_TLS": "yes"}, "KRONOS_SENTINEL_TLS"),
        ({"KRONOS_SENTINEL_TLS": "1"}, "KRONOS_SENTINEL_TLS"),  # without sentinel:// URLs
        ({"KRONOS_SENTINEL_PASSWORD_FILE": "/nonexistent/password"}, "KRONOS_SENTINEL_PASSWORD_FILE"),
        (
            {"KRONOS_BROKER_URL": "sentinel://s1:26379/0", "KRONOS_RESULT_BACKEND": "redis://r:6379/1"},
            "KRONOS_BROKER_URL",
        ),
        (
            {"KRONOS_BROKER_URL": "sentinel://s1:26379/0", "KRONOS_RESULT_BACKEND": "sentinel://s1:26379/1"},
            "KRONOS_SENTINEL_MASTER",
        ),
    ],
)
def test_an_invalid_shared_value_is_an_error_naming_the_variable(environ, variable):
    with pytest.raises(SettingsError, match=rf"^{variable}\b"):
        load_settings(environ)
