"""Per-producer token buckets (worker/quotas.py) against a real redis-server: its Lua and its clock."""

import time

import pytest

from worker.quotas import ADMITTED, REFUSED, RESERVED, ProducerQuotas, QuotaPolicy


@pytest.fixture
def client(redis_server, redis_url):
    with redis_server.client(decode_responses=True) as redis_client:
        yield redis_client


def quotas(client, per_minute=60, mode="reject", max_wait=300.0, **per_producer) -> ProducerQuotas:
    return ProducerQuotas(client, QuotaPolicy(per_minute, per_producer, mode, max_wait), reservation_ttl=60)


def test_a_producer_gets_a_minutes_worth_at_once_then_its_rate(client):
    bucket = quotas(client, per_minute=6)
    verdicts = [bucket.take("reports", f"reports:{i}") for i in range(8)]
    assert [v.outcome for v in verdicts] == [ADMITTED] * 6 + [REFUSED] * 2
    assert 9.0 < verdicts[6].wait <= 10.0  # 6 per minute: one token every 10 s
    assert verdicts[6].limit_per_minute == 6


def test_producers_have_separate_buckets_and_their_own_limits(client):
    bucket = quotas(client, per_minute=1, backfill=3, unlimited=0)
    assert bucket.take("reports", "reports:1").outcome == ADMITTED
    assert bucket.take("reports", "reports:2").outcome == REFUSED
    assert [bucket.take("backfill", f"backfill:{i}").outcome for i in range(4)] == [ADMITTED] * 3 + [REFUSED]
    assert all(bucket.take("unlimited", f"unlimited:{i}").outcome == ADMITTED for i in range(500))
    assert not client.exists("kronos:quota:unlimited")


def test_tokens_refill_with_time(client):
    bucket = quotas(client, per_minute=600)  # one every 0.1 s
    while bucket.take("reports", "reports:x").outcome == ADMITTED:
        pass
    time.sleep(0.35)
    assert [bucket.take("reports", f"reports:{i}").outcome for i in range(4)].count(ADMITTED) in (3, 4)


def test_in_wait_mode_each_job_reserves_its_own_slot_and_passes_when_it_returns(client):
    bucket = quotas(client, per_minute=6, mode="wait", max_wait=25)
    for i in range(6):
        assert bucket.take("reports", f"reports:{i}").outcome == ADMITTED
    first, second = bucket.take("reports", "reports:6"), bucket.take("reports", "reports:7")
    assert (first.outcome, second.outcome) == (RESERVED, RESERVED)
    assert 9.0 < first.wait <= 10.0 and 19.0 < second.wait <= 20.0  # one slot each, 10 s apart
    assert bucket.take("reports", "reports:8").outcome == REFUSED  # its slot would be 30 s away
    assert client.ttl("kronos:quota-reserved:reports:6") > 60
    assert bucket.take("reports", "reports:6").outcome == ADMITTED  # back at its slot: already paid
    assert not client.exists("kronos:quota-reserved:reports:6")
    assert bucket.take("reports", "reports:9").outcome == REFUSED  # the bucket is still in debt
