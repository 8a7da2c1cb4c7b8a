"""Settings from KRONOS_* variables and the Celery configuration built from them (their documentation:
tests/unit/test_settings_doc.py)."""

from pathlib import Path

import pytest
from celery import Celery
from celery.app.defaults import DEFAULTS
from celeryconfig_env import celery_config

from tasks.routing import (
    DEFAULT_PRIORITY,
    FORECAST_TASK,
    ForecastRouter,
    forecast_queues,
    queue_for_model,
)
from tasks.settings import DEFAULT_MODELS, SettingsError, load_settings

REPO_ROOT = Path(__file__).resolve().parents[2]
# Read by celery/backends/redis.py although celery.app.defaults does not list it.
UNLISTED_CELERY_SETTINGS = {"redis_backend_health_check_interval"}


# --- settings ---------------------------------------------------------------------------------------


def test_defaults() -> None:
    settings = load_settings({})
    assert settings.broker_url == "redis://localhost:6379/0"
    assert settings.result_backend == "redis://localhost:6379/1"
    assert settings.result_expires == 86400
    assert settings.max_job_seconds == 600
    assert settings.visibility_timeout == 2 * 600 + 60
    assert settings.prefetch_multiplier == 1
    assert settings.queue_prefix == "kronos"
    assert settings.models == ("kronos-small", "kronos-base", "kronos-mini") == DEFAULT_MODELS
    assert settings.default_model == "kronos-small"
    assert settings.unacked_restore_interval == 10
    assert settings.socket_timeout == 30.0
    assert settings.socket_connect_timeout == 5.0
    assert settings.health_check_interval == 25


def test_overrides() -> None:
    settings = load_settings(
        {
            "KRONOS_BROKER_URL": "redis://:s3cret@redis.internal:6380/4",
            "KRONOS_RESULT_BACKEND": "redis://results.internal:6379/2",
            "KRONOS_RESULT_EXPIRES": "3600",
            "KRONOS_MAX_JOB_SECONDS": "120",
            "KRONOS_VISIBILITY_TIMEOUT": "120",
            "KRONOS_PREFETCH_MULTIPLIER": "4",
            "KRONOS_QUEUE_PREFIX": "staging.kronos",
            "KRONOS_MODELS": " kronos-base , kronos-large ",
            "KRONOS_DEFAULT_MODEL": "kronos-large",
            "KRONOS_UNACKED_RESTORE_INTERVAL": "2",
            "KRONOS_SOCKET_TIMEOUT": "7.5",
            "KRONOS_SOCKET_CONNECT_TIMEOUT": "0.5",
            "KRONOS_HEALTH_CHECK_INTERVAL": "5",
        }
    )
    assert settings.broker_url == "redis://:s3cret@redis.internal:6380/4"
    assert settings.result_backend == "redis://results.internal:6379/2"
    assert settings.result_expires == 3600
    assert (settings.max_job_seconds, settings.visibility_timeout) == (120, 120)
    assert settings.prefetch_multiplier == 4
    assert settings.queue_prefix == "staging.kronos"
    assert settings.models == ("kronos-base", "kronos-large")
    assert settings.default_model == "kronos-large"
    assert settings.unacked_restore_interval == 2
    assert (settings.socket_timeout, settings.socket_connect_timeout) == (7.5, 0.5)
    assert settings.health_check_interval == 5


def test_visibility_timeout_default_follows_max_job_seconds() -> None:
    assert load_settings({"KRONOS_MAX_JOB_SECONDS": "30"}).visibility_timeout == 120


def test_blank_variable_means_default() -> None:
    assert load_settings({"KRONOS_MAX_JOB_SECONDS": "  ", "KRONOS_MODELS": ""}) == load_settings({})


@pytest.mark.parametrize(
    ("broker_url", "result_backend"),
    [
        ("redis://:pw@host:6380/0", "redis://:pw@host:6380/1"),
        ("redis://host", "redis://host/1"),
        ("rediss://host:6380/3?ssl_cert_reqs=required", "rediss://host:6380/1?ssl_cert_reqs=required"),
    ],
)
def test_result_backend_defaults_to_db_1_of_the_broker(broker_url: str, result_backend: str) -> None:
    assert load_settings({"KRONOS_BROKER_URL": broker_url}).result_backend == result_backend


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("KRONOS_BROKER_URL", "amqp://guest@rabbit//"),
        ("KRONOS_RESULT_BACKEND", "db+postgresql://x/y"),
        ("KRONOS_RESULT_EXPIRES", "1d"),
        ("KRONOS_RESULT_EXPIRES", "0"),
        ("KRONOS_MAX_JOB_SECONDS", "-5"),
        ("KRONOS_MAX_JOB_SECONDS", "1.5"),
        ("KRONOS_VISIBILITY_TIMEOUT", "ten"),
        ("KRONOS_PREFETCH_MULTIPLIER", "0"),
        ("KRONOS_QUEUE_PREFIX", "kronos jobs"),
        ("KRONOS_MODELS", "kronos-small,,kronos-base"),
        ("KRONOS_MODELS", "kronos-small,kronos-small"),
        ("KRONOS_DEFAULT_MODEL", "kronos-huge"),
        ("KRONOS_UNACKED_RESTORE_INTERVAL", "0"),
        ("KRONOS_SOCKET_TIMEOUT", "0"),
        ("KRONOS_SOCKET_TIMEOUT", "inf"),
        ("KRONOS_SOCKET_CONNECT_TIMEOUT", "soon"),
        ("KRONOS_HEALTH_CHECK_INTERVAL", "2.5"),
    ],
)
def test_invalid_value_is_an_error_naming_the_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        load_settings({variable: value})


def test_bad_url_error_does_not_echo_the_password() -> None:
    with pytest.raises(SettingsError, match="KRONOS_BROKER_URL") as error:
        load_settings({"KRONOS_BROKER_URL": "amqp://admin:hunter2@rabbit//"})
    assert "hunter2" not in str(error.value)


def test_visibility_timeout_below_max_job_seconds_is_rejected() -> None:
    with pytest.raises(SettingsError, match=r"KRONOS_VISIBILITY_TIMEOUT.*KRONOS_MAX_JOB_SECONDS"):
        load_settings({"KRONOS_MAX_JOB_SECONDS": "600", "KRONOS_VISIBILITY_TIMEOUT": "599"})
    assert load_settings({"KRONOS_MAX_JOB_SECONDS": "600", "KRONOS_VISIBILITY_TIMEOUT": "600"})


# --- celeryconfig -----------------------------------------------------------------------------------


def test_celeryconfig_names_only_real_celery_settings() -> None:
    # A misspelt setting name would be ignored by Celery without a word.
    config = celery_config({})
    assert set(config) - set(DEFAULTS) == UNLISTED_CELERY_SETTINGS


def test_celeryconfig_accepts_json_only() -> None:
    config = celery_config({})
    assert config["task_serializer"] == config["result_serializer"] == "json"
    assert config["accept_content"] == config["result_accept_content"] == ["json"]


def test_celeryconfig_reliability_settings() -> None:
    config = celery_config({"KRONOS_MAX_JOB_SECONDS": "300", "KRONOS_PREFETCH_MULTIPLIER": "2"})
    for name in [
        "task_acks_late",
        "task_acks_on_failure",
        "task_acks_on_timeout",
        "task_reject_on_worker_lost",
        "task_retry_on_worker_lost",
        "task_track_started",
        "task_send_sent_event",
        "worker_send_task_events",
        "result_backend_always_retry",
        "broker_connection_retry_on_startup",
        "worker_cancel_long_running_tasks_on_connection_loss",
    ]:
        assert config[name] is True, name
    # results never copy the request's arguments; redelivered jobs are deduplicated by claims, not by Celery
    assert config["result_extended"] is False
    assert "worker_deduplicate_successful_tasks" not in config
    assert config["task_create_missing_queues"] is False
    assert 0 < config["result_backend_max_retries"] < float("inf")
    assert config["task_time_limit"] == 300
    assert config["worker_prefetch_multiplier"] == 2
    assert config["result_expires"] == 86400


def test_celeryconfig_transport_options() -> None:
    config = celery_config(
        {"KRONOS_VISIBILITY_TIMEOUT": "900", "KRONOS_SOCKET_TIMEOUT": "12", "KRONOS_HEALTH_CHECK_INTERVAL": "7"},
    )
    options = config["broker_transport_options"]
    assert options["visibility_timeout"] == 900
    assert options["unacked_restore_interval"] == 10
    assert options["unacked_restore_throttle"] == 1
    assert options["priority_steps"] == list(range(10))
    assert options["queue_order_strategy"] == "round_robin"
    assert (options["socket_timeout"], options["socket_connect_timeout"]) == (12.0, 5.0)
    assert options["health_check_interval"] == 7
    assert (config["redis_socket_timeout"], config["redis_backend_health_check_interval"]) == (12.0, 7)
    assert config["result_backend_transport_options"]["retry_policy"]["max_retries"] == 5


def test_result_backend_connections_get_the_socket_timeouts() -> None:
    app = Celery("kronos-config-test", set_as_current=False)
    app.config_from_object(celery_config({"KRONOS_SOCKET_TIMEOUT": "12"}))
    params = app.backend.connparams
    assert (params["socket_timeout"], params["socket_connect_timeout"]) == (12.0, 5.0)
    assert (params["socket_keepalive"], params["health_check_interval"]) == (True, 25)
    assert params["db"] == 1


def test_each_model_is_routed_to_its_own_queue() -> None:
    config = celery_config({"KRONOS_MODELS": "kronos-small,kronos-base,kronos-mini,custom-1"})
    assert [queue.name for queue in config["task_queues"]] == [
        "kronos.kronos-small",
        "kronos.kronos-base",
        "kronos.kronos-mini",
        "kronos.custom-1",
    ]
    app = Celery("kronos-routing-test", set_as_current=False)
    app.config_from_object(config)
    router = app.amqp.router
    for model in ["kronos-small", "kronos-base", "kronos-mini", "custom-1"]:
        route = router.route({}, FORECAST_TASK, kwargs={"model": model})
        assert route["queue"].name == f"kronos.{model}"
        assert route["priority"] == DEFAULT_PRIORITY
    assert router.route({}, FORECAST_TASK, kwargs={})["queue"].name == "kronos.kronos-small"
    job_document = {"model": "kronos-mini", "series_id": "BTCUSDT"}
    assert router.route({}, FORECAST_TASK, args=[job_document])["queue"].name == "kronos.kronos-mini"
    assert config["task_default_queue"] == "kronos.kronos-small"


def test_producer_options_override_the_route() -> None:
    app = Celery("kronos-routing-test", set_as_current=False)
    app.config_from_object(celery_config({}))
    route = app.amqp.router.route({"priority": 0}, FORECAST_TASK, kwargs={"model": "kronos-base"})
    assert (route["queue"].name, route["priority"]) == ("kronos.kronos-base", 0)


def test_unknown_model_is_refused_before_sending() -> None:
    app = Celery("kronos-routing-test", set_as_current=False)
    app.config_from_object(celery_config({}))
    with pytest.raises(ValueError, match=r"kronos-huge.*kronos-small, kronos-base, kronos-mini"):
        app.amqp.router.route({}, FORECAST_TASK, kwargs={"model": "kronos-huge"})


def test_queue_for_model() -> None:
    settings = load_settings({"KRONOS_QUEUE_PREFIX": "prod"})
    assert queue_for_model("kronos-base", settings) == "prod.kronos-base"
    with pytest.raises(ValueError, match=r"unknown model 'nope'.*kronos-small, kronos-base, kronos-mini"):
        queue_for_model("nope", settings)


def test_router_leaves_other_tasks_to_the_default_queue() -> None:
    router = ForecastRouter(load_settings({}))
    assert router("celery.chord_unlock", (), {}, {}) is None


def test_forecast_queues_are_direct_queues_named_by_model() -> None:
    settings = load_settings({}).model_copy(update={"models": ("a",), "default_model": "a"})
    (queue,) = forecast_queues(settings)
    assert (queue.name, queue.exchange.name, queue.exchange.type, queue.routing_key) == (
        "kronos.a",
        "kronos.a",
        "direct",
        "kronos.a",
    )


def test_app_is_configured_from_celeryconfig() -> None:
    from tasks import app
    from tasks.app import app as same_app

    assert app is same_app
    assert app.main == "kronos"
    assert app.conf.task_acks_late is True
    assert app.conf.accept_content == ["json"]
    assert FORECAST_TASK not in app.tasks  # the worker package registers the body
