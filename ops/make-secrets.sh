#!/usr/bin/env bash
# The secret files docker-compose.yml mounts, in ${KRONOS_SECRETS_DIR:-./secrets}, mode 600:
# - redis-<user>.password, one random password per ACL user (ops/redis_acl.py): kronos-worker, kronos-monitor,
#   kronos-operator and every producer in KRONOS_PRODUCERS. Hand each producer its own file, nothing else.
#   With Redis Sentinel (docker-compose.ha.yml) also kronos-replica and kronos-sentinel, the servers' own users,
#   and redis-sentinel.password, the sentinels' requirepass, which every client of the sentinels needs.
# - flower-basic-auth: Flower's login, "ops:<random password>" (more user:password lines may be added).
# - grafana-admin.password: Grafana's admin password.
# - hf-token: empty (public weights need none); write a Hugging Face token into it for gated or private ones.
# Existing files are kept, so re-running after adding a producer creates only its file.
set -euo pipefail
dir="${KRONOS_SECRETS_DIR:-./secrets}"
: "${KRONOS_PRODUCERS:?set KRONOS_PRODUCERS, e.g. reports,backfill}"
umask 077
mkdir -p "$dir"

random_password() {
    head -c 32 /dev/urandom | base64 | tr -d '/+=\n'
}

create() {  # create FILE CONTENT: unless FILE exists
    if [ ! -e "$1" ]; then
        printf '%s' "$2" > "$1"
        echo "created $1"
    fi
}

IFS=, read -ra producers <<< "$KRONOS_PRODUCERS"
for user in kronos-worker kronos-monitor kronos-operator kronos-replica kronos-sentinel sentinel "${producers[@]}"; do
    user="${user// /}"
    create "$dir/redis-$user.password" "$(random_password)"
done
create "$dir/flower-basic-auth" "ops:$(random_password)"
create "$dir/grafana-admin.password" "$(random_password)"
create "$dir/hf-token" ""
