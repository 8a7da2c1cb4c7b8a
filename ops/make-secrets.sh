#!/usr/bin/env bash
# One random Redis password file per ACL user (ops/redis_acl.py) in ${KRONOS_SECRETS_DIR:-./secrets}:
# kronos-worker, kronos-monitor and every producer in KRONOS_PRODUCERS. Existing files are kept, so re-running
# after adding a producer creates only its file. Hand each producer its own file, nothing else.
set -euo pipefail
dir="${KRONOS_SECRETS_DIR:-./secrets}"
: "${KRONOS_PRODUCERS:?set KRONOS_PRODUCERS, e.g. reports,backfill}"
umask 077
mkdir -p "$dir"
IFS=, read -ra producers <<< "$KRONOS_PRODUCERS"
for user in kronos-worker kronos-monitor "${producers[@]}"; do
    user="${user// /}"
    file="$dir/redis-$user.password"
    if [ ! -e "$file" ]; then
        head -c 32 /dev/urandom | base64 | tr -d '/+=\n' > "$file"
        echo "created $file"
    fi
done
