#!/usr/bin/env bash
# Write the secrets an overlay's secretGenerator reads into OVERLAY/secrets/ (default: the cluster
# overlay beside this script): a Redis password and URL, one client API key, an admin key, and the
# cluster's CURVE keys (`aegaeon keys`). Existing files are kept, so running it again only fills gaps.
#
#   deploy/kubernetes/make-secrets.sh [OVERLAY]
#   REDIS_URL=rediss://:PASSWORD@redis.example:6380/0 deploy/kubernetes/make-secrets.sh   # external Redis
#
# Needs python3 and the `aegaeon` command (pip install the repository, or run it in the image:
# docker run --rm -v "$PWD:/out" --entrypoint aegaeon IMAGE keys /out/wire).
set -euo pipefail

overlay="${1:-$(dirname "$0")/cluster}"
secrets="$overlay/secrets"
umask 077
mkdir -p "$secrets"

token() { python3 -c 'import secrets; print(secrets.token_urlsafe(32))'; }

if [ ! -e "$secrets/redis.env" ]; then
    password="$(token)"
    # The in-cluster Redis (base/redis.yaml) unless REDIS_URL names another one.
    url="${REDIS_URL:-redis://:${password}@aegaeon-redis:6379/0}"
    printf 'password=%s\nurl=%s\n' "$password" "$url" > "$secrets/redis.env"
    echo "wrote $secrets/redis.env"
fi
if [ ! -e "$secrets/api-keys" ]; then
    printf '# one API key per line; clients send "Authorization: Bearer KEY"\n%s\n' "$(token)" \
        > "$secrets/api-keys"
    echo "wrote $secrets/api-keys (add a line per client)"
fi
if [ ! -e "$secrets/admin.env" ]; then
    printf 'key=%s\n' "$(token)" > "$secrets/admin.env"
    echo "wrote $secrets/admin.env"
fi
if [ ! -e "$secrets/wire/node.key_secret" ]; then
    aegaeon keys "$secrets/wire" > /dev/null
    echo "wrote $secrets/wire/ (the cluster's CURVE keys)"
fi
