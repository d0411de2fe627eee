#!/usr/bin/env bash
# `make run`'s last step before starting the platform: makes sure a DEVELOPMENT-ONLY JWT secret
# exists in .env (git-ignored; the binary reads .env at startup) and prints how to talk to the
# platform: a ready token, a curl line and a mosquitto_pub line.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! { [[ -f .env ]] && grep -q '^CJ_JWT_SECRET=' .env; }; then
    secret=$(head -c 48 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 48)
    {
        echo "# Development only, written by scripts/dev-env.sh (git-ignored). Never use in production."
        echo "CJ_JWT_SECRET=$secret"
    } >>.env
    echo "dev-env: wrote a development JWT secret to .env"
fi

# On a developer's machine webhook receivers usually listen on localhost, which production
# refuses (CJ_ACTIONS_ALLOW_PRIVATE_TARGETS defaults to false).
if ! grep -q '^CJ_ACTIONS_ALLOW_PRIVATE_TARGETS=' .env; then
    echo "CJ_ACTIONS_ALLOW_PRIVATE_TARGETS=true" >>.env
    echo "dev-env: allowed webhooks to local receivers in .env"
fi

token=$(./target/release/cornjacket token --sub developer --scopes "ingest:write query:read actions:admin dlq:admin" --ttl 12h)
cat <<MSG

A development token (12 h):
  export TOKEN=$token

The operator console (log in with that token):
  http://127.0.0.1:8085/console/

Give it something to show (simulated sensors with occasional outliers; Ctrl-C stops):
  ./target/release/cornjacket simulate

Send an event and read it back:
  curl -sS -X POST localhost:8080/api/v1/ingest -H "Authorization: Bearer \$TOKEN" -H 'Content-Type: application/json' \\
    -d '{"event_type":"sensor.reading","aggregate_id":"device-001","payload":{"value":72.5,"unit":"fahrenheit"}}'
  curl -sS -H "Authorization: Bearer \$TOKEN" localhost:8081/api/v1/query/projections/sensor_state/device-001

Publish from a device over MQTT (development credentials):
  mosquitto_pub -h 127.0.0.1 -u cornjacket -P cornjacket -q 1 -t devices/device-002/events \\
    -m '{"event_type":"sensor.reading","payload":{"value":21.5,"unit":"celsius"}}'

MSG
