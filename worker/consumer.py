"""Celery's consumer, answering undecodable forecast messages with a stored INVALID_INPUT failure.

Celery logs a message whose body cannot be decoded (not JSON) or whose content type is refused
(pickle, anything but JSON) and drops it, so its producer would wait forever on a result that never
comes. When the message's headers name a forecast job, this stores that job's FAILURE with
INVALID_INPUT first. The body is never deserialized with anything but the JSON decoder.
"""

import logging

from celery.worker.consumer import Consumer as CeleryConsumer

from schemas import ErrorCode, JobFailed
from tasks.routing import FORECAST_TASK

log = logging.getLogger(__name__)


class Consumer(CeleryConsumer):
    def on_decode_error(self, message, exc):
        self._fail_job(message, f"payload: the message body is not valid JSON ({type(exc).__name__})")
        super().on_decode_error(message, exc)

    def on_invalid_task(self, body, message, exc):
        self._fail_job(message, f"payload: refused message ({exc}); jobs must be sent as JSON")
        super().on_invalid_task(body, message, exc)

    def _fail_job(self, message, reason: str) -> None:
        headers = message.headers if isinstance(message.headers, dict) else {}
        job_id = headers.get("id")
        if headers.get("task") != FORECAST_TASK or not isinstance(job_id, str):
            return
        failure = JobFailed.of(ErrorCode.INVALID_INPUT, reason, field="payload", job_id=job_id)
        try:
            self.app.backend.mark_as_failure(job_id, failure, traceback=None)
        except Exception:
            log.exception("could not store the failure of undecodable job %s", job_id)
