#!/usr/bin/env bash
# Run the service (`kongflow-events all`: HTTP API, relay and worker) on the local Postgres
# and RabbitMQ, starting or installing them when missing. Prints an API key for a fresh
# development environment and how to send a first event.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/services.sh
export DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/kongflow}
export AMQP_URL=${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
export HTTP_ADDR=${HTTP_ADDR:-127.0.0.1:3030}
db=${DATABASE_URL##*/}
psql -h 127.0.0.1 -U postgres -d postgres -qAtc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1 \
  || psql -h 127.0.0.1 -U postgres -d postgres -qAtc "CREATE DATABASE \"$db\""
export SQLX_OFFLINE=true
cargo build --release --locked --quiet
bin=target/release/kongflow-events
$bin migrate
$bin topology
key=$($bin env create local/kongflow/dev | tail -n 1)
cat <<MSG

API key for local/kongflow/dev: $key

The other commands (jobs, env, migrate, topology, a second worker) talk to the same
database and broker once these are set in their terminal:

  export DATABASE_URL='$DATABASE_URL'
  export AMQP_URL='$AMQP_URL'

Register a job, send an event, and look at its runs:

  curl -s -X PUT http://$HTTP_ADDR/api/v1/jobs/welcome-email -H "Authorization: Bearer $key" \\
    -H 'content-type: application/json' \\
    -d '{"version":"1.0.0","trigger":{"event":"user.created","payload":{"plan":["pro"]}}}'
  curl -s -X POST http://$HTTP_ADDR/api/v1/events -H "Authorization: Bearer $key" \\
    -H 'content-type: application/json' \\
    -d '{"event":{"name":"user.created","id":"evt-1","payload":{"plan":"pro"}}}'
  curl -s http://$HTTP_ADDR/api/v2/events/evt-1 -H "Authorization: Bearer $key"

MSG
exec $bin all
