"""worker/admission.py on raw queue items, as SECURITY.md's Admission row states its rules: a canonical
forecast envelope is admitted and rebuilt; anything a forecast does not need is refused with its reason."""

import base64
import json
import time

import pytest

from worker.admission import MAX_BODY_DEPTH, Gate, Refused, admit, max_message_bytes

QUEUE = "kronos.kronos-small.reports"
GATE = Gate(producer="reports", max_message_bytes=max_message_bytes(10_000), max_delay_seconds=600, max_retries=3)
REQUEST = {"series_id": "AAPL", "model": "kronos-small", "pred_len": 4, "candles": {"close": [1.0, 2.0]}}


def body(document) -> str:
    return base64.b64encode(json.dumps(document).encode()).decode()


def envelope(job_id: str = "reports:job-1", **headers) -> dict:
    """A forecast as Celery (protocol 2) and kombu's Redis transport push it."""
    return {
        "body": body([[REQUEST], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": "kronos.forecast",
            "id": job_id,
            "root_id": job_id,
            "retries": 0,
            "timelimit": [None, None],
            "argsrepr": "...",
            "kwargsrepr": "{}",
            **headers,
        },
        "properties": {
            "correlation_id": job_id,
            "delivery_mode": 2,
            "priority": 5,
            "body_encoding": "base64",
            "delivery_tag": "tag-1",
            "delivery_info": {"exchange": "", "routing_key": QUEUE},
        },
    }


def refused(raw: bytes | str) -> Refused:
    with pytest.raises(Refused) as refusal:
        admit(raw, QUEUE, 5, GATE)
    return refusal.value


def test_a_canonical_forecast_is_admitted_as_a_message_the_worker_builds():
    admitted = admit(json.dumps(envelope(kronos_sent_at=time.time())), QUEUE, 3, GATE)
    headers = admitted["headers"]
    assert (headers["task"], headers["id"], headers["root_id"]) == ("kronos.forecast", "reports:job-1", "reports:job-1")
    assert headers["ignore_result"] is True and headers["group"] is None
    assert admitted["properties"]["priority"] == 3  # the list it was popped from
    assert admitted["properties"]["delivery_info"] == {"exchange": QUEUE, "routing_key": QUEUE}
    [[request], kwargs, embed] = json.loads(base64.b64decode(admitted["body"]))
    assert request == REQUEST and kwargs == {} and not any(embed.values())


def test_the_request_may_come_as_the_request_keyword():
    item = envelope()
    item["body"] = body([[], {"request": REQUEST}, {}])
    [[request], _, _] = json.loads(base64.b64decode(admit(json.dumps(item), QUEUE, 5, GATE)["body"]))
    assert request == REQUEST


def test_a_dict_body_with_callbacks_is_refused():
    item = envelope()
    item["body"] = body({"args": [REQUEST], "kwargs": {}, "callbacks": [{"task": "celery.map"}]})
    assert "[args, kwargs, embed]" in refused(json.dumps(item)).reason


def test_follow_up_work_in_the_options_is_refused_naming_it():
    item = envelope()
    item["body"] = body([[REQUEST], {}, {"chain": [{"task": "kronos.forecast"}]}])
    assert "follow-up work (chain)" in refused(json.dumps(item)).reason


@pytest.mark.parametrize("stray", ["!", "\n", " ", "=="])
def test_base64_with_a_stray_character_is_refused(stray):
    item = envelope()
    item["body"] = item["body"][:8] + stray + item["body"][8:]
    assert "strict base64" in refused(json.dumps(item)).reason


def test_a_body_nested_deeper_than_its_limit_is_refused():
    deep = REQUEST | {"candles": {"close": [[[[[1.0]]]]]}}
    item = envelope()
    item["body"] = body([[deep], {}, {}])
    assert f"nests deeper than {MAX_BODY_DEPTH} levels" in refused(json.dumps(item)).reason


def test_an_envelope_nested_too_deep_or_holding_nan_is_not_strict_enough():
    nested = json.dumps(envelope()).replace('"argsrepr": "..."', '"argsrepr": [[[[["x"]]]]]')
    assert "nests deeper" in refused(nested).reason
    nan = json.dumps(envelope()).replace('"retries": 0', '"retries": 0, "kronos_sent_at": NaN')
    reason = refused(nan)
    assert "not strict JSON" in reason.reason and reason.job_id is None  # not parsed: no id to answer under


def test_a_repeated_key_is_refused_so_no_two_readers_see_different_messages():
    raw = json.dumps(envelope()).replace(
        '"task": "kronos.forecast"', '"task": "kronos.forecast", "task": "celery.chain"'
    )
    assert "repeats a key" in refused(raw).reason


def test_a_retry_count_beyond_the_workers_retries_is_refused_and_one_within_them_kept():
    assert "more than KRONOS_MAX_RETRIES" in refused(json.dumps(envelope(retries=4))).reason
    assert admit(json.dumps(envelope(retries=3)), QUEUE, 5, GATE)["headers"]["retries"] == 3


@pytest.mark.parametrize(
    ("job_id", "reason"),
    [
        ("reports:job\n1", "is not a job id"),
        ("reports:" + "x" * 121, "is not a job id"),  # 129 characters
        ("backfill:job-1", "outside producer reports's namespace"),
        ("reports:", "outside producer reports's namespace"),
    ],
)
def test_a_task_id_that_is_not_a_job_id_of_this_producer_is_refused(job_id, reason):
    refusal = refused(json.dumps(envelope(job_id)))
    assert reason in refusal.reason and refusal.job_id is None  # never answered under someone else's id


def test_a_refusal_of_the_producers_own_job_names_the_job():
    refusal = refused(json.dumps(envelope(chord={"task": "x"})))
    assert "headers.chord" in refusal.reason and refusal.job_id == "reports:job-1"


def test_an_oversized_item_is_refused_before_it_is_decoded():
    oversized = b"{" * (GATE.max_message_bytes + 1)  # not even JSON: never looked at
    assert "more than the limit" in refused(oversized).reason
    assert max_message_bytes(10_000) == 2 * 10_000 + 64 * 1024


def test_a_built_in_celery_task_is_refused():
    item = envelope()
    item["headers"]["task"] = "celery.group"
    assert "is not kronos.forecast" in refused(json.dumps(item)).reason


def test_an_implausible_sent_at_is_dropped_not_trusted():
    admitted = admit(json.dumps(envelope(kronos_sent_at=time.time() + 10 * 86400)), QUEUE, 5, GATE)
    assert admitted["headers"]["kronos_sent_at"] is None
