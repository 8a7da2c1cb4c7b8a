"""The Redis keys that hold one job, in the result DB, named in one place (docs/PRODUCERS.md lists them).

celery-task-meta-<id>   its state and answer: Celery's result document, written only by workers; a final
                        SUCCESS or FAILURE is never replaced (worker/results.py)
kronos:job:<id>         the Python client's record of a submitted job: series, model, request digest
kronos:claim:<id>       the worker run that holds the job (owner and lease), its digest, runs, final state
kronos:conflict:<id>    why a request sent under an id that names another request was refused (a JobError)

And one in the broker DB that holds jobs of every queue:

kronos:delayed          jobs whose eta is still ahead, until they are due (worker/delayed.py)
kronos:wake-probe:<id>  pushed to and deleted by an idle worker, to check that Redis announces pushes to it
                        (worker/wakeup.py); never holds anything between two commands
kronos:listener:<group> the one idle worker of a group (workers serving the same queues) that listens for pushes
                        onto them: its id, with a lease of seconds (worker/wakeup.py)
kronos:wake:<group>     wake-up tokens for the group's other idle workers, each blocked in a BLPOP on it: one
                        token wakes one worker; expires within seconds (worker/wakeup.py)
"""

RESULT_KEY_PREFIX = "celery-task-meta-"
JOB_RECORD_PREFIX = "kronos:job:"
CLAIM_KEY_PREFIX = "kronos:claim:"
CONFLICT_KEY_PREFIX = "kronos:conflict:"
DELAYED_KEY = "kronos:delayed"
PROBE_KEY_PREFIX = "kronos:wake-probe:"
LISTENER_KEY_PREFIX = "kronos:listener:"
WAKE_KEY_PREFIX = "kronos:wake:"


def keyspace_channel(db: int, key: str) -> str:
    """Where Redis announces writes to `key` (notify-keyspace-events K)."""
    return f"__keyspace@{db}__:{key}"
