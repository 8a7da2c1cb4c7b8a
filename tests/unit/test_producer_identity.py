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
from worker.admission import Gate, Refused, admit
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


def refusal(envelope: dict, producer: str | None, max_delay: float) -> str | None:
    """Why admission refuses the envelope pushed onto `producer`'s queue, or None (it then builds a message)."""
    gate = Gate(producer=producer, max_message_bytes=100_000, max_delay_seconds=max_delay, max_retries=3)
    try:
        admitted = admit(json.dumps(envelope), "kronos.kronos-small.reports", 5, gate)
    except Refused as refused:
        return refused.reason
    assert admitted["headers"]["id"] == envelope["headers"]["id"]
    return None


def test_a_producers_own_forecast_is_admitted():
    assert refusal(message(), "reports", 600) is None
    assert refusal(message("anything"), None, 600) is None  # shared queues have no namespaces
    soon = (datetime.now(UTC) + timedelta(seconds=30)).isoformat()
    assert refusal(message(eta=soon), "reports", 600) is None


def test_the_admitted_message_is_built_from_the_allowed_fields_only():
    pushed = message(origin="host", retries=1)
    pushed["properties"]["delivery_info"] = {"exchange": "elsewhere", "routing_key": "elsewhere"}
    gate = Gate(producer="reports", max_message_bytes=100_000, max_delay_seconds=600, max_retries=3)
    admitted = admit(json.dumps(pushed), "kronos.kronos-small.reports", 7, gate)
    assert admitted["properties"]["delivery_info"] == {
        "exchange": "kronos.kronos-small.reports",
        "routing_key": "kronos.kronos-small.reports",
    }
    assert admitted["properties"]["priority"] == 7  # the list it was popped from, not what the sender wrote
    assert admitted["headers"]["ignore_result"] is True and admitted["headers"]["retries"] == 1
    body = json.loads(base64.b64decode(admitted["body"]))
    assert body == [[{"series_id": "s"}], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (message("backfill:1"), "outside producer reports's namespace"),
        (message("reports:"), "outside producer reports's namespace"),
        (message(None), "is not a job id"),
        (message("reports:a\nb"), "is not a job id"),
        (message(task="celery.chain"), "is not kronos.forecast"),
        (message(task=None), "is not kronos.forecast"),  # Celery's protocol 1
        (message(embed={"callbacks": [{"task": "celery.map"}]}), "follow-up work (callbacks)"),
        (message(embed={"chain": [{"task": "x"}]}, encoding="utf-8"), "body_encoding"),
        (message(embed={"errbacks": [{"task": "x"}]}), "follow-up work (errbacks)"),
        (message(group="g1"), "headers.group"),
        (message(chord={"task": "x"}), "headers.chord"),
        (message(eta=(datetime.now(UTC) + timedelta(hours=2)).isoformat()), "more than the visibility timeout"),
        (message(eta="tomorrow"), "not an ISO 8601 time"),
        (message(retries=4), "more than KRONOS_MAX_RETRIES"),
        (message(kronos_sent_at="now"), "headers.kronos_sent_at"),
        (message(surprise=1), "fields a forecast does not use"),
        (message(embed={"callbacks": None, "link": 1}), "fields a forecast does not use"),
    ],
)
def test_a_message_asking_for_more_than_its_forecast_is_refused(bad, reason):
    assert reason in refusal(bad, "reports", 600)


def test_a_dict_body_and_lenient_base64_are_refused():
    dict_body = message()
    dict_body["body"] = base64.b64encode(json.dumps({"args": [{}], "kwargs": {}, "callbacks": [1]}).encode()).decode()
    assert "[args, kwargs, embed]" in refusal(dict_body, "reports", 600)
    stray = message(embed={"callbacks": [{"task": "x"}]})
    stray["body"] = stray["body"][:10] + "!" + stray["body"][10:]
    assert "strict base64" in refusal(stray, "reports", 600)


def test_non_finite_numbers_and_deep_nesting_in_the_envelope_are_refused():
    nan = json.dumps(message()).replace('"eta": null', '"eta": null, "kronos_sent_at": NaN')
    gate = Gate(producer="reports", max_message_bytes=10_000_000, max_delay_seconds=600, max_retries=3)
    with pytest.raises(Refused, match="not strict JSON"):
        admit(nan, "q", 5, gate)
    deep = json.dumps(message()).replace('"eta": null', '"eta": null, "argsrepr": ' + "[" * 50_000 + "]" * 50_000)
    with pytest.raises(Refused):
        admit(deep, "q", 5, gate)


def test_a_message_kombu_restored_is_admitted_again():
    """After a connection loss or a warm shutdown kombu pushes a worker's held messages back, flagged as
    redelivered in three places: the same job, admitted as it was the first time."""
    gate = Gate(producer="reports", max_message_bytes=100_000, max_delay_seconds=600, max_retries=3)
    first = admit(json.dumps(message()), "kronos.kronos-small.reports", 5, gate)
    restored = json.loads(json.dumps(first))
    restored["redelivered"] = True
    restored["headers"]["redelivered"] = True
    restored["properties"]["delivery_info"]["redelivered"] = True
    again = admit(json.dumps(restored), "kronos.kronos-small.reports", 5, gate)
    assert again == first
