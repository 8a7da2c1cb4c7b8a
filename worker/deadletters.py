"""Keeps the request of every job that failed for good with a retryable cause (tasks/deadletter.py)."""

import time

import redis

from tasks import deadletter
from worker.jobs import JobObserver


class DeadLetterObserver(JobObserver):
    def __init__(self, client: redis.Redis):
        self.client = client

    def job_failed(self, task, payload, error, will_retry):
        if will_retry or not deadletter.should_keep(error):
            return
        delivery = task.request.delivery_info or {}
        letter = deadletter.DeadLetter(
            job_id=task.request.id,
            queue=delivery.get("routing_key"),
            error=error.model_dump(mode="json"),
            payload=payload,
            retries=task.request.retries,
            worker=task.request.hostname,
            failed_at=time.time(),
        )
        deadletter.record(self.client, letter)
