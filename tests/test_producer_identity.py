"""Producer identities without Redis: queue names, job id namespaces, settings, and what a worker admits."""

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest

from tasks.routing import (
    FORECAST_TASK,
    default_queue,
    forecast_queues,
    producer_job_id,
    queue_for_model,
    serving_queues,
)
from tasks.settings import SettingsError, load_settings
from worker.admission import refusal
from worker.settings import load_worker_settings

DEPLOYMENT = {"KRONOS_MODELS": "kronos-small,kronos-base", "KRONOS_PRODUCERS": "reports,backfill"}


def settings(**extra: str):
    return load_settings({**DEPLOYMENT, **extra})


def test_each_producer_has_its_own_queue_per_model():
    worker = settings()
    assert serving_queues("kronos-small", worker) == {
        "kronos.kronos-small.reports": "reports",
        "kronos.kronos-small.backfill": "backfill",
    }
    assert [queue.name for queue in forecast_queues(worker)] == [
        "kronos.kronos-small.reports",
        "kronos.kronos-small.backfill",
        "kronos.kronos-base.reports",
        "kronos.kronos-base.backfill",
    ]
    producer = settings(KRONOS_PRODUCER="reports")
    assert queue_for_model("kronos-base", producer) == "kronos.kronos-base.reports"
    assert default_queue(producer) == "kronos.kronos-small.reports"
    with pytest.raises(ValueError, match="set KRONOS_PRODUCER"):
        queue_for_model("kronos-small", worker)


def test_without_producers_there_is_one_shared_queue_per_model():
    shared = load_settings({"KRONOS_MODELS": "kronos-small"})
    assert serving_queues("kronos-small", shared) == {"kronos.kronos-small": None}
    assert queue_for_model("kronos-small", shared) == "kronos.kronos-small"
    assert producer_job_id("abc", None) == "abc"


def test_job_ids_are_put_in_the_producers_namespace_once():
    assert producer_job_id("abc", "reports") == "reports:abc"
    assert producer_job_id("reports:abc", "reports") == "reports:abc"
    assert producer_job_id(None, "reports").startswith("reports:")
    assert producer_job_id("backfill:abc", "reports") == "reports:backfill:abc"  # never someone else's id


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("KRONOS_PRODUCERS", "reports,a.b", "no dots"),
        ("KRONOS_PRODUCERS", "reports,reports", "twice"),
        ("KRONOS_PRODUCER", "team:x", "no dots"),
        ("KRONOS_PRODUCER", "x" * 65, "no dots"),
    ],
)
def test_bad_producer_names_are_refused(variable, value, message):
    with pytest.raises(SettingsError, match=message):
        load_settings({**DEPLOYMENT, variable: value})


def test_quota_settings():
    quotas = load_worker_settings({"KRONOS_PRODUCER_QUOTAS": "reports=600, backfill=0"}).quotas
    assert (quotas.limit_of("reports"), quotas.limit_of("backfill"), quotas.limit_of("other")) == (600, 0, 100)
    assert quotas.mode == "reject" and quotas.max_wait == 300
    for bad in ({"KRONOS_PRODUCER_QUOTAS": "reports:600"}, {"KRONOS_PRODUCER_QUOTAS": "reports=-1"}):
        with pytest.raises(SettingsError, match="producer=jobs_per_minute"):
            load_worker_settings(bad)
    with pytest.raises(SettingsError, match="reject, wait"):
        load_worker_settings({"KRONOS_QUOTA_MODE": "drop"})


def test_the_quota_wait_must_end_before_the_visibility_timeout(monkeypatch):
    monkeypatch.setenv("KRONOS_VISIBILITY_TIMEOUT", "600")
    monkeypatch.setenv("KRONOS_QUOTA_MAX_WAIT", "600")
    from tasks.settings import current_settings

    current_settings.cache_clear()
    try:
        with pytest.raises(SettingsError, match="KRONOS_QUOTA_MAX_WAIT"):
            load_worker_settings()
    finally:
        current_settings.cache_clear()


def message(task_id="reports:1", *, task=FORECAST_TASK, embed=None, eta=None, encoding="base64", **headers):
    body = json.dumps([[{"series_id": "s"}], {}, embed or {"callbacks": None, "chain": None}])
    return {
        "body": base64.b64encode(body.encode()).decode() if encoding == "base64" else body,
        "content-type": "application/json",
        "headers": {"task": task, "id": task_id, "eta": eta, **headers},
        "properties": {"body_encoding": encoding, "delivery_tag": "t", "delivery_info": {}},
    }


def test_a_producers_own_forecast_is_admitted():
    assert refusal(message(), "reports", 600) is None
    assert refusal(message("anything"), None, 600) is None  # shared queues have no namespaces
    soon = (datetime.now(UTC) + timedelta(seconds=30)).isoformat()
    assert refusal(message(eta=soon), "reports", 600) is None


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (message("backfill:1"), "outside producer reports's namespace"),
        (message("reports:"), "outside producer reports's namespace"),
        (message(None), "outside producer reports's namespace"),
        (message(task="celery.chain"), "is not kronos.forecast"),
        (message(task=None), "is not kronos.forecast"),  # Celery's protocol 1
        (message(embed={"callbacks": [{"task": "celery.map"}]}), "follow-up work (callbacks)"),
        (message(embed={"chain": [{"task": "x"}]}, encoding="utf-8"), "follow-up work (chain)"),
        (message(embed={"errbacks": [{"task": "x"}]}), "follow-up work (errbacks)"),
        (message(group="g1"), "'group' header"),
        (message(chord={"task": "x"}), "'chord' header"),
        (message(eta=(datetime.now(UTC) + timedelta(hours=2)).isoformat()), "more than the visibility timeout"),
        (message(eta="tomorrow"), "not an ISO 8601 time"),
    ],
)
def test_a_message_asking_for_more_than_its_forecast_is_refused(bad, reason):
    assert reason in refusal(bad, "reports", 600)
