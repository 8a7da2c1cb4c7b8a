#!/bin/sh
# Enqueue one Kronos forecast job with nothing but redis-cli, then wait for its result.
#
#   KRONOS_BROKER_URL=redis://localhost:6379/0 sh examples/shell/enqueue.sh request.json
#
# request.json is a ForecastRequest (`kronos-worker schema request`). The job id goes to stderr, the stored
# result document (celery-task-meta-<id>, see docs/PRODUCERS.md) to stdout. Exit status: 0 done, 1 the job
# failed, 2 bad usage, 3 no result within KRONOS_WAIT_SECONDS.
#
# Optional variables:
#   KRONOS_RESULT_BACKEND  results Redis (default: the broker URL with DB 1)
#   KRONOS_QUEUE           kronos.<model> (default kronos.kronos-small: it must match the request's model)
#   KRONOS_PRIORITY        0-9, 0 served first (default 5, as Python producers send)
#   KRONOS_JOB_ID          your id; sending the same id again does not queue a second job (default: a UUID)
#   KRONOS_RESULT_EXPIRES  seconds the job record is kept (default 86400: keep it equal to the workers')
#   KRONOS_WAIT_SECONDS    how long to wait for the result (default 300)
# A password in the URL makes redis-cli warn on stderr; REDISCLI_AUTH is the quiet alternative.
set -eu

request_file=${1:-}
if [ -z "$request_file" ] || [ ! -r "$request_file" ]; then
    echo "usage: enqueue.sh REQUEST.json (a readable ForecastRequest file)" >&2
    exit 2
fi
broker=${KRONOS_BROKER_URL:-redis://localhost:6379/0}
case $broker in
    *://*/*) default_results=${broker%/*}/1 ;;
    *) default_results=$broker/1 ;;
esac
results=${KRONOS_RESULT_BACKEND:-$default_results}
queue=${KRONOS_QUEUE:-kronos.kronos-small}
priority=${KRONOS_PRIORITY:-5}
job_id=${KRONOS_JOB_ID:-$(cat /proc/sys/kernel/random/uuid 2>/dev/null || uuidgen | tr 'A-Z' 'a-z')}
delivery_tag=$(cat /proc/sys/kernel/random/uuid 2>/dev/null || uuidgen | tr 'A-Z' 'a-z')
now=$(date +%s)

# kombu keeps one Redis list per priority: the queue's own name for 0, "<queue>\x06\x16<p>" otherwise.
if [ "$priority" -eq 0 ]; then
    list=$queue
else
    list=$(printf '%s\006\026%s' "$queue" "$priority")
fi

# Celery protocol 2: the body is [args, kwargs, embed], base64-encoded; the request is the one argument.
body=$(printf '[[%s], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]' \
    "$(cat "$request_file")" | base64 | tr -d '\n')
message=$(printf '{"body": "%s", "content-encoding": "utf-8", "content-type": "application/json", '\
'"headers": {"lang": "py", "task": "kronos.forecast", "id": "%s", "root_id": "%s", "parent_id": null, '\
'"group": null, "retries": 0, "eta": null, "expires": null, "timelimit": [null, null], "kronos_sent_at": %s}, '\
'"properties": {"correlation_id": "%s", "delivery_mode": 2, '\
'"delivery_info": {"exchange": "", "routing_key": "%s"}, "priority": %s, '\
'"body_encoding": "base64", "delivery_tag": "%s"}}' \
    "$body" "$job_id" "$job_id" "$now" "$job_id" "$queue" "$priority" "$delivery_tag")

# The job record first (SET NX): it makes a resent id a no-op, and tells "queued" from "unknown" later.
recorded=$(redis-cli -u "$results" SET "kronos:job:$job_id" "{\"submitted_at\": $now}" NX EX \
    "${KRONOS_RESULT_EXPIRES:-86400}")
if [ "$recorded" = OK ]; then
    printf '%s' "$message" | redis-cli -u "$broker" -x LPUSH "$list" >/dev/null
    echo "job $job_id queued on $queue, priority $priority" >&2
else
    echo "job $job_id was submitted before; not sending it again" >&2
fi

deadline=$((now + ${KRONOS_WAIT_SECONDS:-300}))
while :; do
    meta=$(redis-cli -u "$results" GET "celery-task-meta-$job_id")
    case $meta in
        *'"status": "SUCCESS"'*) printf '%s\n' "$meta"; exit 0 ;;
        *'"status": "FAILURE"'* | *'"status": "REVOKED"'*) printf '%s\n' "$meta"; exit 1 ;;
    esac
    if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "job $job_id: no result after ${KRONOS_WAIT_SECONDS:-300} s" >&2
        exit 3
    fi
    sleep 1
done
