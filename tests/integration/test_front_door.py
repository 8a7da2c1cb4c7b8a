"""The front door: what a producer can push straight onto its own queue, against a real redis-server started
with the generated ACL file and a real worker serving producers alpha, beta and gamma.

One test per way a hostile producer once turned the worker against the ACLs or stopped it (dict bodies,
lenient base64, a forged retry count, crash-loop bodies, huge items, non-finite numbers and odd ids, a horizon
beyond the model's context), then thousands of generated hostile items: none runs, none crashes the worker,
each is refused (poison list) or answered INVALID_INPUT, and valid jobs are served alongside at normal speed.
"""

import base64
import json
import time
import uuid
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_security_acl import (  # noqa: F401 - module fixtures: one server and one worker for this module
    MAX_PAYLOAD_BYTES,
    MODEL,
    acl_env,
    acl_file,
    admin,
    admin_results,
    clients,
    connect,
    metrics_port,
    queue_of,
    redis_7,
    sample,
    scrape,
    secrets,
    served_env,
    server,
    wait_for,
    window,
)

from schemas import ErrorCode, ForecastRequest, JobFailed
from tasks.keys import DELAYED_KEY
from worker.transport import POISON_KEY

MAX_CONTEXT = 64  # short, so that a horizon beyond it is within KRONOS_MAX_PRED_LEN


@pytest.fixture(scope="module")
def env(server, secrets, acl_env, metrics_port, admin):
    return served_env(server, secrets, acl_env, metrics_port, KRONOS_PRODUCER_QUOTAS="gamma=3",
                      KRONOS_MAX_CONTEXT=str(MAX_CONTEXT))  # fmt: skip


def request_document(series_id: str = "hostile", pred_len: int = 4, start: int = 300) -> dict:
    return ForecastRequest.from_frame(window(32, start=start), pred_len=pred_len, series_id=series_id).model_dump(
        mode="json"
    )


def raw_envelope(job_id: str, body_text: str, *, headers: dict | None = None, body_b64: str | None = None) -> dict:
    return {
        "body": body_b64 if body_b64 is not None else base64.b64encode(body_text.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": "kronos.forecast", "id": job_id, "retries": 0, **(headers or {})},
        "properties": {
            "correlation_id": job_id,
            "delivery_mode": 2,
            "delivery_info": {"exchange": queue_of("alpha"), "routing_key": queue_of("alpha")},
            "priority": 5,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }


def push(server, secrets, producer: str, *items: str | bytes) -> None:
    with connect(server, secrets, producer) as client:
        client.lpush(f"{queue_of(producer)}\x06\x165", *items)


def engine_runs(metrics_port: int) -> float:
    return sample(scrape(metrics_port), "kronos_batch_size_sum", model=MODEL)


def alive_and_serving(clients, worker) -> None:
    assert worker.process.poll() is None, worker.log()[-2000:]
    job = clients["alpha"].submit(window(start=100), pred_len=4, series_id="still-served")
    assert len(job.wait(timeout=60).forecast["close"]) == 4


def beta_plant(callbacks_to: str) -> list:
    """Follow-up work that would run a forecast under one of beta's job ids."""
    return [
        {
            "task": "kronos.forecast",
            "args": [request_document("planted")],
            "kwargs": {},
            "options": {"queue": queue_of("beta"), "task_id": callbacks_to},
            "subtask_type": None,
            "immutable": True,
        }
    ]


def test_a_dict_body_cannot_smuggle_follow_up_work(server, secrets, clients, admin_results, worker):
    target = f"beta:daily-report-{uuid.uuid4().hex[:6]}"
    body = {"args": [request_document()], "kwargs": {}, "callbacks": beta_plant(target), "eta": None}
    push(server, secrets, "alpha", json.dumps(raw_envelope(f"alpha:{uuid.uuid4()}", json.dumps(body))))
    alive_and_serving(clients, worker)
    time.sleep(1)
    assert not admin_results.exists(f"celery-task-meta-{target}"), "alpha planted a result under beta's id"


def test_a_stray_character_in_the_base64_body_is_refused(server, secrets, clients, admin_results, worker):
    target = f"beta:daily-report-{uuid.uuid4().hex[:6]}"
    body = [[request_document()], {}, {"callbacks": beta_plant(target), "errbacks": None, "chain": None, "chord": None}]
    encoded = base64.b64encode(json.dumps(body).encode()).decode()
    job_id = f"alpha:{uuid.uuid4()}"
    push(server, secrets, "alpha", json.dumps(raw_envelope(job_id, "", body_b64=encoded[:40] + "!" + encoded[40:])))
    alive_and_serving(clients, worker)
    time.sleep(1)
    assert not admin_results.exists(f"celery-task-meta-{target}"), "alpha planted a result under beta's id"
    with pytest.raises(JobFailed) as failure:
        clients["alpha"].job(job_id).wait(timeout=10)
    assert failure.value.error.code == ErrorCode.INVALID_INPUT


def test_a_retry_count_written_by_a_producer_does_not_skip_its_quota(clients, metrics_port):
    gamma = clients["gamma"]
    handles = [
        gamma.app.send_task(
            "kronos.forecast",
            args=[request_document(f"g{i}", start=10 * i)],
            task_id=f"gamma:retry-{uuid.uuid4()}",
            queue=queue_of("gamma"),
            retries=1,
        )
        for i in range(8)
    ]
    outcomes = []
    for handle in handles:
        wait_for(lambda handle=handle: gamma._is_known(handle.id), what="an answer")
        try:
            gamma.job(handle.id).wait(timeout=60)
            outcomes.append("ok")
        except JobFailed as failure:
            outcomes.append(failure.error.code)
    # charged whatever the message says (or refused outright where KRONOS_MAX_RETRIES allows no retry)
    assert outcomes.count("ok") <= 3, outcomes
    assert set(outcomes) - {"ok"} <= {ErrorCode.RATE_LIMITED, ErrorCode.INVALID_INPUT}, outcomes


def test_bodies_that_crashed_the_worker_are_refused_and_it_keeps_serving(server, secrets, clients, admin, worker):
    pid = worker.process.pid
    deep = "[" * 100_000 + "]" * 100_000
    items = [
        json.dumps(raw_envelope(f"alpha:{uuid.uuid4()}", json.dumps({"args": [], "kwargs": {}}))),
        json.dumps(raw_envelope(f"alpha:{uuid.uuid4()}", deep)),
        json.dumps(raw_envelope(f"alpha:{uuid.uuid4()}", "x", headers={"argsrepr": None})).replace(
            '"argsrepr": null', '"argsrepr": ' + deep
        ),
    ]
    before = admin.llen(POISON_KEY)
    for _ in range(3):  # a restarted worker would meet them again: they must be gone, not requeued
        push(server, secrets, "alpha", *items)
        alive_and_serving(clients, worker)
    assert worker.process.pid == pid and worker.process.poll() is None
    wait_for(lambda: admin.llen(POISON_KEY) >= before + 9, what="every item in the poison list")
    wait_for(lambda: admin.hlen("unacked") == 0, what="no item left unacknowledged")


def test_a_huge_item_is_never_decoded_whole(server, secrets, clients, admin, worker):
    rss_before = rss_kib(worker.process.pid)
    huge_field = raw_envelope(f"alpha:{uuid.uuid4()}", json.dumps([[request_document()], {}, {}]))
    huge_field["properties"]["delivery_info"]["padding"] = list(range(3_000_000))  # about 23 MB
    item = json.dumps(huge_field)
    assert len(item) > 20_000_000
    push(server, secrets, "alpha", item)
    alive_and_serving(clients, worker)
    wait_for(lambda: admin.llen(f"{queue_of('alpha')}\x06\x165") == 0, what="the item to be taken")
    assert len(admin.lindex(POISON_KEY, 0) or "") <= 4096
    assert rss_kib(worker.process.pid) - rss_before < 50 * 1024


def test_an_item_reusing_a_delivery_tag_in_flight_cannot_replace_its_record(server, secrets, clients, admin, worker):
    """The unacknowledged record is what brings a job back after a worker dies: a producer that learns another's
    delivery tag must not be able to overwrite it (and the ack of its own message then delete it)."""
    tag = str(uuid.uuid4())
    record = json.dumps([{"properties": {"delivery_tag": tag}}, queue_of("beta"), queue_of("beta")])
    admin.hset("unacked", tag, record)
    try:
        envelope = raw_envelope(f"alpha:{uuid.uuid4()}", json.dumps([[request_document()], {}, {}]))
        envelope["properties"]["delivery_tag"] = tag
        before = admin.llen(POISON_KEY)
        push(server, secrets, "alpha", json.dumps(envelope))
        wait_for(lambda: admin.llen(f"{queue_of('alpha')}\x06\x165") == 0, what="the item to be taken")
        alive_and_serving(clients, worker)
        stored = admin.hget("unacked", tag)
        assert (stored.decode() if isinstance(stored, bytes) else stored) == record
        assert admin.llen(POISON_KEY) == before + 1
    finally:
        admin.hdel("unacked", tag)


def in_seconds(seconds: float) -> str:
    return datetime.fromtimestamp(time.time() + seconds, UTC).isoformat()


def test_jobs_with_an_eta_wait_in_redis_not_in_the_worker(server, secrets, clients, admin, worker, metrics_port):
    """Delayed jobs cost the worker nothing however many a producer sends: they wait in Redis's delayed set."""
    rss_before = rss_kib(worker.process.pid)
    padding = "x" * (MAX_PAYLOAD_BYTES * 2)  # within the byte cap; the request is refused only when it runs
    body = json.dumps([[{"series_id": padding}], {}, {}])
    items = [
        json.dumps(raw_envelope(f"alpha:held-{i}-{uuid.uuid4()}", body, headers={"eta": in_seconds(600)}))
        for i in range(250)
    ]
    assert sum(map(len, items)) > 50_000_000
    try:
        push(server, secrets, "alpha", *items)
        wait_for(lambda: admin.zcard(DELAYED_KEY) == len(items), timeout=60, what="every delayed job parked")
        assert admin.llen(f"{queue_of('alpha')}\x06\x165") == 0 and admin.hlen("unacked") == 0
        alive_and_serving(clients, worker)
        assert rss_kib(worker.process.pid) - rss_before < 30 * 1024
        gauge = [line for line in scrape(metrics_port).splitlines() if line.startswith("kronos_delayed_jobs ")]
        assert gauge and float(gauge[0].split()[1]) == len(items), gauge
    finally:
        admin.delete(DELAYED_KEY)


def test_a_delayed_job_runs_when_due_and_not_before(server, secrets, admin, admin_results, worker):
    job_id = f"alpha:later-{uuid.uuid4()}"
    due = time.time() + 4
    body = json.dumps([[request_document("later")], {}, {}])
    push(server, secrets, "alpha", json.dumps(raw_envelope(job_id, body, headers={"eta": in_seconds(4)})))
    wait_for(lambda: admin.zcard(DELAYED_KEY) == 1, what="the job parked")
    key = f"celery-task-meta-{job_id}"
    wait_for(lambda: json.loads(admin_results.get(key) or "{}").get("status") == "SUCCESS", timeout=60,
             what="the delayed job's answer")  # fmt: skip
    stored = json.loads(admin_results.get(key))
    assert len(stored["result"]["forecast"]["close"]) == 4
    assert datetime.fromisoformat(stored["date_done"]).timestamp() >= due, stored["date_done"]
    # the ack follows the stored answer by a moment
    wait_for(lambda: admin.hlen("unacked") == 0, what="the delayed job acknowledged")
    assert admin.zcard(DELAYED_KEY) == 0


def test_non_finite_numbers_and_odd_ids_end_as_refusals_not_internal_errors(
    server, secrets, clients, admin, admin_results, worker
):
    good_body = json.dumps([[request_document()], {}, {}])
    sent_at_nan = f"alpha:{uuid.uuid4()}"
    sent_at_minus_inf = f"alpha:{uuid.uuid4()}"
    items = [
        json.dumps(raw_envelope(sent_at_nan, good_body, headers={"kronos_sent_at": float("nan")})),
        json.dumps(raw_envelope(sent_at_minus_inf, good_body, headers={"kronos_sent_at": float("-inf")})),
        json.dumps(raw_envelope("alpha:with\nnewline", good_body)),
    ]
    push(server, secrets, "alpha", *items)
    alive_and_serving(clients, worker)
    time.sleep(1)
    for job_id in (sent_at_nan, sent_at_minus_inf):
        stored = admin_results.get(f"celery-task-meta-{job_id}")
        assert stored is None or json.loads(stored)["result"]["exc_message"][0]["code"] == "INVALID_INPUT"
    assert not admin_results.exists("celery-task-meta-alpha:with\nnewline")
    assert admin.llen("kronos:dead-letter") == 0


def test_a_horizon_beyond_the_context_fails_alone_and_its_batch_is_served(clients):
    long = clients["alpha"].submit(window(48, start=500), pred_len=MAX_CONTEXT + 16, series_id="too-long")
    others = [clients["beta"].submit(window(48, start=10 * i), pred_len=4) for i in range(4)]
    with pytest.raises(JobFailed) as failure:
        long.wait(timeout=60)
    assert failure.value.error.code == ErrorCode.INVALID_INPUT and "context" in failure.value.error.message
    assert all(len(job.wait(timeout=60).forecast["close"]) == 4 for job in others)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


# ---- thousands of generated hostile items ------------------------------------------------------------------

FOLLOW_UPS = st.sampled_from(["callbacks", "errbacks", "chain", "chord"])
JUNK_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)


def _nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


@st.composite
def hostile_item(draw) -> str:
    """A forecast envelope of alpha's with at least one thing a forecast must not have (or with a request that
    validation refuses)."""
    job_id = f"alpha:gen-{uuid.uuid4()}"
    request = request_document("generated")
    body = [[request], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]
    envelope = raw_envelope(job_id, json.dumps(body))
    kind = draw(
        st.sampled_from(
            [
                "dict-body",
                "list-length",
                "deep",
                "string-for-object",
                "base64",
                "huge-field",
                "non-finite",
                "unknown-header",
                "unknown-embed",
                "follow-up",
                "task",
                "foreign-id",
                "odd-id",
                "invalid-request",
                "not-json",
                "eta",
                "retries",
            ]
        )
    )
    text = None
    if kind == "dict-body":
        keys = draw(
            st.lists(
                st.sampled_from(["args", "kwargs", "callbacks", "errbacks", "chord", "eta", "task"]),
                min_size=1,
                unique=True,
            )
        )
        envelope["body"] = base64.b64encode(
            json.dumps({k: body[0] if k == "args" else {} for k in keys}).encode()
        ).decode()
    elif kind == "list-length":
        length = draw(st.integers(0, 7).filter(lambda n: n != 3))
        envelope["body"] = base64.b64encode(json.dumps((body * 3)[:length]).encode()).decode()
    elif kind == "deep":
        depth = draw(st.integers(8, 5000))
        where = draw(st.sampled_from(["body", "header", "property"]))
        text = json.dumps(envelope)
        if where == "body":
            envelope["body"] = base64.b64encode(f"[[{_nested(depth)}], {{}}, {{}}]".encode()).decode()
            text = json.dumps(envelope)
        elif where == "header":
            text = text.replace('"retries": 0', '"retries": 0, "argsrepr": ' + _nested(depth))
        else:
            text = text.replace('"priority": 5', '"priority": ' + _nested(depth))
    elif kind == "string-for-object":
        field = draw(st.sampled_from(["headers", "properties", "body"]))
        envelope[field] = draw(st.one_of(JUNK_TEXT, st.integers(), st.lists(st.integers(), max_size=3)))
        if field == "body" and isinstance(envelope[field], str):
            envelope[field] = envelope[field] + "{"  # never accidentally valid base64 of a body
    elif kind == "base64":
        position = draw(st.integers(0, len(envelope["body"])))
        stray = draw(st.sampled_from(list("!@#$%^&*~ \n-_.")))
        envelope["body"] = envelope["body"][:position] + stray + envelope["body"][position:]
    elif kind == "huge-field":
        size = draw(st.integers(100_000, 2_000_000))
        where = draw(st.sampled_from(["headers", "properties"]))
        envelope[where]["padding" if where == "headers" else "correlation_id"] = "x" * size
    elif kind == "non-finite":
        value = draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))
        field = draw(st.sampled_from(['"retries": 0', '"priority": 5', '"delivery_mode": 2']))
        text = json.dumps(envelope).replace(field, field.split(":")[0] + ": " + value)
    elif kind == "unknown-header":
        envelope["headers"][draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in KNOWN_HEADERS))] = 1
    elif kind == "unknown-embed":
        body[2][
            draw(
                st.text(min_size=1, max_size=12).filter(lambda k: k not in ("callbacks", "errbacks", "chain", "chord"))
            )
        ] = 1
        envelope["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    elif kind == "follow-up":
        body[2][draw(FOLLOW_UPS)] = [{"task": "celery.map", "args": []}]
        envelope["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    elif kind == "task":
        envelope["headers"]["task"] = draw(st.sampled_from(["celery.chain", "celery.group", "celery.map", None, ""]))
    elif kind == "foreign-id":
        envelope["headers"]["id"] = draw(st.sampled_from(["beta:", "gamma:"])) + str(uuid.uuid4())
    elif kind == "odd-id":
        envelope["headers"]["id"] = "alpha:" + draw(st.sampled_from(["a\nb", "a b", "", "é", "a/b", "x" * 200]))
    elif kind == "invalid-request":
        request["candles"]["close"][1] = draw(st.sampled_from([float("nan"), -1.0, 1e309]))
        envelope["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    elif kind == "not-json":
        text = draw(st.sampled_from(["", "{", "null", "[]", "42", '"x"', "\xff\xfe"])) + draw(JUNK_TEXT)
    elif kind == "eta":
        envelope["headers"]["eta"] = draw(st.sampled_from(["2099-01-01T00:00:00+00:00", "tomorrow", "1e9"]))
    elif kind == "retries":
        envelope["headers"]["retries"] = draw(st.sampled_from([-1, 10**6, "1", True, 1.5]))
    return text if text is not None else json.dumps(envelope)


KNOWN_HEADERS = {
    "lang",
    "task",
    "id",
    "shadow",
    "eta",
    "expires",
    "group",
    "group_index",
    "chord",
    "retries",
    "timelimit",
    "root_id",
    "parent_id",
    "argsrepr",
    "kwargsrepr",
    "origin",
    "ignore_result",
    "replaced_task_nesting",
    "stamped_headers",
    "stamps",
    "kronos_sent_at",
    "redelivered",
}
GENERATED_PER_EXAMPLE = 500
EXAMPLES = 10  # 5,000 items in all


def valid_job_seconds(clients, series_id: str) -> float:
    started = time.monotonic()
    job = clients["beta"].submit(window(start=len(series_id) * 7 % 400), pred_len=4, series_id=series_id)
    assert len(job.wait(timeout=60).forecast["close"]) == 4
    return time.monotonic() - started


def refusals_and_invalid(metrics_port: int) -> float:
    metrics = scrape(metrics_port)
    refused = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("kronos_messages_refused_total{")
    )
    return refused + sample(metrics, "kronos_jobs_total", state="failed", code="INVALID_INPUT")


@given(items=st.lists(hostile_item(), min_size=GENERATED_PER_EXAMPLE, max_size=GENERATED_PER_EXAMPLE))
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_generated_hostile_items_never_run_nor_stop_the_worker(
    server,
    secrets,
    clients,
    admin,
    worker,
    metrics_port,
    items,
):
    rss_before = rss_kib(worker.process.pid)
    baseline = valid_job_seconds(clients, "baseline")
    runs_before = engine_runs(metrics_port)
    answered_before = refusals_and_invalid(metrics_port)
    started = time.monotonic()
    between = []
    with connect(server, secrets, "alpha") as alpha:
        for index, item in enumerate(items):
            alpha.lpush(f"{queue_of('alpha')}\x06\x165", item)
            if index % 100 == 50:  # valid jobs in between are served all the same, at normal speed
                between.append(valid_job_seconds(clients, f"between-{index}"))
    assert sorted(between)[len(between) // 2] < 5 * baseline + 1.0, (baseline, between)
    wait_for(
        lambda: admin.llen(f"{queue_of('alpha')}\x06\x165") == 0 and admin.hlen("unacked") == 0,
        timeout=120,
        what="every generated item to be taken",
    )
    wait_for(
        lambda: refusals_and_invalid(metrics_port) - answered_before >= len(items),
        timeout=60,
        what="every item to be refused or answered INVALID_INPUT",
    )
    assert refusals_and_invalid(metrics_port) - answered_before == len(items)
    assert engine_runs(metrics_port) - runs_before == len(between), "only the valid jobs in between ran"
    assert worker.process.poll() is None
    assert rss_kib(worker.process.pid) - rss_before < 50 * 1024
    assert time.monotonic() - started < 120
